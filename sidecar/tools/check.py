"""`sidecar check`: every problem of config, policy and SVID files, each with its place.

It refuses and warns about what `sidecar run` refuses and warns about at start, by calling
the same functions (preflight.py, fdlimit.py, and snapshots.py's loaders). With no error
it prints a summary of what `run` would serve: who it is and until when, each listener,
and the policy's rules.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sidecar.config import Config, KtlsMode, ListenerProtocol, load_config
from sidecar.identity import Identity
from sidecar.policy import Policy, Rule, policy_warnings
from sidecar.problems import Problem, ProblemsError
from sidecar.run import fdlimit, preflight, snapshots, workers
from sidecar.sources.workload_api import MissingExtra
from sidecar.times import rfc3339
from sidecar.tls import ktls
from sidecar.tools.inspect.validity import span
from sidecar.workload_endpoint import ENDPOINT_ENV

# A summary names at most this many rules: a 10,000-rule policy must not flood a terminal.
SUMMARY_RULES: Final = 20


@dataclass(frozen=True, slots=True)
class Findings:
    errors: list[Problem]
    warnings: list[Problem]
    config: Config | None  # None: the config did not parse
    identity: Identity | None = None
    policy: Policy | None = None


def problems_of(path: Path) -> tuple[list[Problem], list[Problem], Config | None]:
    """(errors, warnings, config if it parsed)."""
    found = examine(path)
    return found.errors, found.warnings, found.config


def examine(path: Path) -> Findings:
    """Every error and warning of the config at `path`, and what loaded."""
    try:
        config = load_config(path)
    except ProblemsError as exc:
        return Findings(list(exc.problems), [], None)
    errors: list[Problem] = []
    identity: Identity | None = None
    policy: Policy | None = None
    # `workers: auto` resolved as run resolves it: the memory-store warning depends on it.
    warnings = preflight.config_warnings(config, config.workers or workers.usable_cpus())
    try:
        identity = snapshots.identity_of(config)
        warnings.extend(preflight.identity_warnings(config, identity, dt.datetime.now(dt.UTC)))
    except ProblemsError as exc:
        if config.identity.workload_api is None:
            errors.extend(exc.problems)
        else:  # run waits for the agent rather than failing: so does check
            warnings.extend(Problem(p.where, f"{p.message}; `run` will wait for the agent, "
                                    "/readyz answering 503 meanwhile")
                            for p in exc.problems)
    except MissingExtra as exc:
        errors.append(Problem("identity.workload_api", str(exc)))
    if config.tls.ktls == KtlsMode.ON:  # only `on` can refuse; spare the probe otherwise
        refusal = preflight.ktls_refusal(config.tls.ktls, ktls.detect())
        if refusal is not None:
            errors.append(Problem("tls.ktls", refusal))
    pin = preflight.pin_refusal()
    if pin is not None:
        errors.append(Problem("tls.groups", pin))
    short = fdlimit.shortfall(config.limits.max_connections, fdlimit.raise_limit())
    if short is not None:
        warnings.append(Problem("limits.max_connections", short))
    if config.policy is not None:
        try:
            policy = snapshots.policy_of(config)
            warnings.extend(policy_warnings(policy, [ib.name for ib in config.inbound
                                                     if ib.protocol is ListenerProtocol.TCP]))
        except ProblemsError as exc:
            errors.extend(exc.problems)
    return Findings(errors, warnings, config, identity, policy)


def check(path: Path) -> int:
    found = examine(path)
    for w in found.warnings:
        print(f"warning: {w}")
    for e in found.errors:
        print(f"error: {e}")
    if found.errors:
        print(f"{path}: {len(found.errors)} problem(s)")
        return 1
    print(f"{path}: ok" + (f" ({len(found.warnings)} warning(s))" if found.warnings else ""))
    if found.config is not None:
        print(f"  {source_line(found.config)}")
    if found.config is not None and found.identity is not None:
        for line in summary(found.config, found.identity, found.policy,
                            dt.datetime.now(dt.UTC)):
            print(f"  {line}")
    return 0


def source_line(config: Config) -> str:
    """Where `run` takes its identity from, and why there."""
    ident = config.identity
    if ident.workload_api is None:
        return f"identity source: files ({ident.cert}, {ident.key}, {ident.bundle})"
    why = f"{ENDPOINT_ENV}, as the config names no identity files" \
        if ident.workload_api_from_env else "identity.workload_api"
    wanted = f", SVID {ident.spiffe_id}" if ident.spiffe_id else ", its first SVID"
    return f"identity source: the SPIFFE Workload API at {ident.workload_api} (from {why}" \
        f"{wanted})"


def summary(config: Config, identity: Identity, policy: Policy | None,
            now: dt.datetime) -> list[str]:
    """What `run` would serve, one fact a line: identity, listeners, admin, policy."""
    left = (identity.not_after - now).total_seconds()
    expiry = f"expires in {span(left)}" if left > 0 else f"expired {span(left)} ago"
    lines = [f"identity: {identity.spiffe_id}, {expiry} ({rfc3339(identity.not_after)})"]
    for td, bundle in sorted(identity.bundles.items()):
        lines.append(f"trusts {td}: {len(bundle.cas)} CA(s), earliest expiry "
                     f"{rfc3339(bundle.earliest_expiry)}")
    for ib in config.inbound:
        header = ", PROXY v2 header first" if ib.proxy_protocol else ""
        lines.append(f"inbound {ib.name}: {ib.listen} -> {ib.forward_to} "
                     f"({ib.protocol}{header})")
    for ob in config.outbound:
        lines.append(f"outbound {ob.name}: {ob.listen} -> {ob.connect_to}, expects "
                     f"{', '.join(str(e) for e in ob.expect_ids)}")
    lines.append(f"admin: {config.admin.listen}")
    if policy is None:
        return lines
    lines.append(f"policy {policy.source} ({policy.mode}, version {policy.version}): "
                 f"{len(policy.rules)} rule(s), default {policy.default}")
    for rule in policy.rules[:SUMMARY_RULES]:
        lines.append(f"  {rule.action} {rule.name}: from "
                     f"{', '.join(str(p) for p in rule.peers)} to {_rule_target(rule)}")
    if len(policy.rules) > SUMMARY_RULES:
        lines.append(f"  ... and {len(policy.rules) - SUMMARY_RULES} more")
    return lines


def _rule_target(rule: Rule) -> str:
    """Where a rule applies: its listeners, and for an http rule its methods and paths."""
    where = ", ".join(rule.listeners) if rule.listeners is not None else "every inbound"
    if not rule.http_only:
        return where
    # Without its methods and paths a deny on /admin/* would read as a deny of everything.
    what = [f"methods {', '.join(rule.methods)}"] if rule.methods else []
    what += [f"paths {', '.join(rule.paths)}"] if rule.paths else []
    return f"{where} (http requests only: {'; '.join(what)})"
