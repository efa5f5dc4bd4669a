"""A dev SPIFFE Workload API server (`sidecar pki agent`): X.509-SVIDs from the dev CA.

What it serves. `FetchX509SVID` streams one `X509SVIDResponse` at once and another after
each rotation: one `X509SVID` per entry (SPIFFE ID, DER chain leaf first, PKCS#8 DER key,
our trust domain's bundle as DER, the entry's hint), the CRLs (DER, from `revoke`) and
`federated_bundles` keyed by trust domain ID (`spiffe://other.org`). `FetchX509Bundles`
streams our bundle and the federated ones, again on every change. The JWT methods answer
Unimplemented (the servicer's default), as the spec allows.

What it refuses, as the SPIFFE Workload Endpoint spec (section 6) and SPIRE's agent say it:
a call without the metadata `workload.spiffe.io: true` gets InvalidArgument "security header
missing from request"; in `Answer.REFUSE` every call, and every open stream, gets
PermissionDenied "no identity issued" (SPIRE's words while no registration entry matches).

The control surface, for tests that exercise a Workload API client's failure handling:
- in process: an `Agent` object. `start()` binds the socket and serves; `stop()` takes the
  server down and removes the socket (an agent restarting: clients see a missing socket,
  then connection refused); `start()` again brings it back. `close()` also stops the
  rotation thread. Modes: `serve()`, `refuse()` (PermissionDenied), `stall()` (calls are
  accepted and nothing is sent until `serve()`; open streams stop getting updates).
  One-shot: `rotate()` (new keys and certificates now; returns the generation),
  `drop(Drop.END | Drop.UNAVAILABLE)` (every open stream ends cleanly or aborts with
  Unavailable; later calls are served), `federate(td, certs)` / `unfederate(td)`,
  `revoke(serial)` (the next responses carry a CRL from the intermediate).
  `sent` counts responses written, for a test that waits on one.
- out of process: `--control PATH`, a unix socket taking one command a line
  (`agent_control.py`: `rotate`, `refuse`, `stall`, `serve`, `drop end|unavailable`,
  `federate TD DIR`, `unfederate TD`, `revoke SERIAL`, `stop`, `start`, `status`).

Threads, not asyncio: grpcio's synchronous server runs each stream in a thread of its
pool; a stream waits on one condition variable that every change notifies, so a rotation
reaches every open stream at once. Needs the optional extra: `pip install 'sidecar[spire]'`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tools.pki.ca import CA
from sidecar.tools.pki.cadir import load_ca_dir
from sidecar.tools.pki.crl import issue_crl
from sidecar.tools.pki.errors import PkiError
from sidecar.tools.pki.svid import DEFAULT_SVID_TTL, Svid, issue_svid

with warnings.catch_warnings():
    # Importing the stubs runs `spiffe/__init__`, whose JWT bundle module names DSA, which
    # cryptography >= 46 reports as deprecated on every start; it is not ours to act on.
    warnings.simplefilter("ignore")
    import grpc
    from spiffe._proto import workload_pb2, workload_pb2_grpc

# The spec's SSRF guard (SPIFFE Workload Endpoint, section 3): this key, exactly "true".
SECURITY_HEADER = ("workload.spiffe.io", "true")
HEADER_MISSING = "security header missing from request"  # SPIRE agent's message
NO_IDENTITY = "no identity issued"  # SPIRE agent's message while no entry matches
DROPPED = "the dev agent dropped the stream on command"

# Streams are long-lived and each holds a pool thread; tests open a handful at once.
_MAX_STREAMS = 32
# A stream re-checks whether its client is still there this often, in case the
# cancellation callback raced with its wait (it normally wakes on the notify).
_STREAM_POLL = 1.0
_DER = serialization.Encoding.DER
# sockaddr_un.sun_path on Linux holds 108 bytes with the terminating NUL (unix(7)).
_MAX_SOCKET_PATH = 107


class Answer(StrEnum):
    """How the agent answers a call: serve it, refuse it, or hold it open."""

    SERVE = "serve"
    REFUSE = "refuse"
    STALL = "stall"


class Drop(StrEnum):
    END = "end"  # the server ends the stream with OK: a clean end of stream
    UNAVAILABLE = "unavailable"  # aborted with Unavailable, as an agent shutting down


@dataclass(frozen=True, slots=True)
class Entry:
    """One identity the agent hands out: a SPIFFE ID and SPIRE's optional hint."""

    spiffe_id: str
    hint: str = ""


def trust_domain_id(trust_domain: str) -> str:
    """The key of a bundle map: the trust domain's SPIFFE ID, as SPIRE writes it."""
    return f"spiffe://{trust_domain}"


