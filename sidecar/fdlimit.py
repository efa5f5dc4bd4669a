"""The open-file limit: each proxied connection holds two descriptors."""

from __future__ import annotations

import logging
import resource

from sidecar import logs

RESERVE = 64  # descriptors for listeners, the admin port, files, the watcher, logs


def raise_for(max_connections: int) -> None:
    """Raise the soft limit to the hard one, and say so when `max_connections` still
    cannot fit (the limit is per process: the connections past it would fail to open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = 2 * max_connections + RESERVE
    if soft != resource.RLIM_INFINITY and needed > soft:
        fits = max(0, (soft - RESERVE) // 2)
        logs.event(logging.WARNING, f"limits.max_connections {max_connections} needs "
                   f"~{needed} open files, but this process may open {soft}: about {fits} "
                   "connections fit; lower max_connections or raise the limit (ulimit -n)",
                   fd_limit=soft, connections_that_fit=fits)
