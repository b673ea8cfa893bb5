"""A closed connection is freed when its last reference goes, not by the cycle collector.

The daemon serves many short connections (the CLI, monitors that come and go). A
connection that is a reference cycle waits for the collector's rare full passes, with its
msgpack unpacker's buffers: the daemon's RSS grew by ~5 MiB per 100 connections until that
was fixed (measured). These tests switch the collector off, so an object that survives
its last reference is in a cycle.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import msgpack
import pytest
import trio

from hwbkpt_proto import Connection, Limits, Request
from hwbkptd._client import ClientHandle


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_connection_that_decoded_messages_is_freed_without_the_collector(
    no_collector: None,
) -> None:
    conn = Connection(Limits())
    conn.receive_data(msgpack.packb([0, 1, "watch", [{"pid": 1, "addr": 8, "tids": [1, 2]}]]))
    assert isinstance(conn.next_message(), Request)
    ref = weakref.ref(conn)
    del conn
    assert ref() is None


class _Server:
    """Stands for the server: its handler is a bound method, as there."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes]] = []

    def handle(self, client: ClientHandle, data: bytes) -> bool:
        self.seen.append((client.id, data))
        return True


def test_a_client_handle_that_handled_data_is_freed_without_the_collector(
    no_collector: None,
) -> None:
    server = _Server()
    client = ClientHandle(7, 1, 0, 0, max_queued_events=10, cancel_scope=trio.CancelScope())
    client._on_data = server.handle
    client._handle(b"\x90")
    assert server.seen == [(7, b"\x90")]
    handle, conn = weakref.ref(client), weakref.ref(client._conn)
    del client
    assert handle() is None
    assert conn() is None
