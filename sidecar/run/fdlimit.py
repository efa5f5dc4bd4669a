"""The open-file limit: each proxied connection holds two descriptors."""

from __future__ import annotations

import logging
import resource

from sidecar.observe import logs

RESERVE = 64  # descriptors for listeners, the admin port, files, the watcher, logs


def raise_limit() -> int:
    """Raise this process's soft limit to the hard one; the soft limit now in force
    (RLIM_INFINITY when unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def shortfall(max_connections: int, limit: int) -> str | None:
    """Why `max_connections` cannot fit under `limit` open files (the limit is per process:
    the connections past it would fail to open), or None."""
    needed = 2 * max_connections + RESERVE
    if limit == resource.RLIM_INFINITY or needed <= limit:
        return None
    fits = max(0, (limit - RESERVE) // 2)
    return (f"{max_connections} connections need ~{needed} open files, but this process "
            f"may open {limit}: about {fits} fit; lower max_connections or raise the limit "
            "(ulimit -n)")


def raise_for(max_connections: int) -> None:
    """Raise the limit, and warn when `max_connections` still cannot fit."""
    limit = raise_limit()
    why = shortfall(max_connections, limit)
    if why is not None:
        logs.event(logging.WARNING, f"limits.max_connections: {why}", fd_limit=limit,
                   connections_that_fit=max(0, (limit - RESERVE) // 2))
