"""The config file: YAML in, one frozen `Config` out, or every problem at once.

How it reads a file, and why it is shaped this way:

- The schema is the dataclasses of `schema.py`. Their field names are the YAML keys and
  their defaults are SPEC.md's defaults, so a key is added in one place; `sections.py`
  reads each section into them, `values.py` each scalar.
- A `_Reader` (`document.py`) walks the document and never stops at the first problem:
  a user fixing a file wants the whole list. A bad value is recorded with its YAML path
  (`inbound[0].listen`) and replaced by the default so the walk can go on; when the walk
  ends, any problem at all raises one `ProblemsError`, so a half-valid `Config` never
  leaves this package.
- Unknown keys are errors (SPEC: a typo must not silently disable a control), and so is
  a key written twice in one mapping, which PyYAML would otherwise let the last one win.
- Settings the proxy does not implement yet are refused through `NOT_SUPPORTED_YET`,
  one line per setting; delete the line when the feature lands.
- Checking that referenced files exist is `missing_files`, apart from parsing, so tests
  and tools can validate a config written for another machine.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sidecar.config.document import _load_yaml, _Reader
from sidecar.config.schema import (
    DEFAULT_CONFIG_ENV,
    NOT_SUPPORTED_YET,
    Address,
    AdminConfig,
    Config,
    IdentityConfig,
    IdentitySource,
    InboundListener,
    Limits,
    LogConfig,
    LogFormat,
    LogLevel,
    OutboundListener,
    TlsConfig,
    Unsupported,
)
from sidecar.config.sections import _build, _refuse_unsupported
from sidecar.config.values import parse_address, parse_duration
from sidecar.modes import KtlsMode, ListenerProtocol, SessionStore, TlsVersion
from sidecar.problems import Problem, ProblemsError

__all__ = [
    "DEFAULT_CONFIG_ENV",
    "NOT_SUPPORTED_YET",
    "Address",
    "AdminConfig",
    "Config",
    "IdentityConfig",
    "IdentitySource",
    "InboundListener",
    "KtlsMode",
    "Limits",
    "ListenerProtocol",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "OutboundListener",
    "SessionStore",
    "TlsConfig",
    "TlsVersion",
    "Unsupported",
    "load_config",
    "missing_files",
    "parse_address",
    "parse_config",
    "parse_duration",
]


def load_config(path: Path, *, check_files: bool = True) -> Config:
    """Read and validate the config file; ProblemsError lists everything wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ProblemsError(
            [
                Problem(
                    str(path),
                    f"cannot read the config file: {why}; pass -c FILE or set {DEFAULT_CONFIG_ENV}",
                )
            ]
        ) from None
    return parse_config(text, path, check_files=check_files)


def parse_config(text: str, source: Path, *, check_files: bool = True) -> Config:
    """Validate YAML text as if read from `source`, whose directory anchors relative paths."""
    document = _load_yaml(text)
    # absolute() rather than resolve(): in a Kubernetes configmap volume the file is a
    # symlink into a `..data` directory that is swapped on update, and a resolved path
    # would keep pointing into the old one.
    source = source.absolute()
    reader = _Reader(source.parent)
    config = _build(reader, document, source)
    _refuse_unsupported(reader, document)
    if check_files:
        # A path that failed to parse was replaced by its default; do not report that too.
        reader.problems.extend(p for p in missing_files(config) if p.where not in reader.bad)
    if reader.problems:
        raise ProblemsError(reader.problems)
    return config


def missing_files(config: Config) -> list[Problem]:
    """Every file the config names that cannot be read as a file, with its YAML path."""
    svid_hint = "check that your SVID issuer (spiffe-helper, csi-driver-spiffe) writes it there"
    ident = config.identity
    wanted: list[tuple[str, Path, str]] = [] if ident.workload_api is not None else [
        ("identity.cert", ident.cert, svid_hint),
        ("identity.key", ident.key, svid_hint),
        ("identity.bundle", ident.bundle, svid_hint),
    ]
    for domain, bundle in ident.federated_bundles.items():
        wanted.append((f"identity.federated_bundles.{domain}", bundle, "write the bundle there"))
    for i, crl in enumerate(ident.crl):
        where = "identity.crl" if len(ident.crl) == 1 else f"identity.crl[{i}]"
        wanted.append((where, crl, "write the CRL there"))
    if config.policy is not None:
        wanted.append(("policy", config.policy, "write one (see config/policy.yaml)"))
    problems = []
    for where, path, hint in wanted:
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as exc:
            problems.append(Problem(where, f"{path}: {exc.strerror}; {hint}, or fix the path"))
            continue
        if is_dir:
            problems.append(Problem(where, f"{path} is a directory; name the file inside it"))
    return problems
