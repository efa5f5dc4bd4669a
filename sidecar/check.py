"""`sidecar check`: every problem of config, policy and SVID files, each with its place.

It refuses and warns about what `sidecar run` refuses and warns about at start, by calling
the same functions (preflight.py, fdlimit.py, the config and policy loaders).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sidecar import fdlimit, preflight, workers
from sidecar.config import Config, KtlsMode, Protocol, load_config
from sidecar.policy import load_policy, policy_warnings
from sidecar.problems import Problem, ProblemsError
from sidecar.tls import ktls


def problems_of(path: Path) -> tuple[list[Problem], list[Problem], Config | None]:
    """(errors, warnings, config if it parsed)."""
    try:
        config = load_config(path)
    except ProblemsError as exc:
        return list(exc.problems), [], None
    errors: list[Problem] = []
    # `workers: auto` resolved as run resolves it: the memory-store warning depends on it.
    warnings = preflight.config_warnings(config, config.workers or workers.usable_cpus())
    try:
        identity = preflight.identity_of(config)
        warnings.extend(preflight.identity_warnings(config, identity, dt.datetime.now(dt.UTC)))
    except ProblemsError as exc:
        errors.extend(exc.problems)
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
            policy = load_policy(config.policy, listeners=[ib.name for ib in config.inbound])
            warnings.extend(policy_warnings(policy, [ib.name for ib in config.inbound
                                                     if ib.protocol is Protocol.TCP]))
        except ProblemsError as exc:
            errors.extend(exc.problems)
    return errors, warnings, config


def check(path: Path) -> int:
    errors, warnings, _ = problems_of(path)
    for w in warnings:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    if errors:
        print(f"{path}: {len(errors)} problem(s)")
        return 1
    print(f"{path}: ok" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 0
