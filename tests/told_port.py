"""A server process that must be told its port (openssl s_server cannot report a port 0
binding on every version): started on a port the kernel just gave out, and started again
on another if it exits before it listens, because another process took that port in the
moment between our close and its bind (a loaded, shared machine runs many servers)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

import pytest

START_TIMEOUT = 20.0  # spawning a process on a loaded machine, not a hang
ATTEMPTS = 3


def free_port() -> int:
    """A port the kernel just gave out; nothing holds it once this returns."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _listening(proc: subprocess.Popen[bytes], port: int, deadline: float, what: str) -> bool:
    """True once `port` accepts a connection while `proc` runs; False if `proc` exited."""
    while proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                pytest.fail(f"{what} did not listen on {port} in {START_TIMEOUT:.0f} s")
            threading.Event().wait(0.02)
    return False


def start_listening(command: Callable[[int], Sequence[str]], what: str,
                    **popen: object) -> tuple[subprocess.Popen[bytes], int]:
    """Start `command(port)` until one listens; the caller stops the process it returns.
    Its probe is one accepted connection: a server counting its accepts sees it."""
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(ATTEMPTS):
        port = free_port()
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            list(command(port)), **popen)
        if _listening(proc, port, deadline, what):
            return proc, port
    pytest.fail(f"{what} exited before listening {ATTEMPTS} times; last on port {port}")
