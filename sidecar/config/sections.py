"""Each section of the file -> its frozen object, and the checks across sections (names,
listen addresses, settings not supported yet)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from sidecar.config.document import _find, _Reader
from sidecar.config.schema import (
    NOT_SUPPORTED_YET,
    Address,
    AdminConfig,
    Config,
    IdentityConfig,
    InboundListener,
    Limits,
    LogConfig,
    LogFormat,
    LogLevel,
    OutboundListener,
    TlsConfig,
)
from sidecar.config.values import (
    _WILDCARD_HOSTS,
    _bool,
    _choice,
    _connect_to,
    _count,
    _expected_id,
    _forward_to,
    _group,
    _head_bytes,
    _kind,
    _ktls,
    _listen,
    _name,
    _positive_duration,
    _server_name,
    _tls_version,
    _trust_domain,
    _workers,
    parse_duration,
)
from sidecar.modes import ListenerProtocol, SessionStore
from sidecar.spiffe import SpiffeId, SpiffePattern
from sidecar.strict_yaml import show as _show
from sidecar.workload_endpoint import ENDPOINT_ENV, WorkloadAddress, parse_workload_address


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

    if identity.workload_api is not None and workers != 1:
        r.report("workers", "more than one worker with identity.workload_api is not "
                 "supported yet (each worker would hold its own stream to the agent); set "
                 "workers: 1, or have spiffe-helper write the SVID files")
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
    address, from_env = _workload_api(r, m)
    spiffe_id = r.value(m, "spiffe_id", "identity", _spiffe_id, None)
    if address is not None:
        files = [key for key in _FILE_SOURCE_KEYS if key in m]
        if files:
            r.report("identity", f"takes its SVID from the Workload API ({address}) or from "
                     f"files, not both: remove {', '.join(files)}, or workload_api")
    elif spiffe_id is not None:
        r.report("identity.spiffe_id", "chooses among the SVIDs of the Workload API; it "
                 "needs identity.workload_api (with files, the certificate says who we are)")
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
        workload_api=address,
        spiffe_id=spiffe_id,
        workload_api_from_env=from_env,
    )


# The keys that only mean something when the SVID comes from files.
_FILE_SOURCE_KEYS = ("cert", "key", "bundle", "federated_bundles", "crl", "watch",
                     "reload_interval")


def _workload_api(r: _Reader, m: Mapping[str, object]) -> tuple[WorkloadAddress | None, bool]:
    """The Workload API address the file names; else SPIFFE_ENDPOINT_SOCKET's, when the file
    names no identity files (the SPIFFE Workload Endpoint spec's default); else None."""
    if "workload_api" in m:
        return r.value(m, "workload_api", "identity",
                       lambda v: parse_workload_address(_text(v), r.base), None), False
    env = os.environ.get(ENDPOINT_ENV)
    if not env or any(key in m for key in _FILE_SOURCE_KEYS):
        return None, False
    try:
        return parse_workload_address(env, r.base), True
    except ValueError as exc:
        r.report(ENDPOINT_ENV, f"(environment variable, read since the config names no "
                 f"identity files) {exc}")
        return None, False


def _spiffe_id(raw: object) -> SpiffeId:
    return SpiffeId.parse(_text(raw))


def _text(raw: object) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{_show(raw)} is not a string")
    return raw


def _federated_bundles(r: _Reader, raw: object) -> Mapping[str, Path]:
    where = "identity.federated_bundles"
    if raw is None:
        return MappingProxyType({})
    if not isinstance(raw, dict):
        r.report(where, f"expected a mapping of trust domain to bundle file, found {_kind(raw)}")
        return MappingProxyType({})
    bundles: dict[str, Path] = {}
    for key, value in raw.items():
        here = f"{where}.{key}"
        try:
            domain = _trust_domain(key)
        except ValueError as exc:
            r.report(here, str(exc))
            continue
        if domain in bundles:
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
    listener = InboundListener(
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
        protocol=r.value(m, "protocol", where, _choice(ListenerProtocol), ListenerProtocol.TCP),
        proxy_protocol=r.value(m, "proxy_protocol", where, _bool, False),
    )
    if listener.proxy_protocol and listener.protocol is ListenerProtocol.HTTP:
        r.report(f"{where}.proxy_protocol", "a PROXY v2 header is for tcp listeners; an http "
                 "listener tells the app who called with x-forwarded-client-cert: set false")
    return listener


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


def _expect_ids(r: _Reader, raw: object, where: str) -> tuple[SpiffePattern, ...]:
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
        groups=r.value(m, "groups", "tls", lambda v: _groups(r, v), d.groups),
    )


def _groups(r: _Reader, raw: object) -> tuple[str, ...]:
    if isinstance(raw, str):
        raise ValueError(f"expected a list, found a string; for one group write [{raw}]")
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of key-exchange groups, found {_kind(raw)}")
    if not raw:
        raise ValueError(
            "is empty: with no group no handshake could agree on a key; leave the key out "
            "for the default, [X25519, P-256, P-384]"
        )
    groups: list[str] = []
    for i, item in enumerate(raw):
        try:
            group = _group(item)
        except ValueError as exc:
            r.report(f"tls.groups[{i}]", str(exc))
            continue
        if group in groups:
            r.report(f"tls.groups[{i}]", f"{group} is already listed; name each group once")
        else:
            groups.append(group)
    return tuple(groups)


def _limits(r: _Reader, raw: object) -> Limits:
    m = r.mapping(raw, "limits", Limits)
    d = Limits()
    most = r.value(m, "max_connections", "limits", _count, d.max_connections)
    limits = Limits(
        handshake_timeout=r.value(
            m, "handshake_timeout", "limits", _positive_duration, d.handshake_timeout
        ),
        idle_timeout=r.value(m, "idle_timeout", "limits", _positive_duration, d.idle_timeout),
        connect_timeout=r.value(
            m, "connect_timeout", "limits", _positive_duration, d.connect_timeout
        ),
        max_connections=most,
        # Unset, it follows a lowered max_connections: lowering one key must not make the
        # other's default an error.
        max_pending_handshakes=r.value(
            m, "max_pending_handshakes", "limits", _count, min(d.max_pending_handshakes, most)
        ),
        max_connection_lifetime=r.value(
            m, "max_connection_lifetime", "limits", parse_duration, d.max_connection_lifetime
        ),
        max_request_head_bytes=r.value(
            m, "max_request_head_bytes", "limits", _head_bytes, d.max_request_head_bytes
        ),
        max_request_headers=r.value(
            m, "max_request_headers", "limits", _count, d.max_request_headers
        ),
        request_head_timeout=r.value(
            m, "request_head_timeout", "limits", _positive_duration, d.request_head_timeout
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
