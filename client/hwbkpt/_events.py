"""What the daemon pushes: :class:`Event`, and the client-side view of a watch.

Events are msgpack-RPC notifications from the daemon (``proto/PROTOCOL.md`` lists every
kind and its fields). A :class:`Event` keeps the kind and the fields, and exposes each field
as an attribute: ``event.kind == "hit"``, ``event.tid``, ``event.fields["ip"]``.
"""

from __future__ import annotations

from typing import Any, Self

__all__ = ["Event", "WatchInfo"]


class Event:
    """One event from the daemon: ``.kind`` plus its fields, as attributes and in ``.fields``."""

    __slots__ = ("fields", "kind")

    def __init__(self, kind: str, fields: dict[str, Any]) -> None:
        self.kind = kind
        self.fields = fields

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not slots: the event's fields.
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.kind!r} event has no field {name!r}") from None

    def get(self, name: str, default: Any = None) -> Any:
        """The field ``name``, or ``default`` if this event has no such field."""
        return self.fields.get(name, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.kind == other.kind and self.fields == other.fields

    def __hash__(self) -> int:
        return hash(self.kind)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"Event({self.kind!r}, {inner})" if inner else f"Event({self.kind!r})"


# How an event about a watch changes its state when the event does not say it outright.
_STATE_AFTER = {
    "installed": "installed",
    "uninstalled": "pending",
    "exit": "ended",
    "exec": "ended",
    "removed": "removed",
}


class WatchInfo:
    """A watch as the client knows it: what was asked, and its state as last reported.

    ``state`` is what the ``watch`` call answered (e.g. ``"installed"`` or ``"pending"``)
    and is updated, in order, by the events that arrive for it (as they arrive, also while
    a call waits for its answer): ``installed``/``uninstalled``, and ``exit``/``exec`` of its
    process, after which it is ``"ended"``; ``reason`` is the last uninstall reason
    (``"preempted"``, ``"busy"``, ...). ``threads`` maps a thread id to that thread's state,
    for process-scope watches. ``ended`` is ``None``, or once the watch ended ``{"reason":
    "exit" | "exec" | "thread-exit", "code": exit status or None, "signal": the signal that
    killed the process or None}``. The daemon keeps an ended watch, and its final count,
    until it is removed or the client disconnects.
    """

    def __init__(
        self,
        result: dict[str, Any],
        *,
        pid: int,
        addr: int,
        length: int,
        access: str,
        mode: str,
        tid: int | None,
        priority: int,
        condition: str | None = None,
    ) -> None:
        self._fill(result, pid, addr, length, access, mode, tid, priority, condition)

    #: The front end that made it (``Watch``: a ``Client``; ``AsyncWatch``: an ``AsyncClient``).
    _client: Any

    @classmethod
    def _made(cls, client: Any, result: dict[str, Any], *spec: Any) -> Self:
        """``cls(client, result, pid=..., ...)`` with ``spec`` positional, in :meth:`_fill`'s
        order: how the clients' ``watch`` builds its watch (the request path, issue 13)."""
        watch = cls.__new__(cls)
        watch._client = client
        watch._fill(result, *spec)
        return watch

    def _fill(
        self,
        result: dict[str, Any],
        pid: int,
        addr: int,
        length: int,
        access: str,
        mode: str,
        tid: int | None,
        priority: int,
        condition: str | None,
    ) -> None:
        """Set every attribute from the ``watch`` answer and what was asked; positional, so
        the clients' ``watch`` (the request path, issue 13) can build a watch without
        packing and unpacking keywords twice (a third of its cost, measured)."""
        self.id: int = result["id"]
        self.state: str = result.get("state", "unknown")
        self.reason: str | None = result.get("reason")
        threads = result.get("threads") or {}
        self.threads: dict[int, Any] = (
            dict(threads) if isinstance(threads, dict) else {t: None for t in threads}
        )
        self.pid = pid
        self.tid = tid
        self.addr = result.get("addr", addr)
        self.length = result.get("length", length)
        self.access = access
        self.mode = mode
        self.priority = priority
        self.ended: dict[str, Any] | None = result.get("ended")
        self.condition = condition

    def _apply(self, event: Event) -> None:
        """Update the state from an event about this watch (called by the session)."""
        state = event.fields.get("state") or _STATE_AFTER.get(event.kind)
        if event.kind == "uninstalled" and event.fields.get("reason") == "thread-exit":
            state = "ended"
            self.ended = {"reason": "thread-exit", "code": None, "signal": None}
        elif event.kind in ("exit", "exec"):
            fields = event.fields
            self.ended = {
                "reason": event.kind,
                "code": fields.get("code"),
                "signal": fields.get("signal"),
            }
        if state is None:
            return
        tid = event.fields.get("tid")
        if tid is not None and event.kind in ("installed", "uninstalled"):
            self.threads[tid] = state
        self.state = state
        if "reason" in event.fields:
            self.reason = event.fields["reason"]

    def __repr__(self) -> str:
        scope = f"tid {self.tid}" if self.tid is not None else "process"
        return (
            f"<{type(self).__name__} {self.id} pid {self.pid} {scope} {self.addr:#x}/"
            f"{self.length} {self.access} {self.mode} {self.state}>"
        )
