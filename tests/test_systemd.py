"""The systemd side: the units as systemd reads them, and the daemon's service protocol.

From pure to real:

* ``listen_fds()`` / ``notify()`` in this process, for the cases that touch no descriptor;
* the same in a child interpreter that really receives a listening socket on fd 3, with
  ``LISTEN_PID`` set to its own pid the way a service manager sets it (after fork, before
  exec), and reports READY=1 to a datagram socket bound here (path and abstract name);
* ``systemd-analyze verify`` / ``security --offline``, ``systemd-sysusers --dry-run`` and
  ``systemd-tmpfiles --root`` on the shipped files;
* the real daemon started by ``systemd-socket-activate`` with ``NOTIFY_SOCKET`` pointing
  here, answering a raw msgpack-RPC ``hello``.

Every subprocess is killed and reaped at teardown; every wait has an absolute deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from hwbkptd import _systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
VENV_BIN = Path(sys.prefix) / "bin"
TIMEOUT = 20.0  # seconds, absolute, for any single wait below

needs_systemd_tools = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-socket-activate") is None,
    reason="systemd-analyze / systemd-socket-activate not installed (`make deps` installs "
    "the Debian package systemd)",
)


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="hwbk-") as d:
        yield Path(d)


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Kill and reap ``proc`` on the way out, whatever happened."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def _datagram_listener(where: str, tmp: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if where == "path":
            path = str(tmp / "notify.sock")
            sock.bind(path)
            yield sock, path
        else:
            name = f"hwbkptd-test-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            yield sock, "@" + name
    finally:
        sock.close()


def _recv(sock: socket.socket, timeout: float = TIMEOUT) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def _listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


# -- in-process cases (no descriptor is touched) -----------------------------------------


def test_listen_fds_without_activation_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert _systemd.listen_fds() == []


def test_listen_fds_for_another_pid_is_ignored_and_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Inherited from a socket-activated parent: not ours, so fd 3 is left alone.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "x")
    assert _systemd.listen_fds() == []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert var not in os.environ


@pytest.mark.parametrize(("pid", "fds"), [("abc", "1"), ("{self}", "many"), ("{self}", "-1")])
def test_listen_fds_rejects_malformed_variables(
    monkeypatch: pytest.MonkeyPatch, pid: str, fds: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", pid.format(self=os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", fds)
    with pytest.raises(ValueError, match="LISTEN_"):
        _systemd.listen_fds()
    assert "LISTEN_PID" not in os.environ
    assert "LISTEN_FDS" not in os.environ


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _systemd.notify("READY=1") is False


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_notify_sends_one_datagram(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path, where: str
) -> None:
    with _datagram_listener(where, short_tmp) as (listener, address):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert _systemd.notify("READY=1\nSTATUS=serving") is True
        assert _recv(listener) == "READY=1\nSTATUS=serving"
        assert os.environ["NOTIFY_SOCKET"] == address  # kept for STOPPING=1 later


@pytest.mark.parametrize("address", ["{tmp}/nobody-listens", "relative/path"])
def test_notify_failure_returns_false(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path, address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address.format(tmp=short_tmp))
    assert _systemd.notify("READY=1") is False


# -- a child that really receives fd 3 ----------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from hwbkptd import _systemd
    try:
        socks = _systemd.listen_fds()
    except ValueError as err:
        print(json.dumps({"error": str(err), "fd3_open": _fd_open(3)}))
        sys.exit(0)
    report = {
        "count": len(socks),
        "fds": [s.fileno() for s in socks],
        "names": [s.getsockname() for s in socks],
        "family": [int(s.family) for s in socks],
        "type": [int(s.type) for s in socks],
        "cloexec": [bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                    for s in socks],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "notified": _systemd.notify("READY=1"),
    }
    if socks:
        socks[0].settimeout(float(os.environ["HWBK_TIMEOUT"]))
        conn, _ = socks[0].accept()
        conn.sendall(b"accepted")
        conn.close()
    print(json.dumps(report))
    """
)
_CHILD_PRELUDE = textwrap.dedent(
    """
    import os
    def _fd_open(fd):
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True
    """
)


