"""The engine backend: checks each request's parameters and rights, then asks the engine.

Every method in ``proto/PROTOCOL.md`` beyond ``hello`` and ``status`` is a function here
taking the client and its :class:`Params`. Parameters are checked strictly (type, range,
no unknown names) so that a bad request is an ``EINVAL`` naming the parameter, never an
exception deep inside the engine. Rights are checked at every request that names a process
or thread (:mod:`hwbkptd._auth`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio

from hwbkpt_proto import (
    HwbkptError,
    InvalidArgumentError,
    LimitExceededError,
    NoSpaceError,
    NoSuchProcessError,
    NotFoundError,
)
from hwbkptd import _kernel
from hwbkptd._auth import Peer, authorize
from hwbkptd._cond import Condition
from hwbkptd._cond import parse as parse_condition
from hwbkptd._config import Config
from hwbkptd._engine import Engine, WatchRec
from hwbkptd._kernel import PAGE_SIZE
from hwbkptd._model import USER_SPACE_END, Access, Mode, Spec, check_spec
from hwbkptd._platform import probe_int1
from hwbkptd._rawdr import RawDebugRegisters
from hwbkptd._region import split_region
from hwbkptd._server import ClientHandle
from hwbkptd._signals import MAX_SIGNAL
from hwbkptd._tracer import KernelPort, Tracer, load_fastpath

__all__ = ["EngineBackend", "Params"]

log = logging.getLogger(__name__)

_MISSING: Any = object()
MAX_MEMORY = 1 << 20  # bytes per read_memory / write_memory
MAX_PRIORITY = 1 << 31


class Params:
    """Typed access to one request's named parameters; every misuse is an EINVAL."""

    def __init__(self, method: str, params: dict[str, Any]) -> None:
        self.method = method
        self._params = params
        self._seen: set[str] = set()

    def _get(self, name: str, default: Any) -> Any:
        self._seen.add(name)
        if name in self._params:
            return self._params[name]
        if default is _MISSING:
            raise InvalidArgumentError(f"{self.method}: parameter {name!r} is required")
        return default

    def integer(
        self, name: str, default: Any = _MISSING, *, lo: int = 0, hi: int = (1 << 64) - 1
    ) -> int:
        value = self._get(name, default)
        if type(value) is not int:
            raise InvalidArgumentError(
                f"{self.method}: {name} must be an integer, not {type(value).__name__}"
            )
        if not lo <= value <= hi:
            raise InvalidArgumentError(
                f"{self.method}: {name}={value} is out of range [{lo}, {hi}]"
            )
        return value

    def opt_int(self, name: str, *, lo: int = 0, hi: int = (1 << 64) - 1) -> int | None:
        if self._params.get(name) is None:
            self._seen.add(name)
            return None
        return self.integer(name, lo=lo, hi=hi)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(name, default)
        if value not in choices:
            raise InvalidArgumentError(
                f"{self.method}: {name} must be one of {', '.join(choices)}; got {value!r}"
            )
        return str(value)

    def opt_str(self, name: str) -> str | None:
        value = self._get(name, None)
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError(f"{self.method}: {name} must be a string or nil")
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if type(value) is not bool:
            raise InvalidArgumentError(f"{self.method}: {name} must be true or false")
        return value

    def int_list(self, name: str, default: Any, *, lo: int, hi: int, what: str) -> list[int]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(
            type(v) is int and lo <= v <= hi for v in value
        ):
            raise InvalidArgumentError(
                f"{self.method}: {name} must be a list of {what} from {lo} to {hi}"
            )
        return value

    def binary(self, name: str) -> bytes:
        value = self._get(name, _MISSING)
        if not isinstance(value, bytes):
            raise InvalidArgumentError(f"{self.method}: {name} must be binary data")
        return value

    def int_map(self, name: str) -> dict[str, int]:
        value = self._get(name, _MISSING)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in value.items()
        ):
            raise InvalidArgumentError(f"{self.method}: {name} must map register names to integers")
        return value

    def done(self) -> None:
        """Refuse parameters the method does not know (catches typos in clients)."""
        unknown = set(self._params) - self._seen
        if unknown:
            raise InvalidArgumentError(
                f"{self.method}: unknown parameter(s) {', '.join(sorted(map(str, unknown)))}"
            )


