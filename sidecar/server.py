"""`sidecar run`: assemble the runtime from a config, serve until told to stop, drain.

Life cycle: load identity (refuse to start without a valid one) and policy (a broken
policy at start means deny everything, loudly), bind every listener (a port in use is
fatal: a sidecar half-listening is worse than one that fails its rollout), then serve.
SIGTERM or SIGINT starts a drain: stop accepting, let live connections finish until
`drain_timeout`, close what is left, exit 0. A second signal ends the drain at once.
SIGHUP reloads the identity and the policy, as file changes do (reload.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import select
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar import admin, fdlimit, logs, metrics, preflight, reload, status
from sidecar.config import Address, Config
from sidecar.identity import Identity, changed_parts
from sidecar.policy import DENY_ALL, Policy, load_policy
from sidecar.problems import ProblemsError
from sidecar.proxy import inbound, outbound
from sidecar.proxy.connection import Tracker
from sidecar.proxy.listener import Listener
from sidecar.proxy.pump import Close
from sidecar.proxy.runtime import Runtime
from sidecar.times import json_default, rfc3339
from sidecar.tls import contexts as tls_contexts
from sidecar.tls import ktls, openssl
from sidecar.tls.resumption import Resumption

SWEEP_EVERY = 1.0  # seconds between idle / lifetime sweeps
LAG_TICK = 0.01  # the loop-lag probe's period: 100 cheap callbacks a second


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process gets from its supervisor (workers.py)."""

    index: int
    ports: Mapping[str, int]  # listener name -> the port every worker binds (SO_REUSEPORT)
    notify_fd: int  # "ready" / "draining" lines go here
    ticket_secret: bytes  # shared, so any worker resumes any worker's tickets


