"""Where `sidecar diagnose` and `sidecar inspect` take an identity from, besides the files
named on their command line: a SPIFFE Workload API agent (`--workload-api ADDR`, with
`--spiffe-id ID` to choose among its SVIDs, as identity.workload_api and
identity.spiffe_id do) or a sidecar config (`-c FILE`), whose identity section names
either files or an agent. One place for the flags, for the rule that a command takes its
identity from one source only, and for the words of each failure.

`-c` is explicit: $SIDECAR_CONFIG is not read here, so that a bare `sidecar diagnose
HOST:PORT` stays the plain TLS client it always was, even inside the sidecar's container.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.identity import Identity
from sidecar.problems import ProblemsError
from sidecar.spiffe import SpiffeId, SpiffeIdError
from sidecar.workload_endpoint import AddressError, WorkloadAddress, parse_workload_address

# As `sidecar check`: an agent that has not answered by then is stalled, and says so.
AGENT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class AgentSource:
    """An agent to ask, and which of its SVIDs to take (None: the first)."""

    address: WorkloadAddress
    wanted: SpiffeId | None
    asked_by: str  # who chose `wanted`, for the problem when the agent lacks it
    origin: str  # where the address came from, for the words

    def __str__(self) -> str:
        return f"the Workload API at {self.address} ({self.origin})"


@dataclass(frozen=True, slots=True)
class FileSource:
    """The identity files a config names."""

    config: Path
    cert: Path
    key: Path
    bundle: Path
    federated: Mapping[str, Path]
    crls: tuple[Path, ...]

    def __str__(self) -> str:
        return f"the files of {self.config} ({self.cert}, {self.key}, {self.bundle})"


class SourceError(Exception):
    """No identity from the source, and why. `usage`: no retry would help (exit 2)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def _address(text: str) -> WorkloadAddress:
    try:
        return parse_workload_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spiffe_id(text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser, files: str) -> None:
    """-c, --workload-api and --spiffe-id; `files` names the command's own file flags."""
    p.add_argument("-c", "--config", type=Path, metavar="FILE",
                   help="take the identity a sidecar config names: its identity files, or "
                   f"its identity.workload_api and identity.spiffe_id (instead of {files}; "
                   "$SIDECAR_CONFIG is not read)")
    p.add_argument("--workload-api", type=_address, metavar="ADDR",
                   help="take the identity from the SPIFFE Workload API at ADDR "
                   f"(unix:///path/agent.sock or tcp://IP:PORT) instead of {files}, as "
                   "identity.workload_api does")
    p.add_argument("--spiffe-id", type=_spiffe_id, metavar="ID",
                   help="with --workload-api: which of the agent's SVIDs to take "
                   "(default: the first), as identity.spiffe_id does")


def check_exclusive(p: argparse.ArgumentParser, args: argparse.Namespace,
                    file_flags: Mapping[str, object]) -> None:
    """One identity source: exits 2 (argparse's usage error) naming the clash."""
    given = [flag for flag, value in file_flags.items() if value]
    sources = [flag for flag, on in (("--workload-api", args.workload_api),
                                     ("-c", args.config)) if on]
    if len(sources) > 1 or (sources and given):
        p.error(f"{' and '.join(sources + given)}: the identity comes from one source; "
                f"give {sources[0]} alone, or the files")
    if args.spiffe_id is not None and args.workload_api is None:
        p.error("--spiffe-id chooses among the SVIDs of --workload-api; give that too"
                + (" (with -c, the config's identity.spiffe_id chooses)" if args.config
                   else ""))


def from_args(args: argparse.Namespace) -> AgentSource | FileSource | None:
    """The source the flags name; None: the command's own file flags (or none at all).
    SourceError when -c names a config that cannot be read."""
    if args.workload_api is not None:
        return AgentSource(args.workload_api, args.spiffe_id, "--spiffe-id", "--workload-api")
    if args.config is not None:
        return from_config(args.config)
    return None


def from_config(path: Path) -> AgentSource | FileSource:
    """The identity source of the config at `path`, as `run` would take it (with
    SPIFFE_ENDPOINT_SOCKET when the config names no identity files)."""
    from sidecar.config import load_config

    try:
        # The files are looked at by the command, which says more about them than
        # "file not found".
        config = load_config(path, check_files=False)
    except ProblemsError as exc:
        raise SourceError(f"{path} is not a valid config: "
                          + "; ".join(str(p) for p in exc.problems)) from None
    ident = config.identity
    if ident.workload_api is not None:
        from sidecar.workload_endpoint import ENDPOINT_ENV

        origin = f"{ENDPOINT_ENV}, as {path} names no identity files" \
            if ident.workload_api_from_env else f"identity.workload_api of {path}"
        return AgentSource(ident.workload_api, ident.spiffe_id,
                           f"identity.spiffe_id of {path}", origin)
    return FileSource(path, ident.cert, ident.key, ident.bundle, ident.federated_bundles,
                      ident.crl)


def fetch(source: AgentSource) -> Any:
    """The agent's first answer, as it is. SourceError says why there is none."""
    from sidecar.sources import workload_api  # grpc: only when an agent is asked

    try:
        return workload_api.fetch_response(source.address, AGENT_TIMEOUT)
    except workload_api.MissingExtra as exc:
        raise SourceError(str(exc), usage=True) from None
    except ProblemsError as exc:
        raise SourceError(f"no answer from {source}: "
                          + "; ".join(p.message for p in exc.problems)) from None


def identity_of(source: AgentSource) -> Identity:
    """Our identity from the agent, checked as `run` checks it. SourceError says why not:
    no answer, no SVID `wanted` names, or one `run` would refuse."""
    from sidecar.identity import identity_from_der
    from sidecar.sources.workload_response import choose, offers

    response = fetch(source)
    try:
        return identity_from_der(choose(offers(response), source.wanted,
                                        source.asked_by).material)
    except ProblemsError as exc:
        raise SourceError(f"{source} answered, but with no identity `run` would take: "
                          + "; ".join(str(p) for p in exc.problems)) from None
