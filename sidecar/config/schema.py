"""The config schema: enums and frozen dataclasses whose field names are the YAML keys
and whose defaults are SPEC.md's, and the settings refused as not supported yet. The
choices tls/ and proxy/ act on (protocol, TLS version, kTLS mode, session store) are
defined in sidecar/modes.py and re-exported by the config package."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from sidecar.modes import KtlsMode, ListenerProtocol, SessionStore, TlsVersion
from sidecar.spiffe import SpiffeId, SpiffePattern
from sidecar.workload_endpoint import WorkloadAddress

DEFAULT_CONFIG_ENV: Final = "SIDECAR_CONFIG"

# spiffe-helper's file names in the directory the SPIFFE CSI driver usually mounts.
_SPIFFE_DIR: Final = Path("/run/spiffe")


class IdentitySource(StrEnum):
    FILES = "files"
    WORKLOAD_API = "workload_api"


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
    # The SPIFFE Workload API instead of the files: where it is, and which of its SVIDs
    # to take (the first when None).
    workload_api: WorkloadAddress | None = None
    spiffe_id: SpiffeId | None = None
    # The address came from SPIFFE_ENDPOINT_SOCKET, not the file (`check` says so).
    workload_api_from_env: bool = field(default=False, metadata={"yaml": False})

    @property
    def source(self) -> IdentitySource:
        return IdentitySource.FILES if self.workload_api is None else IdentitySource.WORKLOAD_API


@dataclass(frozen=True, slots=True)
class InboundListener:
    name: str
    listen: Address
    forward_to: Address
    protocol: ListenerProtocol = ListenerProtocol.TCP
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class OutboundListener:
    name: str
    listen: Address
    connect_to: Address
    server_name: str  # SNI; the parser defaults it to connect_to's host
    expect_ids: tuple[SpiffePattern, ...]  # exact SPIFFE IDs or spiffe://TD/*


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
    # Key exchange, by OpenSSL's names; elliptic-curve groups only (values.py says why).
    groups: tuple[str, ...] = ("X25519", "P-256", "P-384")


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_connections: int = 10_000
    max_pending_handshakes: int = 1024
    max_connection_lifetime: float = 0.0  # 0 = unlimited
    # http listeners: a request head (request line and header fields) larger than this,
    # with more fields than this, or not complete this long after its first byte, is
    # answered 400 (408 for the time) and its connection closed.
    max_request_head_bytes: int = 64 * 1024
    max_request_headers: int = 100
    request_head_timeout: float = 30.0


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
)