class Server:
    def __init__(self, config: Config, worker: WorkerRole | None = None) -> None:
        self.config = config
        self.worker = worker
        if worker is not None:
            # A supervisor that stops reading must never stall this loop on a full pipe.
            os.set_blocking(worker.notify_fd, False)
        self.resumption = Resumption(
            config.tls, worker.ticket_secret if worker else secrets.token_bytes(32),
            workers=worker is not None)
        self.listeners: list[Listener] = []
        self.rt: Runtime | None = None
        self.draining = False
        self._stop: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._reloadables: list[reload.Reloadable] = []
        self._admin: asyncio.Server | None = None
        self.ktls = ktls.Support(False, "not detected yet")
        self._lag_max = 0.0
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._lag_handle: asyncio.TimerHandle | None = None

    # -- snapshots ------------------------------------------------------------------------

    def load_identity(self) -> Identity:
        return preflight.identity_of(self.config)

    def build_contexts(self, identity: Identity) -> tls_contexts.Contexts:
        tls = self.config.tls
        return tls_contexts.build(identity, min_version=str(tls.min_version),
                                  session_resumption=tls.session_resumption,
                                  ktls=self.ktls.available,
                                  ticket_keys=self.resumption.ticket_keys(identity),
                                  session_cache_size=self.resumption.cache_size(),
                                  groups=tls.groups)

    async def _first_identity(self) -> Identity | None:
        """Load the identity to start with, retrying as a reload does: a sidecar started
        while spiffe-helper is mid-write must not exit (a crash loop in Kubernetes)."""
        last: ProblemsError | None = None
        for delay in (0.0, *reload.RETRY_DELAYS):
            if delay:
                await asyncio.sleep(delay)
            try:
                return await reload.load_bounded(self.load_identity, str(
                    self.config.identity.cert))
            except reload.LoadStuckError as exc:
                last = exc
                break
            except ProblemsError as exc:
                last = exc
        assert last is not None
        logs.event(logging.ERROR, "cannot start: no valid identity",
                   problems=[str(p) for p in last.problems])
        return None

    def detect_ktls(self) -> str | None:
        """Settle the kTLS mode; an error message when `ktls: on` cannot be honoured."""
        mode = str(self.config.tls.ktls)
        if mode == "off":
            self.ktls = ktls.Support(False, "tls.ktls: off")
            return None
        self.ktls = ktls.detect()
        refusal = preflight.ktls_refusal(self.config.tls.ktls, self.ktls)
        if self.ktls.available:
            logs.event(logging.INFO, "kTLS available", detail=self.ktls.why)
        elif refusal is not None:
            return refusal
        else:
            logs.event(logging.INFO, "kTLS unavailable; using user-space TLS",
                       detail=self.ktls.why)
        return None

    def load_policy(self) -> Policy:
        if self.config.policy is None:
            return DENY_ALL
        return load_policy(self.config.policy,
                           listeners=[lst.name for lst in self.config.inbound])

    def publish_identity(self, identity: Identity) -> None:
        if not metrics.MULTIPROCESS:  # there, values live in files and cannot be cleared
            metrics.svid_expiry.clear()
            metrics.bundle_expiry.clear()
        metrics.svid_expiry.labels(str(identity.spiffe_id)).set(identity.not_after.timestamp())
        for td, bundle in identity.bundles.items():
            metrics.bundle_expiry.labels(td).set(bundle.earliest_expiry.timestamp())

    def reloadables(self) -> list[reload.Reloadable]:
        ident = self.config.identity
        trust = {path: "bundle" for path in (ident.bundle, *ident.federated_bundles.values())}
        out = [reload.Reloadable(
            "svid",
            (ident.cert, ident.key, ident.bundle, *ident.federated_bundles.values(),
             *ident.crl),
            self.load_identity, self._swap_identity, parts=changed_parts,
            kind_of=trust | {path: "crl" for path in ident.crl})]
        if self.config.policy is not None:
            out.append(reload.Reloadable("policy", (self.config.policy,), self.load_policy,
                                         self._swap_policy))
        return out

    def _swap_identity(self, new: object) -> bool:
        assert self.rt is not None and isinstance(new, Identity)
        old = self.rt.contexts.identity
        if new.version == old.version:
            return False
        if new.trust_version == old.trust_version:
            self.rt.contexts = tls_contexts.present(self.rt.contexts, new)
        else:
            # New trust: new contexts, so tickets issued under the old trust stop resuming.
            retired = self.rt.contexts.server
            self.rt.contexts = self.build_contexts(new)
            openssl.flush_sessions(retired)  # live connections keep it alive for a while
            for w in preflight.foreign_cas(self.config, new):  # a bundle merged since start
                logs.event(logging.WARNING, f"warning: {w}", where=w.where)
        self.rt.authn.learn(new)
        self.publish_identity(new)
        logs.event(logging.INFO, "identity reloaded", spiffe_id=str(new.spiffe_id),
                   serial=f"{new.serial:x}", not_after=rfc3339(new.not_after),
                   trust_changed=new.trust_version != old.trust_version)
        return True

    def _swap_policy(self, new: object) -> bool:
        assert self.rt is not None and isinstance(new, Policy)
        if new.version == self.rt.policy.version:
            return False
        self.rt.policy = new
        logs.event(logging.INFO, "policy reloaded", version=new.version, mode=str(new.mode))
        if self.config.policy_recheck:
            self._recheck(new)
        return True

    def _recheck(self, policy: Policy) -> None:
        """Close live inbound connections the new policy denies (Envoy decides only once)."""
        assert self.rt is not None
        closed = 0
        for duplex, rec in list(self.rt.tracker.live.items()):
            if rec.direction != inbound.DIRECTION or rec.peer_id is None:
                continue
            decision = policy.decide(rec.peer_id, rec.listener)
            if decision.allowed:
                continue
            metrics.count_decision(rec.listener, decision.kind, decision.rule)
            rec.decision, rec.rule, rec.close = str(decision.kind), decision.rule, "policy_recheck"
            duplex.abort(Close.POLICY_RECHECK)
            closed += 1
        if closed:
            logs.event(logging.INFO, "policy recheck closed live connections", closed=closed)

    def reload_all(self, why: str) -> None:
        assert self.rt is not None
        for r in self._reloadables:
            self.rt.loop.create_task(r.reload(why))

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.config
        fdlimit.raise_for(self.config.limits.max_connections)
        refusal = self.detect_ktls() or preflight.pin_refusal()
        if refusal is not None:
            logs.event(logging.ERROR, f"cannot start: {refusal}")
            return 1
        identity = await self._first_identity()
        if identity is None:
            return 1
        if self.worker is None:  # workers: the supervisor says these, once
            preflight.log_warnings(cfg, identity, workers=1)
        try:
            policy = await reload.load_bounded(self.load_policy, str(cfg.policy))
        except ProblemsError as exc:
            logs.event(logging.ERROR, "policy invalid at start: every inbound connection "
                       "will be denied until a valid policy is loaded",
                       problems=[str(p) for p in exc.problems])
            metrics.reloads.labels("policy", "error").inc()
            policy = DENY_ALL
        limits = cfg.limits
        tracker = Tracker(loop, max_connections=limits.max_connections,
                          max_pending_handshakes=limits.max_pending_handshakes,
                          idle_timeout=limits.idle_timeout,
                          max_lifetime=limits.max_connection_lifetime)
        self.rt = rt = Runtime(loop, self.build_contexts(identity), policy, limits, tracker,
                               session_resumption=cfg.tls.session_resumption,
                               ktls="off" if str(cfg.tls.ktls) == "off" else
                               "enabled" if self.ktls.available else "unavailable",
                               clock_skew_hint=cfg.clock_skew_hint)
        rt.authn.learn(identity)
        self.publish_identity(identity)
        metrics.declare(cfg, lambda: rt.policy)
        wanted = [*((ib.name, inbound.DIRECTION, ib.listen, inbound.acceptor(rt, ib))
                    for ib in cfg.inbound),
                  *((ob.name, outbound.DIRECTION, ob.listen, outbound.acceptor(rt, ob))
                    for ob in cfg.outbound)]
        for name, direction, listen, acceptor in wanted:
            address = self._address(name, listen)
            try:
                self.listeners.append(Listener(loop, name, direction, address, acceptor,
                                               reuse_port=self.worker is not None))
            except OSError as exc:
                logs.event(logging.ERROR, f"cannot listen: {direction} listener {name!r} "
                           f"on {address}: {exc.strerror or exc}", listener=name,
                           address=str(address), error=str(exc))
                for lst in self.listeners:
                    lst.close()
                return 1
        try:
            if self.worker is None:  # workers: the supervisor serves the admin endpoint
                admin_cfg = cfg.admin.listen
                self._admin = await admin.start(admin_cfg.host, admin_cfg.port,
                                                admin.Probe(self.not_ready, self.status))
        except OSError as exc:
            logs.event(logging.ERROR, f"cannot listen on admin {cfg.admin.listen}: "
                       f"{exc.strerror}", error=str(exc))
            for lst in self.listeners:
                lst.close()
            return 1
        tracker.on_full = self._pause_listeners
        tracker.on_capacity = self._resume_listeners
        tracker.on_empty = self._maybe_drained
        self._stop = asyncio.Event()
        self._drained = asyncio.Event()
        self._install_signals(loop)
        for lst in self.listeners:
            lst.resume()
            logs.event(logging.INFO, "listening", listener=lst.name, direction=lst.direction,
                       address=lst.bound)
        if self._admin is not None:
            logs.event(logging.INFO, "listening", listener="admin", direction="admin",
                       address=self.admin_address)
        self._reloadables = self.reloadables()
        background = self._background()
        # The watcher sets up its inotify watches in its task's first step: let it take
        # that step, then re-read everything once, so that a file written between our
        # first load and the watch start is not missed.
        await asyncio.sleep(0)
        for r in self._reloadables:
            await r.reload("start")
        logs.event(logging.INFO, "ready", spiffe_id=str(rt.contexts.identity.spiffe_id),
                   serial=f"{rt.contexts.identity.serial:x}", policy=rt.policy.version)
        if on_ready:
            on_ready(self)
        self._notify("ready")
        if self.worker is not None:
            self._report()
        self._sweep_handle = loop.call_later(SWEEP_EVERY, self._sweep)
        self._lag_handle = loop.call_later(LAG_TICK, self._lag, loop.time() + LAG_TICK)
        await self._stop.wait()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        if self._lag_handle is not None:
            self._lag_handle.cancel()
        for task in background:
            task.cancel()
        await self._drain()
        return 0

    def _background(self) -> list[asyncio.Task[None]]:
        assert self._stop is not None and self.rt is not None
        rt, ident = self.rt, self.config.identity
        coros = [reload.expiry_watch(
            lambda: (rt.contexts.identity.leaf.not_valid_before_utc,
                     rt.contexts.identity.not_after), self._stop)]
        if ident.watch:
            coros.append(reload.watch(self._reloadables, self._stop))
        if ident.reload_interval > 0:
            coros.append(reload.every(ident.reload_interval, self._reloadables, self._stop))
        if self.config.tls.session_resumption and self.config.tls.session_ticket_rotation > 0:
            coros.append(self.resumption.rotate_at_boundaries(lambda: rt.contexts, self._stop))
        return reload.spawn_all(coros)

    def stop(self) -> None:
        """Begin a drain (first call) or end it at once (second call)."""
        assert self._stop is not None and self._drained is not None
        if self.draining:
            logs.event(logging.WARNING, "second stop signal: closing every connection now")
            self._drained.set()
            return
        self.draining = True
        self._notify("draining")
        self._stop.set()

    async def _drain(self) -> None:
        assert self.rt is not None and self._drained is not None
        for lst in self.listeners:
            lst.close()
        try:
            await self._drain_connections()
        finally:
            if self._admin is not None:
                self._admin.close()

    async def _drain_connections(self) -> None:
        assert self.rt is not None and self._drained is not None
        tracker = self.rt.tracker
        timeout = self.config.drain_timeout
        logs.event(logging.INFO, "draining", active=tracker.active, timeout_s=timeout)
        if tracker.active:
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                logs.event(logging.WARNING, "drain timeout: closing what is left",
                           active=tracker.active)
        tracker.abort_all(Close.DRAIN)
        if self.rt.tasks:
            await asyncio.wait(list(self.rt.tasks), timeout=1.0)
        logs.event(logging.INFO, "stopped")

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
        if self.rt is None:
            return "starting"
        return status.identity_problem(self.rt.contexts.identity, dt.datetime.now(dt.UTC))

    def status(self) -> dict[str, Any]:
        assert self.rt is not None
        return {
            **status.describe_identity(self.rt.contexts.identity),
            "listeners": [{"name": lst.name, "direction": lst.direction,
                           "address": lst.bound} for lst in self.listeners],
            **self.serving(),
            "draining": self.draining,
            "workers": [{"pid": os.getpid()}],
        }

    def serving(self) -> dict[str, Any]:
        """What only the serving process knows; a worker sends it to its supervisor."""
        assert self.rt is not None
        return {
            "policy": status.describe_policy(self.rt.policy),
            "connections": {"active": self.rt.tracker.active,
                            "pending_handshakes": len(self.rt.tracker.pending)},
            "ktls": {"mode": str(self.config.tls.ktls), **self.ktls.as_dict()},
            "sessions": self.resumption.status(self.rt.contexts),
            "reloads": {r.kind: r.last.as_dict() for r in self._reloadables
                        if r.last is not None},
        }

    def _report(self) -> None:
        """A worker: send what /status needs to the supervisor, one line, all or nothing
        (a pipe write up to PIPE_BUF is atomic; a longer report is skipped, not torn)."""
        line = json.dumps(self.serving(), default=json_default, separators=(",", ":"))
        if len(line) + len("status \n") <= select.PIPE_BUF:
            self._notify(f"status {line}")

    def _maybe_drained(self) -> None:
        if self.draining and self._drained is not None:
            self._drained.set()

    def _address(self, name: str, configured: Address) -> Address:
        if self.worker is None or name not in self.worker.ports:
            return configured
        return Address(configured.host, self.worker.ports[name])

    def _notify(self, state: str) -> None:
        if self.worker is not None:
            try:
                os.write(self.worker.notify_fd, f"{state}\n".encode())
            except OSError:
                pass  # the supervisor is gone or not reading; the worker carries on

    def _pause_listeners(self) -> None:
        for lst in self.listeners:
            lst.pause()

    def _resume_listeners(self) -> None:
        if not self.draining:
            for lst in self.listeners:
                lst.resume()

    def _lag(self, due: float) -> None:
        """Measure how late a 10 ms timer fires: a blocked loop delays every connection."""
        assert self.rt is not None
        now = self.rt.loop.time()
        late = max(0.0, now - due)
        metrics.loop_lag.observe(late)
        if late > self._lag_max:
            self._lag_max = late
            metrics.loop_lag_max.set(late)
        self._lag_handle = self.rt.loop.call_later(LAG_TICK, self._lag, now + LAG_TICK)

    def _sweep(self) -> None:
        assert self.rt is not None
        # Next sweep first: an error in this one must not end idle and lifetime limits.
        self._sweep_handle = self.rt.loop.call_later(SWEEP_EVERY, self._sweep)
        self.rt.tracker.sweep()
        if self.worker is not None:
            self._report()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_signal, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self._on_signal, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self._on_signal, "SIGHUP")
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests embedding the server): stop() is called directly

    def _on_signal(self, name: str) -> None:
        logs.event(logging.INFO, f"{name} received")
        if name == "SIGHUP":
            self.reload_all("SIGHUP")
        else:
            self.stop()
