"""Hot reload: file events, SIGHUP and an interval -> new snapshots, swapped whole.

Where reloads come from:
- inotify on the *directories* holding the files, not the files: a Kubernetes secret
  volume replaces its files by renaming a new `..data` symlink over the old one, which a
  watch on the file path never sees; spiffe-helper rewrites in place; csi-driver-spiffe
  renames temp files into place. Every layout shows up as some event in the directory.
  The inotify descriptor is read on the event loop: nothing polls, so an idle process
  does not wake up for it (watchfiles, before, ran a thread that looked every 100 ms).
- SIGHUP, always (server.py).
- `identity.reload_interval`, a backstop for a missed event.

A set of files caught mid-write (a new cert with the old key) fails validation; it is
retried a few times over about two seconds and never served. If it stays bad, the old
snapshot stays in force, the error names the file, and `sidecar_reloads_total{result=
"error"}` counts it, under the kind of the file at fault (svid, bundle, crl, policy).

Loading runs in a thread: a 10,000-rule policy takes half a second to parse, and the
loop must keep serving meanwhile. Each load gets a daemon thread of its own and at most
LOAD_TIMEOUT: a file that blocks (a FIFO is refused by files.py before it can; a regular
file on a hung NFS mount cannot be) is abandoned with a logged, counted error, the next
rotation is tried again, and the process still exits. Not `asyncio.to_thread`: the
default executor's threads are joined at exit (by `asyncio.run`, then by
`concurrent.futures` at interpreter exit), so one read that never returns would keep
the process alive after SIGTERM. A daemon thread is never joined; a process exit ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import inotify_simple

from sidecar.observe import logs, metrics
from sidecar.problems import Problem, ProblemsError
from sidecar.times import rfc3339

# Retries of a set that does not validate: spiffe-helper's three writes land within
# milliseconds of each other, so a few short waits cover a rotation caught halfway.
RETRY_DELAYS = (0.1, 0.3, 0.6, 1.0)
START = "start"  # the trigger of the re-read right after the watch began
# Group a burst of file events (three files, a symlink swap) into one reload.
WATCH_STEP_MS = 100
WATCH_DEBOUNCE_MS = 1000
# A load reads a few small files and parses them: milliseconds, half a second for a
# 10,000-rule policy. Twenty times that is no slow disk but a read that hangs.
LOAD_TIMEOUT = 10.0
# Abandoned loads still blocked, per kind, before no new one is started: a file that
# hung once may be back (and the next rotation must apply), but a mount that stays hung
# must not collect one stuck thread per reload.
MAX_STUCK_LOADS = 4


class LoadStuckError(ProblemsError):
    """A load ran past its time bound and was abandoned (not retried: each retry would
    leave one more thread stuck on the same file)."""


class BoundedLoad[T]:
    """One load in a daemon thread of its own, awaited for at most `timeout` seconds."""

    def __init__(self, load: Callable[[], T], what: str, timeout: float) -> None:
        self._load = load
        self.what = what  # the files, for the error message
        self.timeout = timeout
        self.started = 0.0
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def result(self) -> T:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(value: T | None, exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(value)  # type: ignore[arg-type]

        def run() -> None:
            value: T | None = None
            error: BaseException | None = None
            try:
                value = self._load()
            except BaseException as exc:  # handed to the awaiting task, which decides
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop closed while we were stuck
                loop.call_soon_threadsafe(settle, value, error)

        self.started = time.monotonic()
        self._thread = threading.Thread(target=run, name="sidecar-load", daemon=True)
        self._thread.start()
        try:
            async with asyncio.timeout(self.timeout):
                return await done
        except TimeoutError:
            raise LoadStuckError([Problem(self.what, (
                f"loading took longer than {self.timeout:g}s and was abandoned: is one of "
                "these files on a network file system that hangs, or a special file? The "
                "previous snapshot stays in force"))]) from None

    def still_stuck(self) -> LoadStuckError:
        ago = time.monotonic() - self.started
        return LoadStuckError([Problem(self.what, (
            f"loads abandoned since {ago:.0f}s ago have still not returned; not starting "
            "another on the same files until one does"))])


async def load_bounded[T](load: Callable[[], T], what: str,
                          timeout: float = LOAD_TIMEOUT) -> T:
    """`load()` in a daemon thread, abandoned (LoadStuckError) after `timeout` seconds."""
    return await BoundedLoad(load, what, timeout).result()


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
        *,
        parts: Callable[[object, object], Collection[str]] | None = None,
        kind_of: Mapping[str, str] | None = None,
        timeout: float = LOAD_TIMEOUT,
    ) -> None:
        self.kind = kind  # the `kind` label of sidecar_reloads_total
        self.paths = tuple(paths)
        self._load = load  # runs in a thread; raises ProblemsError
        self._swap = swap  # runs on the loop; False when nothing changed
        # Which kinds a change is counted as: parts(old, new) (an identity reload can be
        # a new SVID, a new bundle, a new CRL); kind_of: the kind of a problem's place (the
        # YAML key naming the file at fault).
        self._parts = parts
        self._kind_of = dict(kind_of or {})
        self._last: object | None = None
        self._timeout = timeout
        self._stuck: list[BoundedLoad[object]] = []  # abandoned, still blocked
        self._lock = asyncio.Lock()
        self.last: Outcome | None = None
        self.on_done: Callable[[], None] = lambda: None  # after each reload, ok or not

    async def reload(self, why: str) -> bool:
        """Load, validate, swap; retry a set caught mid-write. True when swapped or same."""
        try:
            return await self._reload(why)
        finally:
            self.on_done()

    def watches(self, changed: Path) -> bool:
        """Is a change at this path (in a watched dir) one of ours?"""
        for p in self.paths:
            if changed.parent == p.parent and (changed.name == p.name
                                               or changed.name.startswith("..")):
                return True
        return False

    async def _reload(self, why: str) -> bool:
        async with self._lock:
            last: ProblemsError | None = None
            for delay in (0.0, *RETRY_DELAYS):
                if delay:
                    await asyncio.sleep(delay)
                try:
                    snapshot = await self._load_once()
                except LoadStuckError as exc:
                    last = exc
                    break
                except ProblemsError as exc:
                    last = exc
                    continue
                old, self._last = self._last, snapshot
                changed = self._swap(snapshot)
                if changed:
                    kinds = (self._parts(old, snapshot) if self._parts and old is not None
                             else ()) or (self.kind,)
                    for kind in kinds:
                        metrics.reloads.labels(kind, "ok").inc()
                self.last = Outcome("ok", dt.datetime.now(dt.UTC), why, changed)
                said = "new files in force" if changed else "nothing changed"
                if why == START and not changed:
                    # The re-read that closes the gap before the watch began: the usual case.
                    said = "files re-read once the watch began, the same as first loaded"
                logs.event(logging.INFO, f"{self.kind} reload: ok, {said}",
                           kind=self.kind, trigger=why, result="ok", changed=changed)
                return True
            assert last is not None
            for kind in self._kinds_at_fault(last):
                metrics.reloads.labels(kind, "error").inc()
            error = "; ".join(str(p) for p in last.problems)
            self.last = Outcome("error", dt.datetime.now(dt.UTC), why, False,
                                error[:STATUS_ERROR_CHARS])
            logs.event(logging.ERROR, f"{self.kind} reload failed; the previous one stays in "
                       "force", kind=self.kind, trigger=why, result="error",
                       problems=[str(p) for p in last.problems])
            return False

    async def _load_once(self) -> object:
        self._stuck = [b for b in self._stuck if b.running]
        if len(self._stuck) >= MAX_STUCK_LOADS:
            raise self._stuck[0].still_stuck()
        load = BoundedLoad(self._load, ", ".join(str(p) for p in self.paths), self._timeout)
        try:
            return await load.result()
        except LoadStuckError:
            self._stuck.append(load)
            raise

    def _kinds_at_fault(self, error: ProblemsError) -> list[str]:
        kinds = {self._kind_of.get(p.where, self.kind) for p in error.problems}
        return sorted(kinds) or [self.kind]


# What a change in a watched directory shows up as: a file written in place
# (spiffe-helper), renamed into place (csi-driver-spiffe, the `..data` symlink swap of a
# Kubernetes secret volume), created, removed, or its mode changed; and the directory
# itself going away.
WATCH_MASK = (inotify_simple.flags.CREATE | inotify_simple.flags.DELETE
              | inotify_simple.flags.MODIFY | inotify_simple.flags.CLOSE_WRITE
              | inotify_simple.flags.MOVED_FROM | inotify_simple.flags.MOVED_TO
              | inotify_simple.flags.ATTRIB | inotify_simple.flags.DELETE_SELF
              | inotify_simple.flags.MOVE_SELF)


class Bursts:
    """inotify events of some directories, read on the loop (a reader on the inotify
    descriptor: no thread, no timer while nothing changes), grouped into bursts. A burst
    ends WATCH_STEP_MS after its last event, or WATCH_DEBOUNCE_MS after its first. Only
    `wanted` paths count: a log or a dump written next to the policy arms no timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, dirs: Iterable[Path],
                 wanted: Callable[[Path], bool]) -> None:
        self._loop = loop
        self._wanted = wanted  # other files in these directories start no burst
        self._notify = inotify_simple.INotify(nonblocking=True)
        self._dirs: dict[int, Path] = {}
        try:
            for d in dirs:
                self._dirs[self._notify.add_watch(d, WATCH_MASK)] = d
        except OSError:
            self._notify.close()
            raise
        self._paths: set[Path] = set()
        self._overflow = False  # the kernel dropped events: anything may have changed
        self._first = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.ended = asyncio.Event()
        loop.add_reader(self._notify.fileno(), self._read)

    @property
    def armed(self) -> bool:
        """A burst has begun and its end is timed."""
        return self._timer is not None

    def _read(self) -> None:
        now = self._loop.time()
        for event in self._notify.read(timeout=0):
            if event.mask & inotify_simple.flags.Q_OVERFLOW:
                self._overflow = True
                continue
            d = self._dirs.get(event.wd)
            if d is None:
                continue
            if event.mask & inotify_simple.flags.IGNORED:  # removed, moved or unmounted
                del self._dirs[event.wd]
                logs.event(logging.WARNING, f"no longer watching {d}: it was removed or "
                           "unmounted; SIGHUP and identity.reload_interval still reload",
                           directory=str(d))
                continue
            path = d / event.name if event.name else d
            if self._wanted(path):
                self._paths.add(path)
        if not self._paths and not self._overflow:
            return
        if self._timer is None:
            self._first = now
        else:
            self._timer.cancel()
        wait = min(WATCH_STEP_MS, self._first * 1000 + WATCH_DEBOUNCE_MS - now * 1000)
        self._timer = self._loop.call_later(max(0.0, wait / 1000), self._end)

    def _end(self) -> None:
        self._timer = None
        self.ended.set()

    def take(self) -> tuple[set[Path], bool]:
        """The paths of the bursts that ended, and whether events were lost."""
        paths, overflow = self._paths, self._overflow
        self._paths, self._overflow = set(), False
        self.ended.clear()
        return paths, overflow

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._notify.fileno())
        self._notify.close()


