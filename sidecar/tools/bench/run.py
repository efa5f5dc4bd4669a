"""One mode from start to finish: start the workers, watch them, stop stragglers, sum up."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TextIO

from sidecar.tools.bench.plan import ConnectionMode, Plan
from sidecar.tools.bench.progress import ProgressLine, progress_text
from sidecar.tools.bench.summary import ModeResult, summarize
from sidecar.tools.bench.target_metrics import HandshakeCost, pid_cpu, scrape
from sidecar.tools.bench.worker import Budget, Worker

PROGRESS_EVERY = 0.25  # seconds between progress-line updates (and abort checks)
# After the deadline, a request in flight may still spend connect + handshake + read
# timeouts; joining waits that long (plus slack) and then reports stragglers.
JOIN_STEPS = 3


def run_mode(
    plan: Plan, ctx: ssl.SSLContext, mode: ConnectionMode, err: TextIO
) -> tuple[ModeResult, bool]:
    """Run one mode; the flag says it was interrupted (Ctrl-C) and no more should run."""
    plan = plan.for_mode(mode)
    budget = Budget(plan.requests, plan.duration, plan.rate)
    workers = [Worker(plan, ctx, mode, budget) for _ in range(plan.concurrency)]
    if mode is ConnectionMode.RESUME:
        for w in workers:  # before the counters are read: these handshakes are not counted
            w.prime()
    before = _server_counters(plan)
    started = time.monotonic()
    budget.start()
    # Daemons: a worker that outlives even `abort` must not keep the process alive.
    threads = [threading.Thread(target=w.run, name=f"bench-{mode}-{i}", daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    interrupted = False
    try:
        _watch(plan, mode, started, workers, threads, budget, err)
    except KeyboardInterrupt:
        interrupted = True
        budget.stop.set()
        _watch(plan, mode, started, workers, threads, budget, err)
    seconds = time.monotonic() - started
    stragglers = sum(t.is_alive() for t in threads)
    if stragglers:
        print(f"sidecar bench: {mode}: {stragglers} workers were still blocked after their "
              "timeouts; their counts so far are included", file=err)
    server: HandshakeCost | None = None
    after = _server_counters(plan)
    if isinstance(before, HandshakeCost) and isinstance(after, HandshakeCost):
        server = after - before
    elif before is not None:
        why = before if isinstance(before, str) else after
        print(f"sidecar bench: {mode}: no server CPU: {why}", file=err)
    result = summarize(mode, [w.tally for w in workers], seconds, server,
                       per_connection=plan.per_connection, rate=plan.rate,
                       label=_label(plan, mode))
    return result, interrupted


def _label(plan: Plan, mode: ConnectionMode) -> str | None:
    """--plain's full mode is `plain` unless --resumed-target makes it one of two."""
    if plan.plain and mode is ConnectionMode.FULL and plan.resumed_target is None:
        return "plain"
    return None


def _server_counters(plan: Plan) -> HandshakeCost | str | None:
    """The target's counters now (--target-metrics), its process CPU from /proc when
    --target-pid names it (summed over each); None when neither was asked for, a line
    saying why on failure."""
    counters: HandshakeCost | str | None = None
    if plan.metrics_url:
        counters = scrape(plan.metrics_url, plan.timeout)
    if not plan.target_pids or isinstance(counters, str):
        return counters
    total = 0.0
    for pid in plan.target_pids:
        cpu = pid_cpu(pid)
        if isinstance(cpu, str):
            return cpu
        total += cpu
    return replace(counters or HandshakeCost(), process_cpu=total)


def _watch(plan: Plan, mode: ConnectionMode, started: float, workers: Sequence[Worker],
           threads: Sequence[threading.Thread], budget: Budget, err: TextIO) -> None:
    """Wait for the workers, drawing the progress line; end stragglers at the hard stop."""
    hard_stop = started + plan.duration + JOIN_STEPS * plan.timeout + 1.0
    progress = ProgressLine(err)
    while alive := [t for t in threads if t.is_alive()]:
        if time.monotonic() >= hard_stop:
            budget.stop.set()
            for w, t in zip(workers, threads, strict=True):
                if t.is_alive():
                    w.abort()
            for t in alive:
                t.join(1.0)
            break
        alive[0].join(PROGRESS_EVERY)  # returns early when the workers are done
        if plan.progress:
            elapsed = time.monotonic() - started
            progress.show(progress_text(mode, elapsed, [w.tally for w in workers]))
    progress.clear()
