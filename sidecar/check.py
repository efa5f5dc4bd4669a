"""`sidecar check`: every problem of config, policy and SVID files, each with its place."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sidecar.config import Config, load_config
from sidecar.identity import load_identity
from sidecar.policy import load_policy, policy_warnings
from sidecar.problems import Problem, ProblemsError


def problems_of(path: Path) -> tuple[list[Problem], list[Problem], Config | None]:
    """(errors, warnings, config if it parsed)."""
    try:
        config = load_config(path)
    except ProblemsError as exc:
        return list(exc.problems), [], None
    errors: list[Problem] = []
    warnings: list[Problem] = []
    ident = config.identity
    try:
        identity = load_identity(ident.cert, ident.key, ident.bundle, ident.federated_bundles)
        left = identity.not_after - dt.datetime.now(dt.UTC)
        lifetime = identity.not_after - identity.leaf.not_valid_before_utc
        if left < lifetime / 3:
            warnings.append(Problem(str(ident.cert), f"expires in {_human(left)}: less than a "
                                    "third of its lifetime left; is the issuer rotating?"))
    except ProblemsError as exc:
        errors.extend(exc.problems)
    if config.policy is not None:
        try:
            policy = load_policy(config.policy, listeners=[ib.name for ib in config.inbound])
            warnings.extend(policy_warnings(policy, [ib.name for ib in config.inbound
                                                     if str(ib.protocol) == "tcp"]))
        except ProblemsError as exc:
            errors.extend(exc.problems)
    return errors, warnings, config


def _human(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s < 0:
        return f"{_human(-delta)} ago"
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60} min" if s >= 60 else f"{s}s"


def check(path: Path) -> int:
    errors, warnings, _ = problems_of(path)
    for w in warnings:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    if errors:
        print(f"{path}: {len(errors)} problem(s)")
        return 1
    print(f"{path}: ok")
    return 0