Handler = Callable[[ClientHandle, Params], Any]


def _int1_kind() -> str:
    """Measure whether ``int1`` traps or faults on this CPU (the empty-DR6 rule needs it)."""
    try:
        finding = probe_int1()
    except (HwbkptError, OSError) as err:
        log.warning("cannot tell whether int1 traps or faults here (%s): assuming it traps", err)
        return "trap"
    log.info("platform: int1 is %s", finding.found)
    return str(finding.value) if finding.value in ("trap", "fault") else "trap"


class EngineBackend:
    """The :class:`hwbkptd._server.Backend` that serves watches with the real kernel."""

    capabilities = [
        "watch",
        "count",
        "notify",
        "stop",
        "step",
        "regs",
        "memory",
        "region",
        "debugregs",
        "attach",
        "signals",
    ]

    def __init__(self, config: Config) -> None:
        self.config = config
        # Where conditions are evaluated: in the kernel (BPF) or at a ptrace stop (why not).
        self.no_bpf = "switched off (hwbkptd --no-bpf)" if not config.bpf else None
        if self.no_bpf is None:
            self.no_bpf = _kernel.bpf_available()
            if self.no_bpf is not None:
                log.warning("conditions are evaluated at ptrace stops: %s", self.no_bpf)
        self.port = KernelPort(
            config.notify_ring_kib, config.notify_ring_budget_mib, bpf=self.no_bpf is None
        )
        self.platform = {"int1": _int1_kind()}
        self.engine = Engine(
            self.port,
            self._emit,
            park=config.park,
            int1_faults=self.platform["int1"] == "fault",
            bpf=self.no_bpf is None,
        )
        self._clients: dict[int, ClientHandle] = {}
        self.fastpath, self.fastpath_state = load_fastpath()
        self.tracer = Tracer(
            self.engine, self.port, batch=self._batch, clients=self._clients,
            fastpath=self.fastpath,
        )
        self.rawdr = RawDebugRegisters(self.engine)
        self._peers: dict[int, Peer] = {}
        self._fds: dict[int, int] = {}  # client id -> its socket, read by the tracer's hot loop
        self._corked: dict[int, ClientHandle] | None = None  # during a batch (_batch)
        self._methods: dict[str, Handler] = {
            "watch": self._watch,
            "watch_region": self._watch_region,
            "unwatch": self._unwatch,
            "watches": self._watches,
            "count": self._count,
            "resume": self._resume,
            "step": self._step,
            "interrupt": self._interrupt,
            "attach": self._attach,
            "detach": self._detach,
            "hold_all": self._hold_all,
            "signals": self._signals,
            "get_regs": self._get_regs,
            "set_regs": self._set_regs,
            "read_memory": self._read_memory,
            "write_memory": self._write_memory,
            "peek_dr": self._peek_dr,
            "poke_dr": self._poke_dr,
            "peek_user": self._peek_user,
            "poke_user": self._poke_user,
        }

    # --- Backend protocol ----------------------------------------------------------

    def client_connected(self, client: ClientHandle) -> None:
        self._clients[client.id] = client
        self._peers[client.id] = Peer.of(client.pid, client.uid, client.gid)
        self.engine.add_client(client.id)
        self._fds[client.id] = client._fd
        self.tracer.add_reader(client._fd, client.read_some)

    def client_disconnected(self, client: ClientHandle) -> None:
        fd = self._fds.pop(client.id, -1)
        if fd >= 0:
            self.tracer.remove_reader(fd)
        self._clients.pop(client.id, None)
        self._peers.pop(client.id, None)
        self.rawdr.remove_client(client.id)
        self.engine.remove_client(client.id)

    def call(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        handler = self._methods.get(method)
        if handler is None:
            raise NotFoundError(f"unknown method {method!r}; see proto/PROTOCOL.md for the list")
        # Handlers do not block. Statuses that the call itself caused (e.g. a stop right
        # after a resume) are picked up by the tracer loop on SIGCHLD.
        return handler(client, Params(method, params))

    def status(self) -> dict[str, Any]:
        return {
            "targets": self.engine.status(),
            "conditions": "bpf" if self.no_bpf is None else f"ptrace: {self.no_bpf}",
            "counters": dict(self.engine.counters)
            | {
                "sigchld_wakeups": self.tracer.wakeups,
                "hot_rounds": self.tracer.hot_rounds,
                "fast_rounds": self.tracer.fast_rounds,
            },
            "fastpath": self.fastpath_state,
            "platform": self.platform
            | {"notify_ring_kib": self.port.ring_pages * PAGE_SIZE // 1024},
            "clients": {
                cid: {
                    "watches": self.engine.client_watch_count(cid),
                    "ended": self.engine.client_ended_count(cid),
                }
                for cid in self._clients
            },
            "ended": self.engine.ended_watches(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.tracer.run(task_status=task_status)

    def shutdown(self) -> None:
        self.tracer.shutdown()

    # --- helpers -------------------------------------------------------------------

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """While the tracer works, cork each connection that is sent an event (_emit), so
        that each client gets one write per round; only those are touched, so a round
        costs nothing per connected client. A nested batch is part of the outer one."""
        if self._corked is not None:
            yield
            return
        self._corked = {}
        try:
            yield
        finally:
            corked, self._corked = self._corked, None
            for client in corked.values():
                client.uncork()

    def _emit(self, cid: int, kind: str, fields: dict[str, Any], droppable: bool) -> None:
        client = self._clients.get(cid)
        if client is None:
            return
        corked = self._corked
        if corked is not None and cid not in corked:
            # Corked from its first event of the round on: what it was sent before (a
            # response written at once) is older, so order holds.
            client.cork()
            corked[cid] = client
        client.send_event(kind, fields, droppable=droppable)

    def _authorize(self, client: ClientHandle, pid: int) -> None:
        authorize(self._peers[client.id], pid)

    def _pid_of(self, tid: int) -> int:
        pid = self.engine.pid_of(tid)
        return pid if pid is not None else _kernel.tgid_of(tid)

    def _authorize_tid(self, client: ClientHandle, p: Params, *, done: bool = True) -> int:
        tid = p.integer("tid", lo=1, hi=(1 << 31) - 1)
        if done:
            p.done()
        self._authorize(client, self._pid_of(tid))
        return tid

    def _spec(self, p: Params, addr: int, length: int) -> tuple[Spec, Mode, int]:
        access = Access(p.choice("access", "w", ("w", "rw", "x")))
        mode = Mode.from_wire(p.choice("mode", "count", ("count", "notify", "stop")))
        priority = p.integer("priority", 0, lo=-MAX_PRIORITY, hi=MAX_PRIORITY)
        why = check_spec(addr, length, access)
        if why is not None:
            raise InvalidArgumentError(f"{p.method}: {why}")
        return Spec(addr, length, access), mode, priority

    def _check_limit(self, client: ClientHandle, more: int) -> None:
        have = self.engine.client_watch_count(client.id)
        if have + more > self.config.max_watches:
            ended = self.engine.client_ended_count(client.id)
            hint = f", {ended} of them ended (remove those with unwatch)" if ended else ""
            raise LimitExceededError(
                f"you have {have} watches{hint}; the daemon allows "
                f"{self.config.max_watches} per client (hwbkptd --max-watches)"
            )

    @staticmethod
    def _reply(watch: WatchRec) -> dict[str, Any]:
        return {"id": watch.id, "state": watch.state, "threads": dict(watch.states)}

    # --- methods -------------------------------------------------------------------

    def _watch(self, client: ClientHandle, p: Params) -> dict[str, Any]:
        pid = p.integer("pid", lo=1, hi=(1 << 31) - 1)
        addr = p.integer("addr")
        length = p.integer("length", 8, lo=1, hi=8)
        tid = p.opt_int("tid", lo=1, hi=(1 << 31) - 1)
        spec, mode, priority = self._spec(p, addr, length)
        condition = self._condition(p, spec, mode)
        p.done()
        self._authorize(client, pid)
        self._check_limit(client, 1)
        watch = self.engine.watch(
            client.id, pid, spec, mode, tid=tid, priority=priority, condition=condition
        )
        return self._reply(watch)

    @staticmethod
    def _condition(p: Params, spec: Spec, mode: Mode) -> Condition | None:
        """The ``condition`` parameter, parsed for this piece's length (or ``None``)."""
        text = p.opt_str("condition")
        if text is None:
            return None
        if spec.access is Access.EXECUTE:
            raise InvalidArgumentError(
                f"{p.method}: a condition needs a data watch (access w or rw): an execute "
                "breakpoint has no value"
            )
        return parse_condition(text, spec.length)

    def _watch_region(self, client: ClientHandle, p: Params) -> dict[str, Any]:
        pid = p.integer("pid", lo=1, hi=(1 << 31) - 1)
        addr = p.integer("addr")
        size = p.integer("size", lo=1, hi=1 << 16)
        tid = p.opt_int("tid", lo=1, hi=(1 << 31) - 1)
        pieces = split_region(addr, size)
        specs = [self._spec(p, a, n) for a, n in pieces]
        conditions = [self._condition(p, spec, mode) for spec, mode, _ in specs]
        p.done()
        self._authorize(client, pid)
        self._check_limit(client, len(pieces))
        made: list[WatchRec] = []
        try:
            for (spec, mode, priority), condition in zip(specs, conditions, strict=True):
                made.append(
                    self.engine.watch(
                        client.id, pid, spec, mode, tid=tid, priority=priority, condition=condition
                    )
                )
            if any(w.state != "installed" for w in made):
                raise NoSpaceError(
                    f"watch_region: the {size}-byte region needs {len(pieces)} slots "
                    f"({' + '.join(str(n) for _, n in pieces)} bytes) and not all are free; "
                    "nothing was installed"
                )
        except BaseException:
            for watch in made:
                self.engine.unwatch(client.id, watch.id)
            raise
        return {
            "ids": [w.id for w in made],
            "pieces": [list(piece) for piece in pieces],
            "watches": [self._reply(w) for w in made],
        }

    def _unwatch(self, client: ClientHandle, p: Params) -> None:
        wid = p.integer("id")
        p.done()
        self.engine.unwatch(client.id, wid)

    def _watches(self, client: ClientHandle, p: Params) -> list[dict[str, Any]]:
        p.done()
        return [w.describe() for w in self.engine.list_watches(client.id)]

    def _count(self, client: ClientHandle, p: Params) -> int:
        wid = p.integer("id")
        p.done()
        return self.engine.count(client.id, wid)

    def _resume(self, client: ClientHandle, p: Params) -> None:
        sig = p.opt_int("signal", hi=MAX_SIGNAL)
        self.engine.resume(client.id, self._authorize_tid(client, p), sig)

    def _step(self, client: ClientHandle, p: Params) -> None:
        sig = p.opt_int("signal", hi=MAX_SIGNAL)
        self.engine.step(client.id, self._authorize_tid(client, p), sig)

    def _interrupt(self, client: ClientHandle, p: Params) -> None:
        self.engine.interrupt(client.id, self._authorize_tid(client, p))

    def _target_pid(self, client: ClientHandle, p: Params) -> int:
        pid = p.integer("pid", lo=1, hi=(1 << 31) - 1)
        p.done()
        self._authorize(client, pid)
        return pid

    def _attach(self, client: ClientHandle, p: Params) -> dict[str, Any]:
        hold = p.boolean("hold_threads", False)
        pid = self._target_pid(client, p)
        return {"threads": self.engine.attach(client.id, pid, hold_threads=hold)}

    def _detach(self, client: ClientHandle, p: Params) -> None:
        self.engine.leave(client.id, self._target_pid(client, p))

    def _hold_all(self, client: ClientHandle, p: Params) -> dict[str, Any]:
        return {"threads": self.engine.hold_all(client.id, self._target_pid(client, p))}

    def _signals(self, client: ClientHandle, p: Params) -> None:
        report = p.boolean("report", True)
        passed = p.int_list("pass", [], lo=1, hi=MAX_SIGNAL, what="signal numbers")
        self.engine.catch_signals(client.id, self._target_pid(client, p), report, passed)

    def _get_regs(self, client: ClientHandle, p: Params) -> dict[str, int]:
        return self.engine.get_regs(client.id, self._authorize_tid(client, p))

    def _set_regs(self, client: ClientHandle, p: Params) -> None:
        regs = p.int_map("regs")
        tid = self._authorize_tid(client, p)
        self.engine.set_regs(client.id, tid, regs)

    def _memory_args(self, client: ClientHandle, p: Params) -> tuple[int, int]:
        pid = p.integer("pid", lo=1, hi=(1 << 31) - 1)
        addr = p.integer("addr")
        return pid, addr

    @staticmethod
    def _user_range(p: Params, addr: int, size: int) -> None:
        # /proc/PID/mem offsets are signed 64-bit: a kernel address would overflow pread.
        if addr + size > USER_SPACE_END:
            raise InvalidArgumentError(
                f"{p.method}: {addr:#x}+{size} is not a user-space address range"
            )

    def _read_memory(self, client: ClientHandle, p: Params) -> bytes:
        pid, addr = self._memory_args(client, p)
        size = p.integer("size", lo=0, hi=MAX_MEMORY)
        p.done()
        self._user_range(p, addr, size)
        self._authorize(client, pid)
        return _kernel.read_memory(pid, addr, size)

    def _write_memory(self, client: ClientHandle, p: Params) -> None:
        pid, addr = self._memory_args(client, p)
        data = p.binary("data")
        p.done()
        if len(data) > MAX_MEMORY:
            raise InvalidArgumentError(f"write_memory: at most {MAX_MEMORY} bytes per call")
        self._user_range(p, addr, len(data))
        self._authorize(client, pid)
        if pid not in self.engine.targets:
            raise NoSuchProcessError(
                f"write_memory: process {pid} is not managed by the daemon; set a watch on it first"
            )
        _kernel.write_memory(pid, addr, data)

    def _peek_dr(self, client: ClientHandle, p: Params) -> int:
        n = p.integer("n", lo=-(1 << 63), hi=(1 << 63) - 1)
        tid = self._authorize_tid(client, p)
        return self.rawdr.peek(client.id, tid, n)

    def _poke_dr(self, client: ClientHandle, p: Params) -> None:
        n = p.integer("n", lo=-(1 << 63), hi=(1 << 63) - 1)
        value = p.integer("value", lo=-(1 << 63), hi=(1 << 64) - 1)
        tid = self._authorize_tid(client, p)
        self.rawdr.poke(client.id, tid, n, value)

    def _peek_user(self, client: ClientHandle, p: Params) -> int:
        offset = p.integer("offset", lo=-(1 << 63), hi=(1 << 64) - 1)
        tid = self._authorize_tid(client, p)
        return self.rawdr.peek_user(client.id, tid, offset)

    def _poke_user(self, client: ClientHandle, p: Params) -> None:
        offset = p.integer("offset", lo=-(1 << 63), hi=(1 << 64) - 1)
        value = p.integer("value", lo=-(1 << 63), hi=(1 << 64) - 1)
        tid = self._authorize_tid(client, p)
        self.rawdr.poke_user(client.id, tid, offset, value)
