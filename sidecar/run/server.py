"""`sidecar run`: assemble the runtime from a config, serve until told to stop, drain.

Life cycle: load identity (refuse to start without a valid one) and policy (a broken
policy at start means deny everything, loudly), bind every listener (a port in use is
fatal: a sidecar half-listening is worse than one that fails its rollout), then serve.
SIGTERM or SIGINT starts a drain: stop accepting, let live connections finish until
`drain_timeout`, close what is left, exit 0. A second signal ends the drain at once.
SIGHUP reloads the identity and the policy, as file changes do (sources/watch.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from sidecar.config import Config, KtlsMode, ListenerProtocol, SessionStore
from sidecar.identity import Identity
from sidecar.observe import admin, logs, metrics
from sidecar.outcomes import KtlsState
from sidecar.policy import Policy
from sidecar.proxy import http, inbound, outbound
from sidecar.proxy.connection import Tracker
from sidecar.proxy.listener import Listener
from sidecar.proxy.runtime import Runtime
from sidecar.run import fdlimit, lifecycle, preflight, snapshots, status
from sidecar.run.drain import Drain
from sidecar.run.workers import WorkerRole
from sidecar.sources import watch as reload
from sidecar.sources.workload_api import MissingExtra, WorkloadApiSource
from sidecar.tls import contexts as tls_contexts
from sidecar.tls import ktls
from sidecar.tls.resumption import Resumption

SWEEP_EVERY = 1.0  # seconds between idle / lifetime sweeps, while there are connections
# How long the lag probe keeps measuring after an accept, or after a sweep that saw bytes
# move or handshakes pending: past the next sweep, which renews it while work goes on.
LAG_LINGER = 1.5 * SWEEP_EVERY
# Ticks the probe takes for an admin request: a scrape of an idle process still finds the
# loop's lag measured just now, and a stall under way is seen once these timers run.
LAG_TICKS_PER_ADMIN_REQUEST = 2


def session_store(configured: SessionStore, *, workers: bool) -> SessionStore:
    """Where the server keeps sessions. `auto`: memory in a single process; tickets when
    workers share the port, since the kernel spreads a peer's connections over the
    workers and a session kept by one worker would not resume on another."""
    if configured is SessionStore.AUTO:
        return SessionStore.TICKETS if workers else SessionStore.MEMORY
    return configured


class Server:
    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker
        if worker is not None:
            # A supervisor that stops reading must never stall this loop on a full pipe.
            os.set_blocking(worker.notify_fd, False)
        tls = config.tls
        self.resumption = Resumption(
            session_store(tls.session_store, workers=worker is not None),
            tls.session_ticket_rotation, tls.session_cache_size,
            worker.ticket_secret if worker else secrets.token_bytes(32),
            configured=tls.session_store)
        self.listeners: list[Listener] = []
        self.rt: Runtime | None = None
        self._drain = Drain(config.drain_timeout)
        self._reloadables: list[reload.Reloadable] = []
        self._swaps: snapshots.Swaps | None = None
        self._admin: asyncio.Server | None = None
        self.source: WorkloadApiSource | None = None  # identity.workload_api
        self._admin_announced = False
        self.ktls = ktls.Support(False, "not detected yet")
        self._sweeper: lifecycle.Tick | None = None
        self._lag: lifecycle.LagProbe | None = None
        self._lag_linger = 0  # LAG_LINGER in the probe's ticks
        self._reported: dict[str, Any] | None = None  # a worker's last report

    # -- snapshots ------------------------------------------------------------------------

    def build_contexts(self, identity: Identity) -> tls_contexts.Contexts:
        tls = self.config.tls
        return tls_contexts.build(identity, min_version=tls.min_version,
                                  session_resumption=tls.session_resumption,
                                  ktls=self.ktls.available,
                                  ticket_keys=self.resumption.ticket_keys(identity),
                                  session_cache_size=self.resumption.memory_cache(),
                                  groups=tls.groups,
                                  http1=any(ib.protocol is ListenerProtocol.HTTP
                                            for ib in self.config.inbound))

    def _on_policy(self, policy: Policy) -> None:
        if self.config.policy_recheck and self.rt is not None:
            closed = inbound.recheck_live(self.rt, policy)
            if closed:
                logs.event(logging.INFO, "policy recheck closed live connections",
                           closed=closed)

    def reload_all(self, why: str) -> None:
        assert self.rt is not None
        for r in self._reloadables:
            self.rt.loop.create_task(r.reload(why))

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> int:
        """Start (1 when it cannot), serve until stopped, drain (0)."""
        rt = await self._start()
        if rt is None:
            self._stop_source()
            return 0 if self.draining else 1  # stopped while waiting for an identity: fine
        if not self._listen(rt) or not await self._start_admin():
            self._stop_source()
            return 1
        rt.tracker.on_full = self._pause_listeners
        rt.tracker.on_capacity = self._resume_listeners
        rt.tracker.on_empty = self._drain.on_empty
        lifecycle.install_signals(rt.loop, self._on_signal)
        self._announce_listening()
        self._swaps = snapshots.Swaps(self.config, rt, self.build_contexts, self._on_policy)
        self._reloadables = self._swaps.reloadables()
        for r in self._reloadables:
            r.on_done = self._reloaded
        background = self._background()
        await self._catch_up()
        logs.event(logging.INFO, "ready", spiffe_id=str(rt.contexts.identity.spiffe_id),
                   serial=f"{rt.contexts.identity.serial:x}", policy=rt.policy.version)
        if on_ready:
            on_ready(self)
        if self.worker is not None:
            self.worker.notify("ready")
            self._report()
        # Both run only while there is work (lifecycle.py): an idle process sleeps.
        self._lag = lag = lifecycle.LagProbe(rt.loop)
        self._lag_linger = lag.ticks_for(LAG_LINGER)
        self._sweeper = sweeper = lifecycle.Tick(rt.loop, SWEEP_EVERY, self._sweep,
                                                 busy=lambda: rt.tracker.active > 0)
        rt.tracker.on_open = self._on_open
        await self._drain.stopped.wait()
        http.wind_down(rt)  # http connections close at their next request boundary
        sweeper.cancel()
        lag.cancel()
        # A worker's request counts reach the supervisor's files only when flushed (the
        # sweep did it): during the drain too, which the supervisor's /metrics still serves.
        flusher = None if self.worker is None else lifecycle.Tick(
            rt.loop, SWEEP_EVERY, metrics.flush_held)
        if flusher is not None:
            metrics.flush_held()
        for task in background:
            task.cancel()
        self._stop_source()
        self._close_listeners()
        try:
            await self._drain.finish(rt.tracker, rt.tasks)
        finally:
            if flusher is not None:
                flusher.cancel()
                metrics.flush_held()
            if self._admin is not None:
                self._admin.close()
        return 0

    async def _start(self) -> Runtime | None:
        """The runtime from the first snapshots, or None (said in the log) when it cannot
        serve: kTLS `on` unavailable, handshake unpinnable, no valid identity."""
        cfg = self.config
        fdlimit.raise_for(cfg.limits.max_connections)
        self.ktls, refusal = preflight.ktls_support(cfg.tls.ktls)
        refusal = refusal or preflight.pin_refusal()
        if refusal is not None:
            logs.event(logging.ERROR, f"cannot start: {refusal}")
            return None
        identity = await self._first_identity()
        if identity is None:
            return None
        if self.worker is None:  # workers: the supervisor says these, once
            preflight.log_warnings(cfg, identity, workers=1)
        policy = await snapshots.first_policy(cfg)
        if self.source is not None:  # the agent may have rotated it while the policy loaded
            identity = self.source.identity
            assert identity is not None
        loop, limits = asyncio.get_running_loop(), cfg.limits
        tracker = Tracker(loop, max_connections=limits.max_connections,
                          max_pending_handshakes=limits.max_pending_handshakes,
                          idle_timeout=limits.idle_timeout,
                          max_lifetime=limits.max_connection_lifetime)
        self.rt = rt = Runtime(loop, self.build_contexts(identity), policy, limits, tracker,
                               session_resumption=cfg.tls.session_resumption,
                               ktls=None if cfg.tls.ktls is KtlsMode.OFF else
                               KtlsState.ENABLED if self.ktls.available else
                               KtlsState.UNAVAILABLE,
                               clock_skew_hint=cfg.clock_skew_hint)
        rt.authn.learn(identity)
        snapshots.publish(identity)
        metrics.declare(cfg, lambda: rt.policy)
        return rt

    async def _first_identity(self) -> Identity | None:
        """From the files (retried briefly, as a reload), or the first the Workload API
        agent hands out: that waits as long as it takes, with the admin endpoint up so
        that /readyz says what it waits for, and ends early (None) on SIGTERM."""
        cfg = self.config
        if cfg.identity.workload_api is None:
            return await snapshots.first_identity(cfg)
        loop = asyncio.get_running_loop()
        try:
            self.source = WorkloadApiSource(cfg.identity.workload_api, cfg.identity.spiffe_id,
                                            loop, self._apply_streamed)
        except MissingExtra as exc:
            logs.event(logging.ERROR, f"cannot start: {exc}")
            return None
        if not await self._start_admin():
            return None
        logs.event(logging.INFO, "listening", listener="admin", direction="admin",
                   address=self.admin_address)
        self._admin_announced = True
        lifecycle.install_signals(loop, self._on_signal)
        self.source.start()
        logs.event(logging.INFO, "waiting for an identity from the Workload API",
                   address=str(cfg.identity.workload_api),
                   spiffe_id=str(cfg.identity.spiffe_id) if cfg.identity.spiffe_id else None)
        first = asyncio.ensure_future(self.source.first.wait())
        stopped = asyncio.ensure_future(self._drain.stopped.wait())
        await asyncio.wait((first, stopped), return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        stopped.cancel()
        return self.source.identity if self.source.first.is_set() else None

    def _apply_streamed(self, identity: Identity) -> None:
        """A new identity from the Workload API, on the loop: swapped in as a reloaded one
        is. Before run's Swaps exist, the source keeps it and _start takes it from there
        (self.rt and the Swaps are set with no await between them)."""
        if self._swaps is not None:
            self._swaps.identity(identity)

    def _stop_source(self) -> None:
        if self.source is not None:
            self.source.stop()

    def _listen(self, rt: Runtime) -> bool:
        """Bind every listener, paused; False (all closed, said in the log) when one fails:
        a sidecar half-listening is worse than one that fails its rollout."""
        cfg = self.config
        wanted = [*((ib.name, inbound.DIRECTION, ib.listen, inbound.acceptor(rt, ib))
                    for ib in cfg.inbound),
                  *((ob.name, outbound.DIRECTION, ob.listen, outbound.acceptor(rt, ob))
                    for ob in cfg.outbound)]
        for name, direction, listen, acceptor in wanted:
            address = listen if self.worker is None else self.worker.address(name, listen)
            try:
                self.listeners.append(Listener(rt.loop, name, direction, address, acceptor,
                                               reuse_port=self.worker is not None))
            except OSError as exc:
                logs.event(logging.ERROR, f"cannot listen: {direction} listener {name!r} "
                           f"on {address}: {exc.strerror or exc}", listener=name,
                           address=str(address), error=str(exc))
                self._close_listeners()
                return False
        return True

    async def _start_admin(self) -> bool:
        """The admin endpoint (a worker has none: its supervisor serves it); False (the
        listeners closed, said in the log) when its port cannot be bound."""
        if self.worker is not None or self._admin is not None:
            return True
        listen = self.config.admin.listen
        try:
            self._admin = await admin.start(listen.host, listen.port,
                                            admin.Probe(self.not_ready, self.status,
                                                        on_request=self._on_admin_request))
        except OSError as exc:
            logs.event(logging.ERROR, f"cannot listen on admin {listen}: {exc.strerror}",
                       error=str(exc))
            self._close_listeners()
            return False
        return True

    def _announce_listening(self) -> None:
        for lst in self.listeners:
            lst.resume()
            logs.event(logging.INFO, "listening", listener=lst.name, direction=lst.direction,
                       address=lst.bound)
        if self._admin is not None and not self._admin_announced:
            logs.event(logging.INFO, "listening", listener="admin", direction="admin",
                       address=self.admin_address)

    async def _catch_up(self) -> None:
        """The watcher sets up its inotify watches in its task's first step: let it take
        that step, then re-read everything once, so that a file written between our first
        load and the watch start is not missed."""
        await asyncio.sleep(0)
        for r in self._reloadables:
            await r.reload(reload.START)

    def _background(self) -> list[asyncio.Task[None]]:
        assert self.rt is not None
        rt, ident, stop = self.rt, self.config.identity, self._drain.stopped
        coros = [reload.expiry_watch(
            lambda: (rt.contexts.identity.leaf.not_valid_before_utc,
                     rt.contexts.identity.not_after), stop)]
        if ident.watch:
            coros.append(reload.watch(self._reloadables, stop))
        if ident.reload_interval > 0:
            coros.append(reload.every(ident.reload_interval, self._reloadables, stop))
        if self.config.tls.session_resumption and self.config.tls.session_ticket_rotation > 0:
            coros.append(self.resumption.rotate_at_boundaries(lambda: rt.contexts, stop))
        return reload.spawn_all(coros)

    @property
    def draining(self) -> bool:
        return self._drain.draining

    def stop(self) -> None:
        """Begin a drain (first call) or end it at once (second call)."""
        if self._drain.stop() and self.worker is not None:
            self.worker.notify("draining")

    # -- what the admin endpoint shows ---------------------------------------------------

    @property
    def admin_address(self) -> str:
        if self._admin is None or not self._admin.sockets:
            return ""
        host, port = self._admin.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        if self.source is not None and (why := self.source.not_ready()) is not None:
            return why
        if self.rt is None:
            return "starting"
        return status.identity_problem(self.rt.contexts.identity, dt.datetime.now(dt.UTC))

    def status(self) -> dict[str, Any]:
        source = self.source.status() if self.source is not None else \
            status.file_source(self.config.identity)
        if self.rt is None:
            return status.waiting(source, draining=self.draining, pid=os.getpid())
        return status.single(
            self.rt.contexts.identity, source,
            [{"name": lst.name, "direction": lst.direction, "address": lst.bound}
             for lst in self.listeners],
            self.serving(), draining=self.draining, pid=os.getpid())

    def serving(self) -> dict[str, Any]:
        """What only the serving process knows; a worker sends it to its supervisor."""
        assert self.rt is not None
        return status.serving(
            self.rt.policy, active=self.rt.tracker.active,
            pending=len(self.rt.tracker.pending),
            ktls={"mode": str(self.config.tls.ktls), **self.ktls.as_dict()},
            sessions=self.resumption.status(self.rt.contexts),
            reloads={r.kind: r.last.as_dict() for r in self._reloadables
                     if r.last is not None})

    def _close_listeners(self) -> None:
        for lst in self.listeners:
            lst.close()

    def _pause_listeners(self) -> None:
        for lst in self.listeners:
            lst.pause()

    def _resume_listeners(self) -> None:
        if not self.draining:
            for lst in self.listeners:
                lst.resume()

    def _on_open(self) -> None:
        """A connection was accepted: sweep while it lives, measure the lag meanwhile."""
        assert self._sweeper is not None and self._lag is not None
        self._sweeper.wake()
        self._lag.wake(self._lag_linger)

    def _on_admin_request(self) -> None:
        if self._lag is not None:
            self._lag.wake(LAG_TICKS_PER_ADMIN_REQUEST)

    def _reloaded(self) -> None:
        """A reload ended (in force or not): a worker's next tick reports it, even idle."""
        if self.worker is not None and self._sweeper is not None:
            self._sweeper.wake()

    def _sweep(self) -> None:
        assert self.rt is not None and self._lag is not None
        metrics.flush_held()  # workers' held counts; one process flushes at scrapes too
        if self.rt.tracker.sweep():  # bytes moved or handshakes pending: keep measuring
            self._lag.wake(self._lag_linger)
        if self.worker is not None:
            self._report()

    def _report(self) -> None:
        """A worker tells its supervisor what changed (nothing sent when nothing did: an
        idle worker must not wake its supervisor every second)."""
        assert self.worker is not None
        report = self.serving()
        if report != self._reported:
            self._reported = report
            self.worker.report(report)

    def _on_signal(self, name: str) -> None:
        logs.event(logging.INFO, f"{name} received")
        if name == "SIGHUP":
            if self.rt is not None:
                self.reload_all("SIGHUP")
        else:
            self.stop()
