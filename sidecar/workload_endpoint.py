"""Where the SPIFFE Workload API is, as the SPIFFE Workload Endpoint spec writes it.

An address is a URI: `unix:///absolute/path` (or `unix:/absolute/path`) for a socket file,
or `tcp://IP:port` (an IP literal: the spec forbids DNS names, since resolving one would
let the network choose who hands us our identity). A workload without a configured address
reads it from SPIFFE_ENDPOINT_SOCKET. We also take `unix:relative/path`, resolved like every
other path of the config file (against its directory), because a unix socket path holds
at most 107 bytes and a deep absolute one does not fit.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

ENDPOINT_ENV: Final = "SPIFFE_ENDPOINT_SOCKET"
# The spec's SSRF guard (section 3): every call carries this metadata, exactly.
SECURITY_HEADER: Final = ("workload.spiffe.io", "true")
# sockaddr_un.sun_path on Linux holds 108 bytes with the terminating NUL (unix(7)).
MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True, slots=True)
class WorkloadAddress:
    """A parsed Workload API address: a socket file, or an IP and port."""

    unix: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix://{self.unix}"
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host else \
            f"tcp://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class AddressError(ValueError):
    pass


def parse_workload_address(text: str, base: Path | None = None) -> WorkloadAddress:
    """`text` as a Workload API address; a relative unix path is taken against `base`.
    AddressError says which rule of the spec it breaks."""
    if text.startswith("unix:"):
        return _unix(text, base)
    if text.startswith("tcp:"):
        return _tcp(text)
    raise AddressError(f"{text!r} is not a Workload API address: write unix:///path/to/"
                       "agent.sock (a socket file) or tcp://IP:port")


def _unix(text: str, base: Path | None) -> WorkloadAddress:
    rest = text.removeprefix("unix:")
    if rest.startswith("//"):
        parts = urlsplit(text)
        if parts.netloc:
            raise AddressError(f"{text!r}: a unix address has no authority (host); write "
                               f"unix:///{parts.netloc}{parts.path} for an absolute path")
        rest = parts.path
        if parts.query or parts.fragment:
            raise AddressError(f"{text!r}: a unix address has no query or fragment")
    if not rest:
        raise AddressError(f"{text!r}: a unix address needs the socket's path")
    path = Path(rest)
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise AddressError(f"{text!r}: the socket path {path} is {size} bytes; a unix socket "
                           f"path holds at most {MAX_SOCKET_PATH} (use a shorter one)")
    return WorkloadAddress(unix=path)


def _tcp(text: str) -> WorkloadAddress:
    parts = urlsplit(text)
    if not text.startswith("tcp://") or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise AddressError(f"{text!r}: write tcp://IP:port and nothing else")
    try:
        host = parts.hostname or ""
        ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{text!r}: the host must be an IP address; the spec forbids DNS "
                           "names for the Workload API") from None
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise AddressError(f"{text!r}: a tcp address needs a port (1-65535)")
    return WorkloadAddress(host=host, port=port)
