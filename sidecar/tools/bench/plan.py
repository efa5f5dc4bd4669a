"""What one run is: the modes, the checked Plan, and the request it sends (pure)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from sidecar.spiffe import SpiffePattern

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"


class ConnectionMode(StrEnum):
    """How each request gets its connection: a full handshake, a resumed one, or reuse."""

    FULL = "full"
    RESUME = "resume"
    REUSE = "reuse"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run needs, parsed and checked once."""

    host: str
    port: int
    server_name: str
    modes: tuple[ConnectionMode, ...]
    concurrency: int
    duration: float
    requests: int | None
    payload: bytes
    response_bytes: int
    echo: bool
    expect_id: SpiffePattern | None
    metrics_url: str | None
    target_pids: tuple[int, ...]
    timeout: float
    as_json: bool
    plot: str | None
    progress: bool
    # Requests per connection in full and resume modes (reuse keeps its connection).
    per_connection: int = 1
    # Open loop: requests per second over all workers, each timed from when it was due.
    rate: float | None = None
    sweep: bool = False
    # Plain TCP to a sidecar's outbound listener: the outbound makes the handshakes, full
    # or resumed as its tls.session_resumption says; the rows are labelled `plain`.
    plain: bool = False
    # --plain: an outbound listener whose sidecar resumes, for resume mode; `host:port`
    # is then one whose sidecar does not (tls.session_resumption: false).
    resumed_target: tuple[str, int] | None = None

    def for_mode(self, mode: ConnectionMode) -> Plan:
        """The plan one mode runs: --plain's resume mode goes to --resumed-target."""
        if mode is ConnectionMode.RESUME and self.resumed_target is not None:
            host, port = self.resumed_target
            return replace(self, host=host, port=port, server_name=host)
        return self

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# What `--sweep` runs: each count with full and with resumed handshakes. Up to 1000 a
# handshake's cost is still visible next to the requests' (a full one costs about as
# much server CPU as a few hundred small echoed requests).
SWEEP_PER_CONNECTION = (1, 10, 100, 1000)


def request_payload(size: int) -> bytes:
    """`size` bytes ending in a newline whose line reads the same backwards."""
    body = size - 1
    half = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range((body + 1) // 2))
    return half + half[: body // 2][::-1] + b"\n"