def has_security_header(metadata: Sequence[tuple[str, str | bytes]]) -> bool:
    """Exactly one `workload.spiffe.io` value, and it is "true" (case sensitive), as SPIRE."""
    key, value = SECURITY_HEADER
    values = [v for k, v in metadata if k == key]
    return values == [value]


def socket_problem(path: Path) -> str | None:
    """Why `path` cannot be the agent's socket, before gRPC says only "failed to bind"."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        return (
            f"{path} is {len(os.fsencode(path))} bytes long; a unix socket path holds at most "
            f"{_MAX_SOCKET_PATH}: use a shorter path (e.g. a relative one)"
        )
    if not path.parent.is_dir():
        return f"{path}: directory {path.parent} does not exist; create it first"
    if path.exists() and not path.is_socket():
        return f"{path} exists and is not a socket; refusing to replace it"
    return None


def foreign_bundle(trust_domain: str, directory: Path) -> tuple[x509.Certificate, ...]:
    """The bundle of another dev CA, for `--federate TD=DIR`: its root, checked to be TD's."""
    root, _ = load_ca_dir(directory)
    if root.trust_domain != trust_domain.lower():
        raise PkiError(
            f"{directory} is the CA of trust domain {root.trust_domain!r}, not "
            f"{trust_domain!r}; pass --federate {root.trust_domain}={directory}"
        )
    return (root.cert,)


def certs_der(certs: Sequence[x509.Certificate]) -> bytes:
    """Certificates as the Workload API carries them: DER, concatenated."""
    return b"".join(c.public_bytes(_DER) for c in certs)


