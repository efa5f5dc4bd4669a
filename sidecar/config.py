"""The config file: YAML in, one frozen `Config` out, or every problem at once.

How it reads a file, and why it is shaped this way:

- The schema is the dataclasses below. Their field names are the YAML keys and their
  defaults are SPEC.md's defaults, so a key is added in one place.
- A `_Reader` walks the document and never stops at the first problem: a user fixing a
  file wants the whole list. A bad value is recorded with its YAML path
  (`inbound[0].listen`) and replaced by the default so the walk can go on; when the walk
  ends, any problem at all raises one `ProblemsError`, so a half-valid `Config` never
  leaves this module.
- Unknown keys are errors (SPEC: a typo must not silently disable a control), and so is
  a key written twice in one mapping, which PyYAML would otherwise let the last one win.
- Settings the proxy does not implement yet are refused through `NOT_SUPPORTED_YET`,
  one line per setting; delete the line when the feature lands.
- Checking that referenced files exist is `missing_files`, apart from parsing, so tests
  and tools can validate a config written for another machine.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import reprlib
import stat
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import yaml
from yaml.nodes import MappingNode

from sidecar.problems import Problem, ProblemsError

DEFAULT_CONFIG_ENV: Final = "SIDECAR_CONFIG"

# spiffe-helper's file names in the directory the SPIFFE CSI driver usually mounts.
_SPIFFE_DIR: Final = Path("/run/spiffe")

# Linux's sockaddr_un.sun_path is 108 bytes, one of which is the terminating NUL.
_UNIX_PATH_MAX: Final = 107

# SPIFFE trust domain names: lowercase letters, digits, '.', '-', '_'; at most 255.
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]{1,255}")

# Listener names label metrics and are named by policy rules, so keep them plain.
_LISTENER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

_HOST: Final = re.compile(r"[A-Za-z0-9_.-]+")
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})

_DURATION: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|h|m|s))+")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT: Final = "use a number with a unit, like 500ms, 10s, 5m or 24h"


class Protocol(StrEnum):
    TCP = "tcp"
    HTTP = "http"


class TlsVersion(StrEnum):
    TLS_1_2 = "1.2"
    TLS_1_3 = "1.3"


class KtlsMode(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class SessionStore(StrEnum):
    """Where an inbound listener keeps what a resumption needs."""

    AUTO = "auto"  # memory with one worker, tickets with several
    MEMORY = "memory"  # this process keeps the session; the ticket is only its ID
    TICKETS = "tickets"  # the session travels encrypted in the ticket; any worker resumes


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class Address:
    """`host:port`, `[v6]:port`, or `unix:/path` (only where SPEC allows a socket file)."""

    host: str = ""
    port: int = 0
    unix: str | None = None

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    cert: Path = _SPIFFE_DIR / "svid.pem"
    key: Path = _SPIFFE_DIR / "svid_key.pem"
    bundle: Path = _SPIFFE_DIR / "bundle.pem"
    # Read-only view: trust domain -> bundle file, never merged with our own bundle.
    federated_bundles: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    crl: tuple[Path, ...] = ()
    watch: bool = True
    reload_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class InboundListener:
    name: str
    listen: Address
    forward_to: Address
    protocol: Protocol = Protocol.TCP
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class OutboundListener:
    name: str
    listen: Address
    connect_to: Address
    server_name: str  # SNI; the parser defaults it to connect_to's host
    expect_ids: tuple[str, ...]  # exact SPIFFE IDs or spiffe://TD/*


@dataclass(frozen=True, slots=True)
class TlsConfig:
    min_version: TlsVersion = TlsVersion.TLS_1_3
    session_resumption: bool = True
    session_ticket_rotation: float = 12 * 3600.0
    session_store: SessionStore = SessionStore.AUTO
    # Sessions the memory store keeps (the oldest go first); each holds the peer's
    # parsed certificate, ~6.5 KiB once its connection has closed.
    session_cache_size: int = 1024
    ktls: KtlsMode = KtlsMode.AUTO


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_connections: int = 10_000
    max_pending_handshakes: int = 1024
    max_connection_lifetime: float = 0.0  # 0 = unlimited


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9901)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    inbound: tuple[InboundListener, ...] = ()
    outbound: tuple[OutboundListener, ...] = ()
    policy: Path | None = None
    policy_recheck: bool = True
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)
    clock_skew_hint: float = 300.0
    workers: int | None = 1  # None: `auto`, one per usable CPU
    admin: AdminConfig = field(default_factory=AdminConfig)
    drain_timeout: float = 30.0
    log: LogConfig = field(default_factory=LogConfig)
    source: Path  # the file this came from; not a YAML key


@dataclass(frozen=True, slots=True)
class Unsupported:
    path: str  # YAML path; `[]` stands for every item of a list
    applies: Callable[[Any], bool]  # given the parsed value of a key the file sets
    reason: str
    instead: str


def _is(expected: object) -> Callable[[object], bool]:
    return lambda value: value == expected


# A setting the proxy cannot honour yet is refused, never silently ignored. Delete a line
# when its feature lands.
NOT_SUPPORTED_YET: Final[tuple[Unsupported, ...]] = (
    Unsupported("inbound[].protocol", _is("http"), "per-request HTTP policy is planned", "use tcp"),
    Unsupported("inbound[].proxy_protocol", _is(True), "PROXY v2 headers are planned", "set false"),
)


def parse_duration(value: object) -> float:
    """`500ms`, `10s`, `5m`, `24h`, `1h30m` or `0` -> seconds; ValueError says why not.

    A bare number other than 0 is refused: whether `30` meant seconds or minutes would be
    a guess, and a timeout off by 60x is an outage or a hole, so the unit must be written.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration, found {_kind(value)}: {_DURATION_HINT}")
    if value in (0, "0"):
        return 0.0
    if not isinstance(value, str) or re.fullmatch(r"[0-9.]+", value):
        n = value if len(str(value)) < 10 else 30
        raise ValueError(
            f"{_show(value)} has no unit: write one, like {n}s or {n}m "
            "(a bare number could mean either)"
        )
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a duration: {_DURATION_HINT}")
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    if not math.isfinite(seconds):
        raise ValueError(f"{_show(value)} is too long to be a duration")
    return seconds