def _spawn_activated(fd: int, notify: str | None, listen_fds: str = "1") -> subprocess.Popen[bytes]:
    """Start the child the way a service manager does: after the fork, move the socket to
    fd 3 and set LISTEN_PID to the pid that then execs the interpreter (exec keeps it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    env["LISTEN_FDS"] = listen_fds
    env["LISTEN_FDNAMES"] = "hwbkptd.socket"
    env["HWBK_TIMEOUT"] = str(TIMEOUT)
    # A copy above 3, so that moving it to 3 never closes what it just made.
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    manager = (
        "import os, sys\n"
        f"os.dup2({high}, 3, inheritable=True)\n"
        f"os.close({high})\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n"
    )
    try:
        return subprocess.Popen(
            [sys.executable, "-c", manager, _CHILD_PRELUDE + _CHILD],
            env=env,
            pass_fds=(high,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(high)


@pytest.mark.parametrize("where", ["path", "abstract"])
def test_child_takes_passed_socket_and_notifies(short_tmp: Path, where: str) -> None:
    sock_path = short_tmp / "s.sock"
    listener = _listening_socket(sock_path)
    with (
        contextlib.closing(listener),
        _datagram_listener(where, short_tmp) as (notify_sock, address),
        _reaped(_spawn_activated(listener.fileno(), address)) as child,
    ):
        assert _recv(notify_sock) == "READY=1"
        # READY=1 came from a child already holding the listening socket: connect to it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(TIMEOUT)
            client.connect(str(sock_path))
            assert client.recv(64) == b"accepted"
        out, err = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, err.decode()
    report = json.loads(out)
    assert report == {
        "count": 1,
        "fds": [3],
        "names": [str(sock_path)],
        "family": [int(socket.AF_UNIX)],
        "type": [int(socket.SOCK_STREAM)],
        "cloexec": [True],
        "env_left": [],
        "notified": True,
    }


def test_child_rejects_a_datagram_socket(short_tmp: Path) -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(short_tmp / "d.sock"))
    with contextlib.closing(dgram), _reaped(_spawn_activated(dgram.fileno(), None)) as child:
        out, err = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, err.decode()
    report = json.loads(out)
    assert "not a listening AF_UNIX stream socket" in report["error"]
    assert report["fd3_open"] is False  # closed, not leaked


def test_child_rejects_a_missing_descriptor() -> None:
    # LISTEN_FDS=2 but only fd 3 was passed: fd 4 is not an open socket.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0" + f"hwbkptd-test-{uuid.uuid4().hex}".encode())
    listener.listen(1)
    with (
        contextlib.closing(listener),
        _reaped(_spawn_activated(listener.fileno(), None, listen_fds="2")) as child,
    ):
        out, err = child.communicate(timeout=TIMEOUT)
        assert child.returncode == 0, err.decode()
    report = json.loads(out)
    assert "file descriptor 4" in report["error"]
    assert report["fd3_open"] is False  # the good socket is closed too: all or nothing


# -- the shipped files, as systemd reads them ---------------------------------------------


def _installed_daemon() -> Path:
    # The console script `pip install -e .` puts next to this interpreter; the unit names
    # /usr/local/bin/hwbkptd, which only exists after `make install`.
    exe = VENV_BIN / "hwbkptd"
    assert exe.exists(), f"{exe} is missing; run `make` (pip install -e .) first"
    return exe


@pytest.fixture
def unit_dir(short_tmp: Path) -> Path:
    """The two units copied with ExecStart= pointing at this venv's hwbkptd."""
    for name in ("hwbkptd.service", "hwbkptd.socket"):
        shutil.copy(UNITS / name, short_tmp / name)
    service = short_tmp / "hwbkptd.service"
    text = service.read_text()
    assert "ExecStart=/usr/local/bin/hwbkptd\n" in text
    service.write_text(
        text.replace("ExecStart=/usr/local/bin/hwbkptd\n", f"ExecStart={_installed_daemon()}\n")
    )
    return short_tmp


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@needs_systemd_tools
def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    result = _run(
        [
            "systemd-analyze",
            "verify",
            str(unit_dir / "hwbkptd.socket"),
            str(unit_dir / "hwbkptd.service"),
        ]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    about_us = [line for line in output.splitlines() if "hwbkptd" in line]
    assert about_us == [], output


@needs_systemd_tools
def test_service_exposure_stays_low(unit_dir: Path) -> None:
    # 1.2 when written (root + CAP_SYS_PTRACE + @debug syscalls are the job); fail if a
    # later edit loosens the sandbox past 2.0 ("OK").
    result = _run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(unit_dir / "hwbkptd.service"),
        ]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for hwbkptd\.service: (\d+\.\d+)", output)
    assert match is not None, output
    assert float(match.group(1)) <= 2.0, output


