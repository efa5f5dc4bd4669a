"""What one run is: the modes, the checked Plan, and the request it sends (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sidecar.spiffe import SpiffePattern

_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"


class Mode(StrEnum):
    FULL = "full"
    RESUME = "resume"
    REUSE = "reuse"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a run needs, parsed and checked once."""

    host: str
    port: int
    server_name: str
    modes: tuple[Mode, ...]
    concurrency: int
    duration: float
    requests: int | None
    payload: bytes
    response_bytes: int
    echo: bool
    expect_id: SpiffePattern | None
    metrics_url: str | None
    timeout: float
    as_json: bool
    plot: str | None
    progress: bool

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def request_payload(size: int) -> bytes:
    """`size` bytes ending in a newline whose line reads the same backwards."""
    body = size - 1
    half = bytes(_ALPHABET[i % len(_ALPHABET)] for i in range((body + 1) // 2))
    return half + half[: body // 2][::-1] + b"\n"
