"""One YAML scalar -> one typed value (durations, addresses, names, SPIFFE IDs, choices),
or a ValueError whose message says what is wrong and how to write it."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Final

from sidecar import spiffe
from sidecar.config.schema import Address
from sidecar.modes import KtlsMode, TlsVersion
from sidecar.strict_yaml import show as _show

# Linux's sockaddr_un.sun_path is 108 bytes, one of which is the terminating NUL.
_UNIX_PATH_MAX: Final = 107

# Listener names label metrics and are named by policy rules, so keep them plain.
_LISTENER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

_HOST: Final = re.compile(r"[A-Za-z0-9_.-]+")
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::"})

# tls.groups: the elliptic-curve groups OpenSSL 3.0 does in TLS, by the names it takes.
# Server CPU for one ClientHello with each as its key share, ECDSA P-256 SVID, OpenSSL
# 3.0 (bench/hello_cost.py): X25519 0.2 ms, P-256 0.3, X448 0.6, P-521 1.0, P-384 2.2.
KEY_EXCHANGE_GROUPS: Final = ("X25519", "P-256", "P-384", "P-521", "X448")
# Finite-field groups (RFC 7919) are refused: ffdhe2048 costs 2.7 ms and ffdhe8192 137 ms
# of server CPU per ClientHello, before the peer is authenticated.
_FINITE_FIELD_GROUPS: Final = ("ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")
_GROUP_ALIASES: Final = {
    "x25519": "X25519", "x448": "X448", "prime256v1": "P-256", "secp256r1": "P-256",
    "secp384r1": "P-384", "secp521r1": "P-521", "p-256": "P-256", "p-384": "P-384",
    "p-521": "P-521",
}

_DURATION: Final = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|h|m|s))+")
_DURATION_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT: Final = "use a number with a unit, like 500ms, 10s, 5m or 24h"


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


def _expected_id(raw: object) -> spiffe.SpiffePattern:
    # spiffe.py owns the SPIFFE-ID rules: an entry no valid ID can equal is refused there.
    if not isinstance(raw, str):
        raise ValueError(
            f"{_show(raw)} is not a SPIFFE ID: write it like "
            "spiffe://example.org/ns/default/sa/payments"
        )
    try:
        return spiffe.SpiffePattern.parse(raw, prefixes=False)
    except spiffe.SpiffeIdError as exc:
        raise ValueError(
            f"{exc}; every call on this route would fail spiffe_id_mismatch. Write an ID "
            "like spiffe://example.org/ns/default/sa/payments, or spiffe://example.org/*"
        ) from None


def _trust_domain(raw: object) -> str:
    """A trust domain as a config key (federated_bundles), lowercased."""
    try:
        return spiffe.TrustDomain.parse(str(raw)).name
    except spiffe.SpiffeIdError as exc:
        raise ValueError(f"{_show(raw)} is not a trust domain name: {exc.reason}; write one "
                         "like example.org") from None


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


# A request head must hold at least a request line and a Host field; past 1 MiB a
# connection's head buffer would dwarf everything else it costs (~25 KiB).
HEAD_BYTES_MIN = 1024
HEAD_BYTES_MAX = 1024 * 1024


def _head_bytes(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not (
            HEAD_BYTES_MIN <= raw <= HEAD_BYTES_MAX):
        raise ValueError(f"expected a number of bytes from {HEAD_BYTES_MIN} to "
                         f"{HEAD_BYTES_MAX} (1 MiB), found {_show(raw)}")
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


def _group(raw: object) -> str:
    if isinstance(raw, str) and raw in KEY_EXCHANGE_GROUPS:
        return raw
    choices = ", ".join(KEY_EXCHANGE_GROUPS)
    if isinstance(raw, str) and raw.lower() in _FINITE_FIELD_GROUPS:
        raise ValueError(
            f"{_show(raw)} is a finite-field group: one ClientHello offering it costs the "
            "sidecar up to ~140 ms of CPU before the peer is authenticated, a denial of "
            f"service anyone can send; use elliptic-curve groups: {choices}"
        )
    if isinstance(raw, str) and raw.lower() in _GROUP_ALIASES:
        raise ValueError(f"{_show(raw)}: write {_GROUP_ALIASES[raw.lower()]}, its name here")
    raise ValueError(f"{_show(raw)} is not a key-exchange group; use some of {choices}")


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