@needs_systemd_tools
def test_sysusers_creates_the_socket_group() -> None:
    result = _run(["systemd-sysusers", "--dry-run", str(UNITS / "hwbkptd.sysusers")])
    assert result.returncode == 0, result.stderr
    # Either it would create the group, or the group exists already (then it says nothing).
    assert "hwbkpt" in result.stdout + result.stderr or _group_exists("hwbkpt"), result


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@needs_systemd_tools
def test_tmpfiles_creates_the_runtime_dir(short_tmp: Path) -> None:
    conf = short_tmp / "hwbkptd.conf"
    shutil.copy(UNITS / "hwbkptd.tmpfiles", conf)
    root = short_tmp / "root"
    root.mkdir()
    result = _run(["systemd-tmpfiles", "--create", f"--root={root}", str(conf)])
    assert result.returncode == 0, result.stderr
    made = root / "run" / "hwbkptd"
    assert made.is_dir()
    assert made.stat().st_mode & 0o7777 == 0o755


# -- the real daemon under systemd-socket-activate ----------------------------------------


def _read_response(client: socket.socket, deadline: float) -> object:
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        for obj in unpacker:
            return obj
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no response from the daemon")
        client.settimeout(remaining)
        chunk = client.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection without answering")
        unpacker.feed(chunk)


def _wait_for_path(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"systemd-socket-activate exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


@needs_systemd_tools
def test_daemon_under_socket_activation(short_tmp: Path) -> None:
    sock_path = short_tmp / "s.sock"
    with _datagram_listener("path", short_tmp) as (notify_sock, address):
        argv = [
            "systemd-socket-activate",
            "-l",
            str(sock_path),
            "-E",
            f"NOTIFY_SOCKET={address}",
            "--",
            str(VENV_BIN / "python"),
            "-m",
            "hwbkptd._main",
            "--log-level",
            "debug",
            # Never touch the real /run/hwbkptd, even if activation were ignored.
            "--socket",
            str(short_tmp / "fallback.sock"),
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with _reaped(proc):
            deadline = time.monotonic() + TIMEOUT
            # systemd-socket-activate binds and listens first, and starts the daemon (by
            # exec, keeping its pid) only at the first connection — as systemd does.
            _wait_for_path(sock_path, proc, deadline)
            notify_sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                notify_sock.recv(4096)  # nobody can be ready before being started
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(TIMEOUT)
                client.connect(str(sock_path))  # listening: the kernel queues us
                client.sendall(msgpack.packb([0, 1, "hello", [{"version": 1, "name": "t"}]]))
                response = _read_response(client, deadline)
                # Our connection was only accepted after serve_listeners started, and
                # READY=1 is sent right then: it must already be queued here.
                notify_sock.setblocking(False)
                try:
                    first = notify_sock.recv(4096).decode()
                except BlockingIOError:
                    first = "<nothing>"
                assert first == "READY=1", "READY=1 must be sent before clients are served"
            assert isinstance(response, list), response
            assert response[:3] == [1, 1, None], response
            result = response[3]
            assert isinstance(result, dict), response
            assert result["version"] == 1

            # SIGTERM: STOPPING=1, then exit 0 (DESIGN.md §8).
            proc.send_signal(signal.SIGTERM)
            assert _recv(notify_sock, max(0.1, deadline + TIMEOUT - time.monotonic())) == (
                "STOPPING=1"
            )
            _out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err.decode()
            assert not (short_tmp / "fallback.sock").exists(), "activation was ignored"
