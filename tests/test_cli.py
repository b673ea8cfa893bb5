"""``hwbkpt`` against a real daemon, and without one."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hwbkpt import Client, PermissionDeniedError
from hwbkpt._cli import COMMANDS, Command, format_status, main
from hwbkpt._events import Event
from hwbkpt._watchcmd import _Printer, _record
from tests._daemon import Daemon

pytestmark = pytest.mark.timeout(60)


def _hwbkpt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hwbkpt._cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_status_text(daemon: Daemon) -> None:
    proc = _hwbkpt("--socket", daemon.socket, "status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert f"pid {daemon.pid}" in out
    assert "clients (" in out
    (client_line,) = [line for line in out.splitlines() if line.startswith("  #") and
                      " hwbkpt " in line]
    assert f"uid {os.getuid()}" in client_line
    assert "targets (0):" in out


def test_status_json(daemon: Daemon) -> None:
    proc = _hwbkpt("status", "--json", env={"HWBKPT_SOCKET": daemon.socket})
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["pid"] == daemon.pid
    (me,) = [c for c in status["clients"] if c["name"] == "hwbkpt"]
    assert me["pid"] != os.getpid()
    assert me["uid"] == os.getuid()


def test_no_daemon_exit_2_one_line(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    proc = _hwbkpt("--socket", sock, "status")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sock in lines[0]
    assert "make run" in lines[0]
    assert "systemctl start hwbkptd.socket" in lines[0]


def test_stale_socket_counts_as_no_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    assert main(["--socket", path, "status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no hwbkptd is listening" in err


def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_help_documents_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status" in out
    for code in ("0", "1", "2"):
        assert f"  {code}  " in out
    assert "status" in out


def test_commands_table_is_extensible() -> None:
    assert "status" in COMMANDS
    assert callable(COMMANDS["status"].run)


def test_format_status_with_targets() -> None:
    text = format_status(
        {
            "pid": 1,
            "version": "0.1.0",
            "uptime": 3725,
            "clients": [{"id": 3, "name": "gdb", "pid": 40, "uid": 1000, "gid": 1000,
                         "watches": 2}],
            "targets": [
                {
                    "pid": 812,
                    "comm": "prog",
                    "threads": [
                        {
                            "tid": 812,
                            "slots": [
                                {"slot": 0, "key": {"addr": 0x4010, "length": 8, "access": "w"},
                                 "mode": "stop", "holders": [{"client": 3, "watch": 1}]},
                                {"slot": 1, "key": None},
                            ],
                            "pending": [{"key": {"addr": 0x5000, "length": 4, "access": "rw"},
                                         "client": 3, "watch": 2, "reason": "preempted"}],
                        },
                        {
                            "tid": 813,
                            "state": "running",
                            "slots": [{"addr": 0x6000, "length": 2, "access": "x", "mode": "count",
                                       "watches": [4, 5], "holders": [3, 9]}],
                            "pending": [6],
                        }
                    ],
                }
            ],
        }
    )
    assert "up 1h02m" in text
    assert "#3 gdb  pid 40 uid 1000 gid 1000  watches 2" in text
    assert "pid 812 prog" in text
    assert "slot 0: 0x4010/8 w  mode stop  holders client 3 watch 1" in text
    assert "slot 1: free" in text
    assert "pending: 0x5000/4 rw  client 3 watch 2  (preempted)" in text
    assert "tid 813  state=running" in text
    assert "slot 0: 0x6000/2 x  mode count  watches 4,5  holders client 3, client 9" in text
    assert "pending: watch 6" in text



def test_socket_permission_error_says_which_rule(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Root passes any socket permission check, so the refusal is simulated at connect().
    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert main(["--socket", "/run/x.sock", "status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "permission denied on /run/x.sock" in err
    assert "group 'hwbkpt'" in err


def test_request_permission_error_says_which_rule(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(client: Client, args: argparse.Namespace) -> int:
        raise PermissionDeniedError("you may not trace pid 1")

    monkeypatch.setitem(COMMANDS, "status", Command("status", lambda p: None, denied))
    assert main(["--socket", daemon.socket, "status"]) == 1
    err = capsys.readouterr().err
    assert "you may not trace pid 1" in err
    assert "ptrace" in err


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({}, "the watcher did not keep up"),
        ({"where": "ring"}, "the kernel's sample ring overflowed"),
        ({"where": "cpu", "tid": 7}, "DR6 was empty"),
    ],
)
def test_watch_says_why_hits_were_lost(
    fields: dict[str, object], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    printer = _Printer(os.getpid(), None, 8, "w", as_json=False)  # type: ignore[arg-type]
    record = _record(Event("lost", {"count": 3, "what": "hit", **fields}), set(), printer)
    assert record is not None
    assert {k: record[k] for k in fields} == fields  # --json keeps where and tid
    printer.line(record)
    out = capsys.readouterr().out
    assert "lost 3 hits (" in out
    assert why in out