def svid_message(svid: Svid, bundle: Sequence[x509.Certificate], hint: str) -> Any:
    key = svid.key.private_bytes(
        _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return workload_pb2.X509SVID(
        spiffe_id=svid.spiffe_id,
        x509_svid=certs_der((svid.cert, *svid.intermediates)),
        x509_svid_key=key,
        bundle=certs_der(bundle),
        hint=hint,
    )


@dataclass(slots=True)
class _State:
    """What the streams read, under `cond`, which every change notifies."""

    svids: tuple[tuple[Svid, str], ...] = ()
    generation: int = 0
    federated: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    crl: bytes = b""
    mode: Answer = Answer.SERVE
    drop_epoch: int = 0
    drop_kind: Drop = Drop.END
    revoked: frozenset[int] = frozenset()
    cond: threading.Condition = field(default_factory=threading.Condition)


class Agent:
    """The dev Workload API server and its controls (see the module docstring)."""

    def __init__(
        self,
        ca: CA,
        socket: Path,
        entries: Sequence[Entry],
        *,
        every: float | None = None,
        ttl: timedelta = DEFAULT_SVID_TTL,
        federated: Mapping[str, Sequence[x509.Certificate]] | None = None,
        on_rotate: Callable[[int, tuple[Svid, ...]], None] | None = None,
    ) -> None:
        if not entries:
            raise ValueError("the agent needs at least one SPIFFE ID to hand out")
        self.ca = ca
        self.socket = socket
        self.entries = tuple(entries)
        self.every = every
        self.ttl = ttl
        self._state = _State(federated={td: tuple(c) for td, c in (federated or {}).items()})
        self._server: grpc.Server | None = None
        self._rotator: threading.Thread | None = None
        self._closing = threading.Event()
        self._sent = 0
        self._on_rotate = on_rotate
        self.rotate()

    # --- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and serve (again, after `stop`); start rotating if not yet."""
        if self._server is None:
            self._server = self._bind()
        if self.every and self._rotator is None:
            self._rotator = threading.Thread(
                target=self._rotate_forever, name="pki-agent-rotate", daemon=True
            )
            self._rotator.start()

    def stop(self, grace: float | None = None) -> None:
        """Take the server down and remove its socket; the CA and the state stay."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        self.socket.unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self._closing.set()
        self.stop()
        if self._rotator is not None:
            self._rotator.join(timeout=5)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def _bind(self) -> grpc.Server:
        problem = socket_problem(self.socket)
        if problem:
            raise OSError(problem)
        self.socket.unlink(missing_ok=True)  # left by an agent that did not stop cleanly
        # Past the pool's size a call would wait unseen for a thread: refuse it instead
        # (ResourceExhausted), so a test that opens too many streams says so.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=_MAX_STREAMS),
            maximum_concurrent_rpcs=_MAX_STREAMS,
        )
        servicer = _Servicer(self)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        try:
            server.add_insecure_port(f"unix:{self.socket}")
        except RuntimeError as e:  # grpcio's "failed to bind", without the reason
            problem = f"cannot listen on {self.socket}: is its directory writable? ({e})"
            raise OSError(problem) from e
        server.start()
        return server

    def _rotate_forever(self) -> None:
        assert self.every
        while not self._closing.wait(self.every):
            self.rotate()

    # --- controls ------------------------------------------------------------------

    def rotate(self) -> int:
        """Issue every entry afresh (new keys) and push it to every open stream."""
        issued = tuple(
            (issue_svid(self.ca, e.spiffe_id, ttl=self.ttl), e.hint) for e in self.entries
        )
        with self._state.cond:
            self._state.svids = issued
            self._state.generation += 1
            generation = self._state.generation
            self._changed()
        if self._on_rotate is not None:
            self._on_rotate(generation, tuple(s for s, _ in issued))
        return generation

    def serve(self) -> None:
        self._set_mode(Answer.SERVE)

    def refuse(self) -> None:
        self._set_mode(Answer.REFUSE)

    def stall(self) -> None:
        self._set_mode(Answer.STALL)

    def drop(self, kind: Drop = Drop.END) -> None:
        with self._state.cond:
            self._state.drop_epoch += 1
            self._state.drop_kind = kind
            self._changed()

    def federate(self, trust_domain: str, certs: Sequence[x509.Certificate]) -> None:
        with self._state.cond:
            self._state.federated[trust_domain] = tuple(certs)
            self._changed()

    def unfederate(self, trust_domain: str) -> bool:
        with self._state.cond:
            found = self._state.federated.pop(trust_domain, None) is not None
            self._changed()
            return found

    def revoke(self, serial: int) -> None:
        """Revoke one certificate the intermediate issued: responses carry the CRL."""
        with self._state.cond:
            self._state.revoked |= {serial}
            self._state.crl = issue_crl(self.ca, sorted(self._state.revoked)).public_bytes(_DER)
            self._changed()

    @property
    def mode(self) -> Answer:
        return self._state.mode

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def current(self) -> tuple[Svid, ...]:
        return tuple(s for s, _ in self._state.svids)

    @property
    def federated(self) -> tuple[str, ...]:
        return tuple(sorted(self._state.federated))

    @property
    def sent(self) -> int:
        """Responses written to clients so far, over both methods."""
        return self._sent

    def _set_mode(self, mode: Answer) -> None:
        with self._state.cond:
            self._state.mode = mode
            self._changed()

    def _changed(self) -> None:
        self._state.cond.notify_all()

    # --- what the streams send -------------------------------------------------------

    def _bundle(self) -> tuple[x509.Certificate, ...]:
        return (self.ca.trust_anchor,)

    def svid_response(self) -> Any:
        """The `X509SVIDResponse` for the state now (call with the condition held)."""
        s = self._state
        bundle = self._bundle()
        return workload_pb2.X509SVIDResponse(
            svids=[svid_message(svid, bundle, hint) for svid, hint in s.svids],
            crl=[s.crl] if s.crl else [],
            federated_bundles={trust_domain_id(td): certs_der(c) for td, c in s.federated.items()},
        )

    def bundles_response(self) -> Any:
        s = self._state
        bundles = {trust_domain_id(self.ca.trust_domain): certs_der(self._bundle())}
        bundles |= {trust_domain_id(td): certs_der(c) for td, c in s.federated.items()}
        return workload_pb2.X509BundlesResponse(crl=[s.crl] if s.crl else [], bundles=bundles)

    def stream(self, context: grpc.ServicerContext, build: Callable[[], Any]) -> Iterator[Any]:
        """Send `build()` now and whenever it changes, honouring the mode and drops."""
        if not has_security_header(context.invocation_metadata()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
        s = self._state
        context.add_callback(lambda: self._wake())  # a client gone wakes its stream
        last: bytes | None = None
        with s.cond:
            drop_epoch = s.drop_epoch
        while True:
            with s.cond:
                if s.drop_epoch != drop_epoch:
                    kind = s.drop_kind
                    break
                if s.mode is Answer.REFUSE:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
                response = build() if s.mode is Answer.SERVE else None
                wire = response.SerializeToString(deterministic=True) if response else None
                if wire is None or wire == last:
                    # Any change since this check notifies: the lock is held until wait.
                    s.cond.wait(timeout=_STREAM_POLL)
                    if not context.is_active():
                        return
                    continue
                last = wire
                self._sent += 1
            yield response
        if kind is Drop.UNAVAILABLE:
            context.abort(grpc.StatusCode.UNAVAILABLE, DROPPED)

    def _wake(self) -> None:
        with self._state.cond:
            self._state.cond.notify_all()


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._agent.stream(context, self._agent.svid_response)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._agent.stream(context, self._agent.bundles_response)
