"""An idle `sidecar run` costs nothing (issue 21, item 5).

- With no connection, no thread of the process wakes up: each wake-up of a thread is one
  voluntary context switch (it blocks again right after), read for every thread from
  /proc/PID/task/*/status before and after a window with no traffic. Before, the
  loop-lag probe woke the loop 100 times a second, the sweeper once, and watchfiles'
  thread 10 times. The count does not depend on the machine's load: a busy machine
  delays a wake-up, it does not make one.
- With connections held open and quiet, the sweeper that enforces idle_timeout and
  max_connection_lifetime wakes it once a second, and nothing else does.
- `sidecar run` imports none of the tools (pki, demo, bench, inspect, diagnose, check)
  nor what only they need: each module it imports costs resident memory at start.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import FRONTEND, PAYMENTS, EchoApp, Pki, SidecarFactory, TlsClient, recv_all

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WINDOW = 3.0  # seconds of no traffic measured
QUIET_TIMEOUT = 20.0  # for the lag probe to finish after the last traffic (1.5 s + sweeps)

# Never needed to serve: the tools, and the libraries only they (or nobody) use.
NOT_FOR_RUN = ("sidecar.tools", "watchfiles", "anyio", "grpc", "spiffe", "hdrh",
               "matplotlib", "multiprocessing")


def wakeups(pid: int) -> tuple[int, frozenset[int]]:
    """Voluntary context switches summed over every thread of pid, and the thread ids."""
    total, tids = 0, set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended between the listing and the read
        m = re.search(r"^voluntary_ctxt_switches:\s*(\d+)$", status, re.M)
        assert m is not None, status
        total += int(m[1])
        tids.add(int(task.name))
    return total, frozenset(tids)


def _names(pid: int, tids: frozenset[int]) -> list[str]:
    out = []
    for tid in sorted(tids):
        try:
            out.append(f"{tid} {Path(f'/proc/{pid}/task/{tid}/comm').read_text().strip()}")
        except OSError:
            out.append(f"{tid} (gone)")
    return out


def window(pid: int, seconds: float) -> int:
    """The wake-ups of every thread in `seconds` (the window itself is the wait). No
    thread may start or end meanwhile, or its switches would be missed."""
    before, tids_before = wakeups(pid)
    threading.Event().wait(seconds)
    after, tids_after = wakeups(pid)
    assert tids_after == tids_before, (
        f"threads started {_names(pid, tids_after - tids_before)} or ended "
        f"{sorted(tids_before - tids_after)} in an idle window")
    return after - before


def wait_quiet(pid: int, per_second: int) -> None:
    """Until the last second of the process had at most `per_second` wake-ups and no
    thread started or ended: the work of start-up (the threads that load the files end
    just after "ready") or of the last traffic (the lag probe's linger) is over. Polls
    /proc, not the process."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    seen = [wakeups(pid)]
    while True:
        threading.Event().wait(0.25)
        seen.append(wakeups(pid))
        if len(seen) > 4 and seen[-1][0] - seen[-5][0] <= per_second and len(
                {tids for _, tids in seen[-5:]}) == 1:
            return
        if time.monotonic() > deadline:
            pytest.fail("the sidecar did not settle: wake-ups and threads every 250 ms "
                        f"{[(n, len(t)) for n, t in seen[-12:]]}")


def test_an_idle_sidecar_does_not_wake_up(sidecar: SidecarFactory,
                                          echo_app: Callable[..., EchoApp]) -> None:
    app = echo_app()
    b = sidecar("b", inbound=[{"name": "in", "forward_to": app.address}])
    a = sidecar("a", spiffe_id=FRONTEND, outbound=[
        {"name": "out", "connect_to": f"127.0.0.1:{b.port('in')}", "expect_ids": [PAYMENTS]}])
    for sc in (a, b):
        wait_quiet(sc.pid, per_second=1)
        # At most the sweeper's one tick armed at start (it then finds nothing to sweep):
        # before, ~100 a second from the loop-lag probe and ~10 from the file watcher.
        got = window(sc.pid, WINDOW)
        assert got <= 1, f"sidecar {sc.name}: {got} wake-ups in {WINDOW:g} s with no traffic"


def test_idle_connections_wake_it_once_a_second(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], ca: Pki, tls_client: TlsClient
) -> None:
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])
    ctx = tls_client.context(ca.svid(FRONTEND))
    held = []
    try:
        for i in range(3):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.port("in")),
                                                         timeout=10))
            held.append(s)
            s.sendall(b"hello %d" % i)
            assert recv_all(s, 7) == b"hello %d" % i
        wait_quiet(b.pid, per_second=2)
        got = window(b.pid, WINDOW)
        # The sweeper: one a second (a window may hold one tick more than its length).
        assert got <= WINDOW + 1, f"{got} wake-ups in {WINDOW:g} s, connections held quiet"
        for i, s in enumerate(held):  # still served
            s.sendall(b"again %d" % i)
            assert recv_all(s, 7) == b"again %d" % i
    finally:
        for s in held:
            s.close()


def test_run_imports_none_of_the_tools(sidecar: SidecarFactory,
                                       echo_app: Callable[..., EchoApp],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every module imported from start to ready (and on to the stop), as Python's
    `-X importtime` reports them on stderr."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}],
                outbound=[{"name": "out", "connect_to": "127.0.0.1:9", "expect_ids": [PAYMENTS]}])
    b.stop()
    imported = {ln["raw"].rsplit("|", 1)[1].strip() for ln in b.lines
                if ln.get("raw", "").startswith("import time:") and "|" in ln["raw"]}
    assert "sidecar.run.server" in imported, sorted(imported)  # it did see the run path
    assert "sidecar.tools" not in {".".join(m.split(".")[:2]) for m in imported}
    unwanted = sorted(m for m in imported
                      if any(m == n or m.startswith(n + ".") for n in NOT_FOR_RUN))
    assert not unwanted, f"`sidecar run` imports {unwanted}"
