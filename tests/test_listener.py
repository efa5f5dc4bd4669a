"""Dialing and binding say what failed and where (issue 16, item 7)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.config import Address
from sidecar.proxy.listener import dial

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
