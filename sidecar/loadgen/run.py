"""One mode from start to finish: start the workers, watch them, stop stragglers, sum up."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from sidecar.loadgen.plan import Mode, Plan
from sidecar.loadgen.progress import ProgressLine, progress_text
from sidecar.loadgen.summary import ModeResult, summarize
from sidecar.loadgen.target_metrics import HandshakeCost, scrape
from sidecar.loadgen.worker import Budget, Worker

PROGRESS_EVERY = 0.25  # seconds between progress-line updates (and abort checks)
# After the deadline, a request in flight may still spend connect + handshake + read
# timeouts; joining waits that long (plus slack) and then reports stragglers.
JOIN_STEPS = 3


def run_mode(
    plan: Plan, ctx: ssl.SSLContext, mode: Mode, err: TextIO
) -> tuple[ModeResult, bool]:
    """Run one mode; the flag says it was interrupted (Ctrl-C) and no more should run."""
    before = scrape(plan.metrics_url, plan.timeout) if plan.metrics_url else None
    started = time.monotonic()
    budget = Budget(plan.requests, started + plan.duration)
    workers = [Worker(plan, ctx, mode, budget) for _ in range(plan.concurrency)]
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
    if plan.metrics_url:
        after = scrape(plan.metrics_url, plan.timeout)
        if isinstance(before, HandshakeCost) and isinstance(after, HandshakeCost):
            server = after - before
        else:
            why = before if isinstance(before, str) else after
            print(f"sidecar bench: {mode}: no server CPU: {why}", file=err)
    return summarize(mode, [w.tally for w in workers], seconds, server), interrupted


def _watch(plan: Plan, mode: Mode, started: float, workers: Sequence[Worker],
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
