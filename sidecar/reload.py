"""Hot reload: file events, SIGHUP and an interval -> new snapshots, swapped whole.

Where reloads come from:
- watchfiles on the *directories* holding the files, not the files: a Kubernetes secret
  volume replaces its files by renaming a new `..data` symlink over the old one, which a
  watch on the file path never sees; spiffe-helper rewrites in place; csi-driver-spiffe
  renames temp files into place. Every layout shows up as some event in the directory.
- SIGHUP, always (server.py).
- `identity.reload_interval`, a backstop for a missed event.

A set of files caught mid-write (a new cert with the old key) fails validation; it is
retried a few times over about two seconds and never served. If it stays bad, the old
snapshot stays in force, the error names the file, and `sidecar_reloads_total{result=
"error"}` counts it. Loading runs in a thread: a 10,000-rule policy takes half a second
to parse, and the loop must keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from sidecar import logs, metrics
from sidecar.problems import ProblemsError
from sidecar.times import rfc3339

# Retries of a set that does not validate: spiffe-helper's three writes land within
# milliseconds of each other, so a few short waits cover a rotation caught halfway.
RETRY_DELAYS = (0.1, 0.3, 0.6, 1.0)
# Group a burst of file events (three files, a symlink swap) into one reload.
WATCH_STEP_MS = 100
WATCH_DEBOUNCE_MS = 1000


# A reload error as /status shows it: the first problems, not a 10,000-rule policy's list.
STATUS_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the last reload of one kind ended, for /status."""

    result: str  # ok | error (the `result` label of sidecar_reloads_total)
    at: dt.datetime
    trigger: str  # start, SIGHUP, file change, interval
    changed: bool  # ok: a new snapshot was swapped in (False: the files were the same)
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"result": self.result, "at": rfc3339(self.at), "trigger": self.trigger,
                "changed": self.changed, "error": self.error}


class Reloadable:
    """One kind of snapshot (identity or policy): how to load it and how to swap it in."""

    def __init__(
        self,
        kind: str,
        paths: Iterable[Path],
        load: Callable[[], object],
        swap: Callable[[object], bool],
    ) -> None:
        self.kind = kind  # the `kind` label of sidecar_reloads_total
        self.paths = tuple(paths)
        self._load = load  # runs in a thread; raises ProblemsError
        self._swap = swap  # runs on the loop; False when nothing changed
        self._lock = asyncio.Lock()
        self.last: Outcome | None = None

    def watches(self, changed: Path) -> bool:
        """Is a change at this path (in a watched dir) one of ours?"""
        for p in self.paths:
            if changed.parent == p.parent and (changed.name == p.name
                                               or changed.name.startswith("..")):
                return True
        return False

    async def reload(self, why: str) -> bool:
        """Load, validate, swap; retry a set caught mid-write. True when swapped or same."""
        async with self._lock:
            last: ProblemsError | None = None
            for delay in (0.0, *RETRY_DELAYS):
                if delay:
                    await asyncio.sleep(delay)
                try:
                    snapshot = await asyncio.to_thread(self._load)
                except ProblemsError as exc:
                    last = exc
                    continue
                changed = self._swap(snapshot)
                if changed:
                    metrics.reloads.labels(self.kind, "ok").inc()
                self.last = Outcome("ok", dt.datetime.now(dt.UTC), why, changed)
                logs.event(logging.INFO, f"{self.kind} reload: ok, "
                           + ("new files in force" if changed else "nothing changed"),
                           kind=self.kind, trigger=why, result="ok", changed=changed)
                return True
            assert last is not None
            metrics.reloads.labels(self.kind, "error").inc()
            error = "; ".join(str(p) for p in last.problems)
            self.last = Outcome("error", dt.datetime.now(dt.UTC), why, False,
                                error[:STATUS_ERROR_CHARS])
            logs.event(logging.ERROR, f"{self.kind} reload failed; the previous one stays in "
                       "force", kind=self.kind, trigger=why, result="error",
                       problems=[str(p) for p in last.problems])
            return False


async def watch(reloadables: list[Reloadable], stop: asyncio.Event) -> None:
    """Reload whichever kinds a burst of file events touched, until stop is set."""
    dirs = sorted({str(p.parent) for r in reloadables for p in r.paths})
    existing = [d for d in dirs if Path(d).is_dir()]
    if not existing:
        return
    async for changes in watchfiles.awatch(
        *existing, watch_filter=None, debounce=WATCH_DEBOUNCE_MS, step=WATCH_STEP_MS,
        stop_event=stop, recursive=False,
    ):
        touched = {Path(path) for _, path in changes}
        for r in reloadables:
            if any(r.watches(p) for p in touched):
                await r.reload("file change")


async def every(interval: float, reloadables: list[Reloadable], stop: asyncio.Event) -> None:
    """The backstop: reload everything every `interval` seconds."""
    while not stop.is_set():
        try:
            async with asyncio.timeout(interval):
                await stop.wait()
        except TimeoutError:
            for r in reloadables:
                await r.reload("interval")


async def expiry_watch(
    not_after: Callable[[], tuple[dt.datetime, dt.datetime]],
    stop: asyncio.Event,
    check_every: float = 30.0,
) -> None:
    """Warn while less than a third of the SVID's lifetime is left and no newer one came.

    `not_after()` gives (not_before, not_after) of the SVID in use, read each time so a
    rotation silences the warning by itself.
    """
    warned_for: dt.datetime | None = None
    while not stop.is_set():
        nb, na = not_after()
        now = dt.datetime.now(dt.UTC)
        left = na - now
        if left < (na - nb) / 3 and warned_for != na:
            warned_for = na
            logs.event(logging.WARNING, "SVID expires soon and no newer one has arrived; "
                       "is the issuer (spiffe-helper, SPIRE agent, cert-manager) rotating?",
                       not_after=rfc3339(na), seconds_left=int(left.total_seconds()))
        try:
            async with asyncio.timeout(check_every):
                await stop.wait()
        except TimeoutError:
            pass


def spawn_all(coros: Iterable[Awaitable[None]]) -> list[asyncio.Task[None]]:
    return [asyncio.ensure_future(c) for c in coros]