def parse_address(value: object, *, allow_unix: bool = False, listen: bool = False) -> Address:
    """`host:port`, `[v6]:port` or (with allow_unix) `unix:/abs/path`; ValueError says why not.

    Port 0 is accepted only for a `listen` address, where it asks the kernel for a free
    port: tests bind ephemeral ports that way. Elsewhere port 0 is never a real peer.
    """
    if not isinstance(value, str):
        raise ValueError(f"expected an address like 127.0.0.1:8080, found {_kind(value)}")
    if value.startswith("unix:"):
        return _unix_address(value, allow_unix)
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise ValueError(f"{_show(value)} has no port: write host:port, like {value}:8443")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(value)}: [{host}] is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{_show(value)}: an IPv6 address needs brackets, like [::1]:8443")
    elif not host:
        raise ValueError(
            f"{_show(value)} has no host: write 127.0.0.1{value} for loopback only, "
            f"or 0.0.0.0{value} for every interface"
        )
    elif not _HOST.fullmatch(host):
        raise ValueError(f"{_show(value)}: {host!r} is not a host name or IP address")
    lowest = 0 if listen else 1
    port = int(port_text) if re.fullmatch(r"[0-9]{1,5}", port_text) else -1
    if not lowest <= port <= 65535:
        raise ValueError(f"{_show(value)}: the port must be a number from {lowest} to 65535")
    return Address(host, port)


