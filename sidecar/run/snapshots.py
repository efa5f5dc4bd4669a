"""Identity and policy snapshots: loading them from the files the config names, and
swapping a reloaded one into the runtime.

`run` (server.py), its supervisor (workers.py) and `sidecar check` load through the same
functions here: a rule with two homes drifts (check once loaded the identity by its own
copy and skipped the CRL that run loads). A reload builds a complete new snapshot, and a
swap replaces one reference; a connection keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.config import Config
from sidecar.identity import Identity, changed_parts, load_identity
from sidecar.observe import logs, metrics
from sidecar.policy import DENY_ALL, Policy, load_policy
from sidecar.problems import Problem, ProblemsError
from sidecar.proxy.runtime import Runtime
from sidecar.run import preflight
from sidecar.sources import watch as reload
from sidecar.times import rfc3339
from sidecar.tls import contexts as tls_contexts


def identity_of(config: Config) -> Identity:
    """The identity files the config names, CRLs and federated bundles included; or, with
    identity.workload_api, one answer of the agent (`check` uses this; `run` streams)."""
    ident = config.identity
    if ident.workload_api is not None:
        from sidecar.sources import workload_api  # grpc: only where it is used

        return workload_api.fetch_once(ident.workload_api, ident.spiffe_id, timeout=5.0)
    try:
        return load_identity(ident.cert, ident.key, ident.bundle, ident.federated_bundles,
                             ident.crl)
    except ProblemsError as exc:
        raise ProblemsError(_at_yaml_paths(exc.problems, config)) from None


def _at_yaml_paths(problems: tuple[Problem, ...], config: Config) -> list[Problem]:
    """The identity loader names files; a person edits the config: lead with the key that
    names the file (`identity.key: /path: ...`), as a missing file's problem does."""
    keys = {path: key for key, (path, _) in _identity_files(config).items()}
    return [Problem(keys[p.where], f"{p.where}: {p.message}") if p.where in keys else p
            for p in problems]


def _identity_files(config: Config) -> dict[str, tuple[str, str]]:
    """YAML key -> (the file it names, the reload kind a fault in it counts as)."""
    ident = config.identity
    files = {"identity.cert": (str(ident.cert), "svid"), "identity.key": (str(ident.key), "svid"),
             "identity.bundle": (str(ident.bundle), "bundle")}
    files.update({f"identity.federated_bundles.{domain}": (str(path), "bundle")
                  for domain, path in ident.federated_bundles.items()})
    files.update({"identity.crl" if len(ident.crl) == 1 else f"identity.crl[{i}]":
                  (str(path), "crl") for i, path in enumerate(ident.crl)})
    return files


def policy_of(config: Config) -> Policy:
    """The policy file the config names; without one, every inbound caller is denied."""
    if config.policy is None:
        return DENY_ALL
    return load_policy(config.policy, listeners=[lst.name for lst in config.inbound])


async def first_identity(config: Config) -> Identity | None:
    """The identity to start with, retrying as a reload does: a sidecar started while
    spiffe-helper is mid-write must not exit (a crash loop in Kubernetes). None, said in
    the log, when there is none."""
    last: ProblemsError | None = None
    for delay in (0.0, *reload.RETRY_DELAYS):
        if delay:
            await asyncio.sleep(delay)
        try:
            return await reload.load_bounded(lambda: identity_of(config),
                                             str(config.identity.cert))
        except reload.LoadStuckError as exc:
            last = exc
            break
        except ProblemsError as exc:
            last = exc
    assert last is not None
    logs.event(logging.ERROR, "cannot start: no valid identity",
               problems=[str(p) for p in last.problems])
    return None


async def first_policy(config: Config) -> Policy:
    """The policy to start with: an invalid one denies everything, loudly, until a valid
    one is loaded."""
    try:
        return await reload.load_bounded(lambda: policy_of(config), str(config.policy))
    except ProblemsError as exc:
        logs.event(logging.ERROR, "policy invalid at start: every inbound connection "
                   "will be denied until a valid policy is loaded",
                   problems=[str(p) for p in exc.problems])
        metrics.reloads.labels("policy", "error").inc()
        return DENY_ALL


def publish(identity: Identity) -> None:
    """The expiry gauges of the SVID and bundles in force."""
    if not metrics.MULTIPROCESS:  # there, values live in files and cannot be cleared
        metrics.svid_expiry.clear()
        metrics.bundle_expiry.clear()
    metrics.svid_expiry.labels(str(identity.spiffe_id)).set(identity.not_after.timestamp())
    for td, bundle in identity.bundles.items():
        metrics.bundle_expiry.labels(td).set(bundle.earliest_expiry.timestamp())


class Swaps:
    """Swap reloaded snapshots into a runtime: new identity -> contexts presenting it (new
    ones on a new trust), new policy -> the runtime's policy, then `on_policy`."""

    def __init__(self, config: Config, rt: Runtime,
                 build: Callable[[Identity], tls_contexts.Contexts],
                 on_policy: Callable[[Policy], None]) -> None:
        self.config = config
        self.rt = rt
        self._build = build
        self._on_policy = on_policy

    def identity(self, new: object) -> bool:
        assert isinstance(new, Identity)
        old = self.rt.contexts.identity
        if new.version == old.version:
            return False
        self.rt.contexts = tls_contexts.follow(self.rt.contexts, new, self._build)
        if new.trust_version != old.trust_version:
            for w in preflight.foreign_cas(self.config, new):  # a bundle merged since start
                logs.event(logging.WARNING, f"warning: {w}", where=w.where)
        self.rt.authn.learn(new)
        publish(new)
        logs.event(logging.INFO, "identity reloaded", spiffe_id=str(new.spiffe_id),
                   serial=f"{new.serial:x}", not_after=rfc3339(new.not_after),
                   trust_changed=new.trust_version != old.trust_version)
        return True

    def policy(self, new: object) -> bool:
        assert isinstance(new, Policy)
        if new.version == self.rt.policy.version:
            return False
        self.rt.policy = new
        logs.event(logging.INFO, "policy reloaded", version=new.version, mode=str(new.mode))
        self._on_policy(new)
        return True

    def reloadables(self) -> list[reload.Reloadable]:
        """The identity and (when configured) the policy, each with its files."""
        config, ident = self.config, self.config.identity
        out = [] if ident.workload_api is not None else [reload.Reloadable(
            "svid",
            (ident.cert, ident.key, ident.bundle, *ident.federated_bundles.values(),
             *ident.crl),
            lambda: identity_of(config), self.identity, parts=changed_parts,
            kind_of={key: kind for key, (_, kind) in _identity_files(config).items()})]
        # The Workload API's stream swaps the identity itself (sources/workload_api.py).
        if config.policy is not None:
            out.append(reload.Reloadable("policy", (config.policy,), lambda: policy_of(config),
                                         self.policy))
        return out
