"""`sidecar run`: assemble the runtime from a config, serve until told to stop, drain.

Life cycle: load identity (refuse to start without a valid one) and policy (a broken
policy at start means deny everything, loudly), bind every listener (a port in use is
fatal: a sidecar half-listening is worse than one that fails its rollout), then serve.
SIGTERM or SIGINT starts a drain: stop accepting, let live connections finish until
`drain_timeout`, close what is left, exit 0. A second signal ends the drain at once.
SIGHUP reloads the identity and the policy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from sidecar import logs, metrics
from sidecar.config import Config
from sidecar.identity import Identity, load_identity
from sidecar.policy import DENY_ALL, Policy, load_policy
from sidecar.problems import ProblemsError
from sidecar.proxy import inbound, outbound
from sidecar.proxy.connection import Tracker
from sidecar.proxy.listener import Listener
from sidecar.proxy.runtime import Runtime
from sidecar.tls import contexts as tls_contexts

SWEEP_EVERY = 1.0  # seconds between idle / lifetime sweeps


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[Listener] = []
        self.rt: Runtime | None = None
        self.draining = False
        self._stop: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None

    # -- snapshots ------------------------------------------------------------------------

    def load_identity(self) -> Identity:
        ident = self.config.identity
        return load_identity(ident.cert, ident.key, ident.bundle, ident.federated_bundles)

    def build_contexts(self, identity: Identity) -> tls_contexts.Contexts:
        tls = self.config.tls
        return tls_contexts.build(identity, min_version=str(tls.min_version),
                                  session_resumption=tls.session_resumption)

    def load_policy(self) -> Policy:
        if self.config.policy is None:
            return DENY_ALL
        return load_policy(self.config.policy,
                           listeners=[lst.name for lst in self.config.inbound])

    def publish_identity(self, identity: Identity) -> None:
        metrics.svid_expiry.clear()
        metrics.svid_expiry.labels(str(identity.spiffe_id)).set(identity.not_after.timestamp())
        metrics.bundle_expiry.clear()
        for td, bundle in identity.bundles.items():
            metrics.bundle_expiry.labels(td).set(bundle.earliest_expiry.timestamp())

    def reload(self) -> None:
        """SIGHUP: build new snapshots; anything that fails to load leaves the old in force."""
        assert self.rt is not None
        try:
            identity = self.load_identity()
            if identity.version != self.rt.contexts.identity.version:
                self.rt.contexts = self.build_contexts(identity)
                self.rt.authn.learn(identity)
                self.publish_identity(identity)
            metrics.reloads.labels("svid", "ok").inc()
            logs.event(logging.INFO, "identity reloaded", spiffe_id=str(identity.spiffe_id),
                       serial=f"{identity.serial:x}", version=identity.version)
        except ProblemsError as exc:
            metrics.reloads.labels("svid", "error").inc()
            logs.event(logging.ERROR, "identity reload failed; the previous identity stays",
                       problems=[str(p) for p in exc.problems])
        if self.config.policy is not None:
            try:
                self.rt.policy = self.load_policy()
                metrics.reloads.labels("policy", "ok").inc()
                logs.event(logging.INFO, "policy reloaded", version=self.rt.policy.version)
            except ProblemsError as exc:
                metrics.reloads.labels("policy", "error").inc()
                logs.event(logging.ERROR, "policy reload failed; the previous policy stays",
                           problems=[str(p) for p in exc.problems])

    # -- life cycle -----------------------------------------------------------------------

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.config
        try:
            identity = self.load_identity()
        except ProblemsError as exc:
            logs.event(logging.ERROR, "cannot start: no valid identity",
                       problems=[str(p) for p in exc.problems])
            return 1
        try:
            policy = self.load_policy()
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
                               session_resumption=cfg.tls.session_resumption)
        rt.authn.learn(identity)
        self.publish_identity(identity)
        try:
            for ib in cfg.inbound:
                self.listeners.append(Listener(loop, ib.name, inbound.DIRECTION, ib.listen,
                                               inbound.acceptor(rt, ib)))
            for ob in cfg.outbound:
                self.listeners.append(Listener(loop, ob.name, outbound.DIRECTION, ob.listen,
                                               outbound.acceptor(rt, ob)))
        except OSError as exc:
            logs.event(logging.ERROR, f"cannot listen: {exc.strerror}", error=str(exc))
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
        logs.event(logging.INFO, "ready", spiffe_id=str(identity.spiffe_id),
                   serial=f"{identity.serial:x}", policy=policy.version)
        if on_ready:
            on_ready(self)
        sweeper = loop.call_later(SWEEP_EVERY, self._sweep)
        await self._stop.wait()
        sweeper.cancel()
        await self._drain()
        return 0

    def stop(self) -> None:
        """Begin a drain (first call) or end it at once (second call)."""
        assert self._stop is not None and self._drained is not None
        if self.draining:
            logs.event(logging.WARNING, "second stop signal: closing every connection now")
            self._drained.set()
            return
        self.draining = True
        self._stop.set()

    async def _drain(self) -> None:
        assert self.rt is not None and self._drained is not None
        for lst in self.listeners:
            lst.close()
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
        tracker.abort_all("drain")
        if self.rt.tasks:
            await asyncio.wait(list(self.rt.tasks), timeout=1.0)
        logs.event(logging.INFO, "stopped")

    def _maybe_drained(self) -> None:
        if self.draining and self._drained is not None:
            self._drained.set()

    def _pause_listeners(self) -> None:
        for lst in self.listeners:
            lst.pause()

    def _resume_listeners(self) -> None:
        if not self.draining:
            for lst in self.listeners:
                lst.resume()

    def _sweep(self) -> None:
        assert self.rt is not None
        self.rt.tracker.sweep()
        self.rt.loop.call_later(SWEEP_EVERY, self._sweep)

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
            self.reload()
        else:
            self.stop()