def _unix_address(value: str, allowed: bool) -> Address:
    if not allowed:
        raise ValueError(
            f"{_show(value)}: a unix socket is only allowed in inbound[].forward_to; "
            "use host:port here"
        )
    path = value.removeprefix("unix:")
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"{_show(value)}: write an absolute path, like unix:/run/app.sock")
    if len(path.encode()) > _UNIX_PATH_MAX:
        raise ValueError(
            f"{_show(value)}: the path is longer than the kernel's {_UNIX_PATH_MAX} bytes "
            "for a socket file; use a shorter one"
        )
    return Address(unix=path)


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
    wanted: list[tuple[str, Path, str]] = [
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


# libyaml's loader where installed: the pure-Python one takes seconds on a deeply nested
# hostile file (fuzzed: 5,000 levels took 1.3-4 s), libyaml milliseconds.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a key written twice in one mapping.

    Plain PyYAML lets the last one win, so a second `listen:` pasted into a listener would
    quietly replace the first: the typo the unknown-key rule exists to catch.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_lines: dict[tuple[type, object], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<:` may be overridden; that is their point
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_lines.get((type(key), key))
            except TypeError:
                continue  # unhashable; the base class reports it with its position
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {_show(key)} is written twice (first on line {first_line + 1}); keep one",
                    key_node.start_mark,
                )
            first_lines[(type(key), key)] = key_node.start_mark.line
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return mapping


def _load_yaml(text: str) -> object:
    where, message = "", ""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = exc.problem or exc.context or "unreadable"
    except yaml.YAMLError as exc:
        message = str(exc)
    except ValueError as exc:  # PyYAML lets some bad scalars through: 2024-13-01, huge ints
        message = f"a value is out of range: {exc}"
    except RecursionError:
        message = "nested too deeply"
    raise ProblemsError([Problem(where, f"not valid YAML: {message}")])


class _Reader:
    """Walks the YAML document, keeping every problem instead of stopping at the first."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[Problem] = []
        self.bad: set[str] = set()  # YAML paths with a problem; cross-checks skip them
        self.parsed: dict[str, object] = {}  # YAML path -> parsed value, for NOT_SUPPORTED_YET

    def report(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))
        self.bad.add(where)

    def mapping(self, raw: object, where: str, schema: type) -> dict[str, object]:
        """The known keys of `raw`, a mapping whose keys are the fields of `schema`."""
        known = [f.name for f in fields(schema) if f.name != "source"]
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(
                where, f"expected a mapping with keys {', '.join(known)}; found {_kind(raw)}"
            )
            return {}
        for key in raw:
            if key not in known:
                self.report(_join(where, str(key)), _unknown_key(str(key), known))
        return {k: v for k, v in raw.items() if k in known}

    def sequence(self, raw: object, where: str) -> list[object]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            hint = f"; for one item write [{raw}]" if isinstance(raw, str) else ""
            self.report(where, f"expected a list, found {_kind(raw)}{hint}")
            return []
        return raw

    def value[T](
        self,
        m: Mapping[str, object],
        key: str,
        where: str,
        parse: Callable[[object], T],
        default: T,
        *,
        missing: str = "",
    ) -> T:
        """Parse `m[key]`; a problem (or a missing required key) gives back `default`."""
        path = _join(where, key)
        if key not in m:
            if missing:
                self.report(path, f"is required: {missing}")
            return default
        try:
            parsed = parse(m[key])
        except ValueError as exc:
            self.report(path, str(exc))
            return default
        self.parsed[path] = parsed
        return parsed

    def path(self, raw: object) -> Path:
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise ValueError(f"expected a file path, found {_kind(raw)}")
        return self.base / raw  # an absolute `raw` replaces base

    def optional_path(self, raw: object) -> Path | None:
        return None if raw is None else self.path(raw)


def _build(r: _Reader, document: object, source: Path) -> Config:
    top = r.mapping(document, "", Config)
    d = Config(source=source)
    identity = _identity(r, top.get("identity"))
    inbound = [
        (f"inbound[{i}]", _inbound(r, raw, f"inbound[{i}]"))
        for i, raw in enumerate(r.sequence(top.get("inbound"), "inbound"))
    ]
    outbound = [
        (f"outbound[{i}]", _outbound(r, raw, f"outbound[{i}]"))
        for i, raw in enumerate(r.sequence(top.get("outbound"), "outbound"))
    ]
    policy = r.value(top, "policy", "", r.optional_path, d.policy)
    policy_recheck = r.value(top, "policy_recheck", "", _bool, d.policy_recheck)
    tls = _tls(r, top.get("tls"))
    limits = _limits(r, top.get("limits"))
    clock_skew_hint = r.value(top, "clock_skew_hint", "", parse_duration, d.clock_skew_hint)
    workers = r.value(top, "workers", "", _workers, d.workers)
    admin = r.mapping(top.get("admin"), "admin", AdminConfig)
    admin_listen = r.value(admin, "listen", "admin", _listen, d.admin.listen)
    drain_timeout = r.value(top, "drain_timeout", "", parse_duration, d.drain_timeout)
    log = _log(r, top.get("log"))

    listeners = [(where, x) for where, x in [*inbound, *outbound] if x is not None]
    _check_names(r, [(where, x.name) for where, x in listeners])
    listens = [(f"{where}.listen", x.listen) for where, x in listeners]
    _check_listen_addresses(r, [*listens, ("admin.listen", admin_listen)])
    if any(x for _, x in inbound) and policy is None and "policy" not in r.bad:
        r.report(
            "policy",
            "is required with an inbound listener: there is no implicit "
            "allow-all. Write a policy file (see config/policy.yaml) and name it here; "
            "to admit every authenticated peer, write `default: allow` in it explicitly",
        )
    return Config(
        identity=identity,
        inbound=tuple(x for _, x in inbound if x is not None),
        outbound=tuple(x for _, x in outbound if x is not None),
        policy=policy,
        policy_recheck=policy_recheck,
        tls=tls,
        limits=limits,
        clock_skew_hint=clock_skew_hint,
        workers=workers,
        admin=AdminConfig(admin_listen),
        drain_timeout=drain_timeout,
        log=log,
        source=source,
    )


def _identity(r: _Reader, raw: object) -> IdentityConfig:
    m = r.mapping(raw, "identity", IdentityConfig)
    d = IdentityConfig()
    return IdentityConfig(
        cert=r.value(m, "cert", "identity", r.path, d.cert),
        key=r.value(m, "key", "identity", r.path, d.key),
        bundle=r.value(m, "bundle", "identity", r.path, d.bundle),
        federated_bundles=_federated_bundles(r, m.get("federated_bundles")),
        crl=r.value(m, "crl", "identity", lambda v: _crl(r, v), d.crl),
        watch=r.value(m, "watch", "identity", _bool, d.watch),
        reload_interval=r.value(
            m, "reload_interval", "identity", parse_duration, d.reload_interval
        ),
    )


def _federated_bundles(r: _Reader, raw: object) -> Mapping[str, Path]:
    where = "identity.federated_bundles"
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, dict):
        r.report(where, f"expected a mapping of trust domain to bundle file, found {_kind(raw)}")
        return MappingProxyType({})
    bundles: dict[str, Path] = {}
    for key, value in raw.items():
        domain = str(key).lower()
        here = f"{where}.{key}"
        if not _TRUST_DOMAIN.fullmatch(domain):
            r.report(
                here,
                f"{_show(key)} is not a trust domain name: use lowercase letters, "
                "digits, '.', '-' and '_' (at most 255), like example.org",
            )
        elif domain in bundles:
            r.report(here, f"trust domain {domain} is listed twice; keep one")
        else:
            bundles[domain] = r.value({domain: value}, domain, where, r.path, Path())
    return MappingProxyType(bundles)


def _crl(r: _Reader, raw: object) -> tuple[Path, ...]:
    """null, one path, or a list of paths."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        return (r.path(raw),)
    paths = []
    for i, item in enumerate(raw):
        try:
            paths.append(r.path(item))
        except ValueError as exc:
            r.report(f"identity.crl[{i}]", str(exc))
    return tuple(paths)


def _inbound(r: _Reader, raw: object, where: str) -> InboundListener | None:
    if not isinstance(raw, dict):
        r.report(
            where, f"expected a listener mapping (name, listen, forward_to), found {_kind(raw)}"
        )
        return None
    m = r.mapping(raw, where, InboundListener)
    return InboundListener(
        name=r.value(m, "name", where, _name, "", missing="give the listener a name"),
        listen=r.value(
            m,
            "listen",
            where,
            _listen,
            Address(),
            missing="the address to accept mTLS on, like 0.0.0.0:8443",
        ),
        forward_to=r.value(
            m,
            "forward_to",
            where,
            _forward_to,
            Address(),
            missing="the local app's address, like 127.0.0.1:8080",
        ),
        protocol=r.value(m, "protocol", where, _choice(Protocol), Protocol.TCP),
        proxy_protocol=r.value(m, "proxy_protocol", where, _bool, False),
    )


def _outbound(r: _Reader, raw: object, where: str) -> OutboundListener | None:
    if not isinstance(raw, dict):
        r.report(
            where,
            f"expected a listener mapping (name, listen, connect_to, expect_ids), "
            f"found {_kind(raw)}",
        )
        return None
    m = r.mapping(raw, where, OutboundListener)
    name = r.value(m, "name", where, _name, "", missing="give the listener a name")
    listen = r.value(
        m,
        "listen",
        where,
        _listen,
        Address(),
        missing="the loopback address the app connects to, like 127.0.0.1:9001",
    )
    connect_to = r.value(
        m,
        "connect_to",
        where,
        _connect_to,
        Address(),
        missing="the remote workload's address, like payments:8443",
    )
    return OutboundListener(
        name=name,
        listen=listen,
        connect_to=connect_to,
        server_name=r.value(m, "server_name", where, _server_name, connect_to.host),
        expect_ids=r.value(
            m,
            "expect_ids",
            where,
            lambda v: _expect_ids(r, v, where),
            (),
            missing="the SPIFFE IDs the server may present, or spiffe://TD/*",
        ),
    )


def _expect_ids(r: _Reader, raw: object, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raise ValueError(f"expected a list, found a string; for one ID write [{raw}]")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"expected a non-empty list of SPIFFE IDs, found {_kind(raw)}")
    ids = []
    for i, item in enumerate(raw):
        try:
            ids.append(_expected_id(item))
        except ValueError as exc:
            r.report(f"{where}.expect_ids[{i}]", str(exc))
    return tuple(ids)


def _expected_id(raw: object) -> str:
    # Light checks only; sidecar/spiffe.py owns the full SPIFFE ID rules.
    if not isinstance(raw, str) or not raw.startswith("spiffe://"):
        raise ValueError(
            f"{_show(raw)} is not a SPIFFE ID: write it like "
            "spiffe://example.org/ns/default/sa/payments"
        )
    domain, _, path = raw.removeprefix("spiffe://").partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise ValueError(
            f"{_show(raw)}: the trust domain {domain!r} must be lowercase "
            "letters, digits, '.', '-' and '_'"
        )
    if "*" in raw and path != "*":
        raise ValueError(
            f"{_show(raw)}: a wildcard must be the whole path, spiffe://{domain}/*, "
            "which accepts any workload of that trust domain"
        )
    return raw


def _tls(r: _Reader, raw: object) -> TlsConfig:
    m = r.mapping(raw, "tls", TlsConfig)
    d = TlsConfig()
    return TlsConfig(
        min_version=r.value(m, "min_version", "tls", _tls_version, d.min_version),
        session_resumption=r.value(m, "session_resumption", "tls", _bool, d.session_resumption),
        session_ticket_rotation=r.value(
            m, "session_ticket_rotation", "tls", _positive_duration, d.session_ticket_rotation
        ),
        session_store=r.value(m, "session_store", "tls", _choice(SessionStore), d.session_store),
        session_cache_size=r.value(
            m, "session_cache_size", "tls", _count, d.session_cache_size),
        ktls=r.value(m, "ktls", "tls", _ktls, d.ktls),
    )


def _limits(r: _Reader, raw: object) -> Limits:
    m = r.mapping(raw, "limits", Limits)
    d = Limits()
    limits = Limits(
        handshake_timeout=r.value(
            m, "handshake_timeout", "limits", _positive_duration, d.handshake_timeout
        ),
        idle_timeout=r.value(m, "idle_timeout", "limits", _positive_duration, d.idle_timeout),
        connect_timeout=r.value(
            m, "connect_timeout", "limits", _positive_duration, d.connect_timeout
        ),
        max_connections=r.value(m, "max_connections", "limits", _count, d.max_connections),
        max_pending_handshakes=r.value(
            m, "max_pending_handshakes", "limits", _count, d.max_pending_handshakes
        ),
        max_connection_lifetime=r.value(
            m, "max_connection_lifetime", "limits", parse_duration, d.max_connection_lifetime
        ),
    )
    pending, most = limits.max_pending_handshakes, limits.max_connections
    if pending > most and not r.bad & {"limits.max_pending_handshakes", "limits.max_connections"}:
        r.report(
            "limits.max_pending_handshakes",
            f"{pending} is more than max_connections ({most}), and every pending "
            "handshake is a connection; lower it or raise max_connections",
        )
    return limits


def _log(r: _Reader, raw: object) -> LogConfig:
    m = r.mapping(raw, "log", LogConfig)
    d = LogConfig()
    return LogConfig(
        level=r.value(m, "level", "log", _choice(LogLevel), d.level),
        format=r.value(m, "format", "log", _choice(LogFormat), d.format),
    )


def _check_names(r: _Reader, named: list[tuple[str, str]]) -> None:
    first: dict[str, str] = {}
    for where, name in named:
        if not name or f"{where}.name" in r.bad:
            continue
        if name in first:
            r.report(
                f"{where}.name",
                f"{name!r} is already the name of {first[name]}; listener "
                "names must be unique across inbound and outbound (metrics and policy "
                "rules name them)",
            )
        else:
            first[name] = where


def _check_listen_addresses(r: _Reader, listens: list[tuple[str, Address]]) -> None:
    # Port 0 asks the kernel for a fresh port each time, so it never collides. A wildcard
    # host takes the port on every interface: 0.0.0.0:8443 and 127.0.0.1:8443 collide.
    for i, (where, address) in enumerate(listens):
        for earlier_where, earlier in listens[:i]:
            hosts = {earlier.host, address.host}
            same_host = len(hosts) == 1 or hosts & _WILDCARD_HOSTS
            if address.port != 0 and address.port == earlier.port and same_host:
                r.report(
                    where,
                    f"{address} is already taken by {earlier_where} ({earlier}); "
                    "give each listener its own port",
                )
                break


def _refuse_unsupported(r: _Reader, document: object) -> None:
    for entry in NOT_SUPPORTED_YET:
        for where, raw in _find(document, entry.path.split("."), ""):
            if where in r.parsed and entry.applies(parsed := r.parsed[where]):
                shown = parsed if isinstance(parsed, StrEnum) else raw  # YAML reads `on` as true
                r.report(
                    where, f"{_show(shown)} is not supported yet ({entry.reason}); {entry.instead}"
                )


def _find(node: object, segments: list[str], where: str) -> Iterator[tuple[str, object]]:
    """Each (YAML path, raw value) the document sets for a NOT_SUPPORTED_YET pattern."""
    if not segments:
        yield where, node
        return
    head, *rest = segments
    key = head.removesuffix("[]")
    if not isinstance(node, dict) or key not in node:
        return
    child, here = node[key], _join(where, key)
    if head == key:
        yield from _find(child, rest, here)
    elif isinstance(child, list):
        for i, item in enumerate(child):
            yield from _find(item, rest, f"{here}[{i}]")


def _listen(raw: object) -> Address:
    return parse_address(raw, listen=True)


def _forward_to(raw: object) -> Address:
    return parse_address(raw, allow_unix=True)


def _connect_to(raw: object) -> Address:
    return parse_address(raw)


def _positive_duration(raw: object) -> float:
    seconds = parse_duration(raw)
    if seconds <= 0:
        raise ValueError(
            f"must be longer than 0, which would end every attempt at once; {_DURATION_HINT}"
        )
    return seconds


def _count(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f"expected a whole number of at least 1, found {_show(raw)}")
    return raw


def _workers(raw: object) -> int | None:
    if raw == "auto":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ValueError(f"expected a whole number of at least 1 or auto, found {_show(raw)}")
    return raw


def _bool(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"expected true or false, found {_show(raw)}")
    return raw


def _name(raw: object) -> str:
    if not isinstance(raw, str) or not _LISTENER_NAME.fullmatch(raw):
        raise ValueError(
            f"{_show(raw)} is not a listener name: use letters, digits, '.', '-' "
            "and '_', starting with a letter or digit (it labels metrics)"
        )
    return raw


def _server_name(raw: object) -> str:
    if not isinstance(raw, str) or not _HOST.fullmatch(raw):
        raise ValueError(
            f"{_show(raw)} is not a server name: write a DNS name, like payments.default.svc"
        )
    return raw


def _choice[E: StrEnum](enum: type[E]) -> Callable[[object], E]:
    def parse(raw: object) -> E:
        if isinstance(raw, str) and raw in [member.value for member in enum]:
            return enum(raw)
        raise ValueError(f"{_show(raw)} is not one of {', '.join(enum)}")

    return parse


def _ktls(raw: object) -> KtlsMode:
    # YAML 1.1 reads a bare `on` / `off` as a boolean; take them as the user wrote them.
    if isinstance(raw, bool):
        return KtlsMode.ON if raw else KtlsMode.OFF
    return _choice(KtlsMode)(raw)


def _tls_version(raw: object) -> TlsVersion:
    # An unquoted `min_version: 1.3` arrives as the float 1.3.
    if isinstance(raw, float):
        raw = repr(raw)
    return _choice(TlsVersion)(raw)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown key {_show(key)}; did you mean {close[0]!r}?"
    return f"unknown key {_show(key)}; the keys here are {', '.join(known)}"


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{_show(value)} (a boolean)"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


# repr() of a YAML alias bomb (a small file whose aliases expand exponentially) would
# take minutes and gigabytes; reprlib stops after a few items and levels.
_BOUNDED = reprlib.Repr(maxlevel=2, maxlist=4, maxdict=4, maxstring=80, maxother=80)


def _show(value: object) -> str:
    """A value as the user wrote it in YAML, cut short: messages must stay one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = _BOUNDED.repr(value.value if isinstance(value, StrEnum) else value)
    return text if len(text) <= 80 else text[:77] + "..."