async def watch(reloadables: list[Reloadable], stop: asyncio.Event) -> None:
    """Reload whichever kinds a burst of file events touched, until stop is set. The
    watches are in place when this coroutine first yields (server.py's catch-up counts
    on it)."""
    dirs = sorted({p.parent for r in reloadables for p in r.paths})
    existing = [d for d in dirs if d.is_dir()]
    if not existing:
        return
    try:
        bursts = Bursts(asyncio.get_running_loop(), existing,
                        lambda path: any(r.watches(path) for r in reloadables))
    except OSError as exc:  # the inotify limits (fs.inotify.max_user_watches, ...)
        logs.event(logging.ERROR, f"cannot watch {', '.join(map(str, existing))}: {exc}; "
                   "SIGHUP and identity.reload_interval still reload", error=str(exc))
        return
    stopping = asyncio.ensure_future(stop.wait())
    ended: asyncio.Future[Any] | None = None
    try:
        while True:
            ended = asyncio.ensure_future(bursts.ended.wait())
            await asyncio.wait((ended, stopping), return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                return
            touched, lost = bursts.take()
            for r in reloadables:
                if lost or any(r.watches(p) for p in touched):
                    await r.reload("file change")
    finally:
        for fut in (stopping, ended):
            if fut is not None:
                fut.cancel()
        bursts.close()


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
