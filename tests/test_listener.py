"""Listening and dialing: a paused listener leaves peers in the kernel's backlog and says
so; binding and dialing say what failed and where (issue 16, item 7)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

import pytest
from orchestrators import Held, fresh_name, holding, sample, until

from sidecar.config import Address
from sidecar.proxy.listener import BACKLOG_SAMPLE_EVERY, Listener, dial

pytestmark = pytest.mark.timeout(30)


def test_a_dial_timeout_says_how_long_it_waited(run: Callable[..., Any]) -> None:
    """A listener whose accept queue is full drops new SYNs: the dial can only time out."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        queued = []
        try:
            for _ in range(8):  # bounded: fill the queue until a connect stops completing
                c = socket.socket()
                c.settimeout(0.2)
                queued.append(c)
                if c.connect_ex(("127.0.0.1", port)) != 0:
                    break

            async def attempt() -> str:
                try:
                    sock = await dial(Address("127.0.0.1", port), 0.3)
                except TimeoutError as exc:
                    return f"cannot reach 127.0.0.1:{port}: {exc}"
                sock.close()
                return "connected"

            said = run(attempt())
        finally:
            for c in queued:
                c.close()
    if said == "connected":
        pytest.skip("this kernel accepted past a full backlog")
    assert said == f"cannot reach 127.0.0.1:{port}: timed out after 0.3s"


def test_a_paused_listener_leaves_peers_in_the_backlog_and_shows_them(
    run: Callable[..., Any],
) -> None:
    name = fresh_name("lst-pause")
    labels = {"direction": "inbound", "listener": name}

    async def body(held: Held) -> None:
        accepted: list[str] = []

        def on_accept(sock: socket.socket, peer: str) -> None:
            held.append(sock)
            accepted.append(peer)

        lst = Listener(asyncio.get_running_loop(), name, "inbound", Address("127.0.0.1", 0),
                       on_accept)
        held.append(lst)
        lst.resume()
        held.append(socket.create_connection(("127.0.0.1", lst.port)))
        await until(lambda: len(accepted) == 1, "the first accept")
        lst.pause()
        assert sample("sidecar_listener_paused", **labels, reason="max_connections") == 1
        waiting = socket.create_connection(("127.0.0.1", lst.port))  # the kernel completes it
        held.append(waiting)
        await until(lambda: sample("sidecar_listener_backlog", **labels) == 1,
                    "the backlog gauge to show the waiting peer",
                    budget=BACKLOG_SAMPLE_EVERY + 2)
        assert len(accepted) == 1  # it waits in the kernel's queue, not accepted
        lst.resume()
        assert sample("sidecar_listener_paused", **labels, reason="max_connections") == 0
        assert sample("sidecar_listener_backlog", **labels) == 0
        await until(lambda: len(accepted) == 2, "the waiting peer to be accepted")
        host, port = waiting.getsockname()[:2]
        assert accepted[1] == f"{host}:{port}"

    run(holding(body))


def test_a_port_in_use_is_refused_with_the_kernels_reason(run: Callable[..., Any]) -> None:
    """`run` names the listener and the address around this error (server.py; covered
    through a whole process by tests/test_server.py)."""

    async def body(held: Held) -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        held.append(taken)
        with pytest.raises(OSError) as caught:
            Listener(asyncio.get_running_loop(), "in", "inbound",
                     Address("127.0.0.1", taken.getsockname()[1]), lambda s, a: None)
        assert caught.value.errno == errno.EADDRINUSE

    run(holding(body))


def test_a_refused_dial_names_the_address(run: Callable[..., Any]) -> None:
    async def attempt(held: Held) -> None:
        closed = socket.socket()  # bound, not listening: a connect is refused
        held.append(closed)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(OSError) as caught:
            await dial(Address("127.0.0.1", port), 1.0)
        assert str(caught.value) == (
            f"[Errno {errno.ECONNREFUSED}] connect to 127.0.0.1:{port} failed: "
            "Connection refused")

    run(holding(attempt))
