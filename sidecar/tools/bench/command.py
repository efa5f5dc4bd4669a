"""`sidecar bench`: what a full mTLS handshake costs, what resumption saves, and what
keeping connections open saves, measured from the outside against any mTLS server.

Modes, run one after the other with `--mode all` (the default):
- `full`: a new TCP connection and a full handshake per --per-connection requests (default
  1), no session offered;
- `resume`: the same, offering the session of the same worker's previous connection. In
  TLS 1.3 the ticket arrives after the handshake, with the server's first bytes, so the
  session is taken after a connection's first response. Each worker makes one connection
  before the clock starts, uncounted, so every counted handshake has a session to offer;
- `reuse`: one connection per worker, every request on it (a handshake only at the start,
  or after the server closed it).

`--sweep` answers the question the bench exists for: full and resume at 1, 10, 100 and
1000 requests per connection, CPU per request on both sides, and the break-even point
(sidecar/tools/bench/sweep.py says how it is found). `--rate` runs an open loop: requests are
due at a fixed rate, and a request's latency counts from when it was due, so a target
that stalls is not flattered by a client that waited for it (coordinated omission).
`sidecar bench echo` is a target to run it against (sidecar/tools/bench/echo.py).

The request is a line that reads the same backwards, so the default echo check also passes
against `openssl s_server -rev` (which answers each line reversed; keep --request-bytes
under its 16 KiB buffer). `--no-echo` is for any other server: read until --response-bytes
arrived or the server closed, and compare nothing; in reuse mode such a server must answer
each request with exactly --response-bytes (or close), or requests would read each other's
leftovers. Echo is the default because it is what sits behind a sidecar in a test, and
because it catches a proxy that loses or mangles bytes.

Server CPU comes from the target's own counters (`--target-metrics`), read before and after
each mode. Per handshake: the delta of `sidecar_handshake_cpu_seconds_total` over the delta
of `sidecar_handshakes_total{result="ok"}`, inbound only, split by `resumed`. Per request:
the delta of `process_cpu_seconds_total` (or of /proc/PID/stat with --target-pid) over the
requests that succeeded. Other traffic to the target during the run is counted too, and
the CPU counters include failed handshakes: run it against an otherwise idle target,
without errors.

Always bounded: every socket call waits at most --timeout, and a response trickling in is
cut at twice that; a mode stops taking requests at --duration (or after --requests), and
at its hard stop (--duration plus JOIN_STEPS timeouts) any worker still blocked is woken by
shutting its socket down. A mode in which nothing has succeeded after MAX_FUTILE_ATTEMPTS
attempts stops at once: hammering a target that refuses everything teaches nothing more.
Failures are counted by kind, each with one line that says what happened; the exit code
is 1 only when no request succeeded at all.

This module is the command: it reads the arguments, runs the modes one after the other and
prints the results. The pieces live in sidecar/tools/bench/, one job each: arguments.py (the
command line -> Plan and SSLContext), worker.py (the threads that connect, handshake and
send; why threads and not asyncio is told there), failures.py (what each failure is
called), target_metrics.py (the target's counters), summary.py (tallies -> one row,
pure), run.py and progress.py (one mode and its progress line), sweep.py (the sweep and
its break-even point), render.py and plot.py (the output), echo.py (the echo target).
The names other code uses are importable from here as before.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Sequence
from dataclasses import asdict

from sidecar.tools.bench import echo
from sidecar.tools.bench.arguments import UsageError, build_parser, client_context, make_plan
from sidecar.tools.bench.plan import ConnectionMode, Plan, request_payload
from sidecar.tools.bench.plot import plot
from sidecar.tools.bench.render import cost_note, json_text, report_errors, table
from sidecar.tools.bench.run import run_mode
from sidecar.tools.bench.summary import ModeResult, Tally, percentile_ms, summarize
from sidecar.tools.bench.sweep import BreakEven, break_even, break_even_text, fit, run_sweep
from sidecar.tools.bench.target_metrics import HandshakeCost, handshake_cost, scrape
from sidecar.tools.bench.worker import MAX_FUTILE_ATTEMPTS

# What other code imports from here (cli.py: main; tests/test_bench.py: the rest).
__all__ = [
    "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "MAX_FUTILE_ATTEMPTS", "BreakEven",
    "ConnectionMode", "HandshakeCost", "Tally", "break_even", "fit", "handshake_cost", "main",
    "percentile_ms", "request_payload", "scrape", "summarize",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str]) -> int:
    """`sidecar bench ARGS`: 0 when some request succeeded, 1 when none did, 2 on usage;
    `sidecar bench echo ARGS` runs the echo target instead."""
    if list(argv[:1]) == ["echo"]:
        return echo.main(argv[1:])
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse's own exit: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        plan = make_plan(args)
        ctx = client_context(args)
    except UsageError as exc:
        print(f"sidecar bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.bundle and not plan.plain:
        print("sidecar bench: no --bundle: the server's certificate is not verified",
              file=sys.stderr)
    if plan.sweep:
        results, interrupted = run_sweep(plan, ctx, sys.stderr, run_mode)
    else:
        results, interrupted = _run_modes(plan, ctx)
    if interrupted:
        print("sidecar bench: interrupted; results so far:", file=sys.stderr)
    _print(plan, results)
    report_errors(results, sys.stderr)
    if plan.plot:
        try:
            plot(plan, results, break_even(results) if plan.sweep else [], plan.plot)
        except OSError as exc:
            print(f"sidecar bench: cannot write {plan.plot}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if sum(r.requests for r in results) == 0:
        print(f"sidecar bench: no request to {plan.target} succeeded", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _run_modes(plan: Plan, ctx: ssl.SSLContext) -> tuple[list[ModeResult], bool]:
    results: list[ModeResult] = []
    for mode in plan.modes:
        result, interrupted = run_mode(plan, ctx, mode, sys.stderr)
        results.append(result)
        if interrupted:
            return results, True
    return results, False


def _print(plan: Plan, results: list[ModeResult]) -> None:
    if plan.sweep:
        found = break_even(results)
        if plan.as_json:
            print(json_text(results, [asdict(b) | {"per_connection": round(b.per_connection)}
                                      for b in found]))
            return
        print(table(results, sweep=True))
        note = break_even_text(found)
    elif plan.as_json:
        print(json_text(results))
        return
    else:
        print(table(results))
        note = cost_note(results)
    if note:
        print(note)
