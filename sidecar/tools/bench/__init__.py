"""The pieces of `sidecar bench`; sidecar/tools/bench/command.py is the command that joins them.

plan (modes, the checked Plan, the request; pure), arguments (the command line -> Plan and
the client's SSLContext), failures (each failed request as a kind and one line), worker
(one thread's connections and requests), target_metrics (the target's /metrics),
summary (tallies -> one row per mode; pure), progress (the stderr line), run (one mode,
start to finish), sweep (--sweep and its break-even point), render (table, cost sentence,
JSON, error lines), plot (--plot), echo (`sidecar bench echo`, a target).
"""
