"""The SPIFFE Workload API as the identity source: one `FetchX509SVID` stream to the agent,
kept open, redialed with backoff and jitter whenever it fails.

Threads and the loop. grpcio's synchronous stream blocks, so it runs in one daemon thread
of ours, which also parses and checks each response (the X.509 work) into an `Identity`.
Everything else happens on the event loop, handed over by `call_soon_threadsafe`: the
swap into the runtime (the same validate-then-swap as a file reload: a connection keeps
the snapshot it started with, new ones get the new one), the metrics, the log and the
state /status and /readyz read. The loop never waits on gRPC.

Why not py-spiffe's `WorkloadApiClient`: it drops the response's CRLs and SVID hints,
retries on its own schedule without jitter and without telling us why, and raises at
construction when the socket is missing, which is an ordinary state of a pod whose agent
starts after it. Its generated stubs (`spiffe._proto`) are what we use.

Silence is also a failure: an agent that accepted the call but sends nothing within
`first_response_timeout`, or has not rotated our SVID by three quarters of the lifetime it
had left when it came (SPIRE rotates at half), gets the stream cancelled and redialed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

from sidecar.identity import Identity, identity_from_der
from sidecar.observe import logs, metrics
from sidecar.outcomes import StreamFailure, StreamState, UpdateResult
from sidecar.problems import Problem, ProblemsError
from sidecar.sources.workload_response import ADVICE, Backoff, classify, material_of
from sidecar.spiffe import SpiffeId
from sidecar.times import rfc3339
from sidecar.workload_endpoint import SECURITY_HEADER, WorkloadAddress

FIRST_RESPONSE_TIMEOUT = 30.0
# No new response by this fraction of the SVID's remaining lifetime means the agent is
# stuck (SPIRE rotates at half the lifetime); but never redial more often than this.
SILENT_PAST = 0.75
MIN_SILENCE = 5.0


class MissingExtra(RuntimeError):
    pass


def load_grpc() -> tuple[Any, Any, Any]:
    """(grpc, workload_pb2, workload_pb2_grpc), imported only when the Workload API is
    used: they add ~20 MB to a process that reads files."""
    try:
        with warnings.catch_warnings():
            # `spiffe/__init__` names DSA, which cryptography >= 46 reports as deprecated
            # on every import; not ours to act on.
            warnings.simplefilter("ignore")
            import grpc
            from spiffe._proto import workload_pb2, workload_pb2_grpc
    except ImportError as exc:
        raise MissingExtra(
            f"identity.workload_api needs the optional dependencies of the `spire` extra "
            f"(grpcio and py-spiffe's stubs): pip install 'sidecar[spire]' ({exc})") from exc
    return grpc, workload_pb2, workload_pb2_grpc


class WorkloadApiSource:
    """Our identity, streamed from the agent at `address`; `apply` swaps each new one in
    (on the loop). `first` is set once an identity has been applied."""

    def __init__(
        self,
        address: WorkloadAddress,
        wanted: SpiffeId | None,
        loop: asyncio.AbstractEventLoop,
        apply: Callable[[Identity], None],
        *,
        first_response_timeout: float = FIRST_RESPONSE_TIMEOUT,
        backoff: Backoff | None = None,
    ) -> None:
        self.address = address
        self.wanted = wanted
        self._loop = loop
        self._apply = apply
        self._first_timeout = first_response_timeout
        self._backoff = backoff or Backoff()
        self._grpc, self._pb2, self._pb2_grpc = load_grpc()
        self._stop = threading.Event()
        self._call: Any = None
        self._call_lock = threading.Lock()
        self._stalled = False  # set by the watchdog before it cancels the call
        self._watchdog: threading.Timer | None = None
        self._thread: threading.Thread | None = None
        # Owned by the loop:
        self.first = asyncio.Event()
        self.identity: Identity | None = None
        self.state = StreamState.CONNECTING
        self.last_update: dt.datetime | None = None
        self.last_failure: tuple[StreamFailure, str, dt.datetime] | None = None
        self.last_rejected: str | None = None
        self.attempts = 0
        self._update_age = metrics.workload_api_update_age.labels(str(address))
        self._update_age.set_function(self._age)
        for state in StreamState:
            metrics.workload_api_stream_state.labels(state)
        for result in UpdateResult:
            metrics.workload_api_updates.labels(result)
        for failure in StreamFailure:
            metrics.workload_api_stream_failures.labels(failure)
        self._set_state(StreamState.CONNECTING)

    # -- life cycle (loop) ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="workload-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the stream and the thread; the identity in force stays."""
        self._stop.set()
        self._cancel_call()
        self._disarm()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._set_state(StreamState.STOPPED)

    # -- what the admin endpoint reads (loop) ----------------------------------------------

    def not_ready(self) -> str | None:
        """Why there is no identity yet, or None once there is one."""
        if self.identity is not None:
            return None
        why = f"waiting for the first SVID from the Workload API at {self.address}"
        if self.last_rejected:
            return f"{why}; the last one was rejected: {self.last_rejected}"
        if self.last_failure is not None:
            failure, detail, _ = self.last_failure
            return f"{why}; {failure}: {detail} ({ADVICE[failure]})"
        return why

    def status(self) -> dict[str, Any]:
        failure = self.last_failure
        return {
            "kind": "workload_api",
            "address": str(self.address),
            "spiffe_id_wanted": str(self.wanted) if self.wanted else None,
            "state": str(self.state),
            "last_update": rfc3339(self.last_update) if self.last_update else None,
            "last_failure": None if failure is None else {
                "reason": str(failure[0]), "detail": failure[1], "at": rfc3339(failure[2])},
            "last_rejected": self.last_rejected,
            "attempts": self.attempts,
        }

    def _age(self) -> float:
        if self.last_update is None:
            return float("nan")
        return (dt.datetime.now(dt.UTC) - self.last_update).total_seconds()

    # -- the stream (thread) ----------------------------------------------------------------

    def _run(self) -> None:
        grpc = self._grpc
        request = self._pb2.X509SVIDRequest()
        while not self._stop.is_set():
            self._post(self._on_attempt)
            channel = grpc.insecure_channel(self.address.grpc_target)
            failure: tuple[StreamFailure, str] | None = None
            try:
                stub = self._pb2_grpc.SpiffeWorkloadAPIStub(channel)
                call = stub.FetchX509SVID(request, metadata=(SECURITY_HEADER,))
                with self._call_lock:
                    self._call, self._stalled = call, False
                if self._stop.is_set():
                    call.cancel()
                self._arm(self._first_timeout)
                for response in call:
                    self._disarm()
                    self._backoff.reset()
                    self._receive(response)
                failure = (StreamFailure.ENDED, "the agent closed the stream")
            except grpc.RpcError as exc:
                failure = self._failure_of(exc)
            except Exception as exc:  # a bug of ours must not end the source silently
                failure = (StreamFailure.OTHER, f"{type(exc).__name__}: {exc}")
            finally:
                self._disarm()
                with self._call_lock:
                    self._call = None
                channel.close()
            if self._stop.is_set():
                return
            delay = self._backoff.next()
            self._post(self._on_failure, failure[0], failure[1], delay)
            self._stop.wait(delay)

    def _failure_of(self, exc: Any) -> tuple[StreamFailure, str]:
        if exc.code() == self._grpc.StatusCode.CANCELLED and self._stalled:
            return StreamFailure.STALLED, "no response in time; redialing"
        return failure_of(self.address, exc)

    def _receive(self, response: Any) -> None:
        """Parse and check here, in the thread; the loop only swaps."""
        try:
            identity = identity_from_der(material_of(response, self.wanted))
        except ProblemsError as exc:
            self._post(self._on_rejected, exc)
            return
        self._post(self._on_identity, identity)
        # From what is left rather than from notBefore, which issuers backdate (SPIRE by
        # seconds, our dev CA by minutes) and which would make a short SVID look overdue.
        left = (identity.not_after - dt.datetime.now(dt.UTC)).total_seconds()
        self._arm(max(MIN_SILENCE, left * SILENT_PAST))

    def _arm(self, seconds: float) -> None:
        self._disarm()
        timer = threading.Timer(seconds, self._on_silence)
        timer.daemon = True
        self._watchdog = timer
        timer.start()

    def _disarm(self) -> None:
        timer, self._watchdog = self._watchdog, None
        if timer is not None:
            timer.cancel()

    def _on_silence(self) -> None:
        with self._call_lock:
            if self._call is not None:
                self._stalled = True
                self._call.cancel()

    def _cancel_call(self) -> None:
        with self._call_lock:
            if self._call is not None:
                self._call.cancel()

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._unless_stopped, fn, *args)
        except RuntimeError:  # the loop is closed: the process is ending
            self._stop.set()

    def _unless_stopped(self, fn: Callable[..., None], *args: object) -> None:
        """On the loop: what the thread saw before `stop` is not acted on after it (no
        identity applied, no state but STOPPED), whichever event it was."""
        if not self._stop.is_set():
            fn(*args)

    # -- on the loop -----------------------------------------------------------------------

    def _set_state(self, state: StreamState) -> None:
        self.state = state
        for s in StreamState:
            metrics.workload_api_stream_state.labels(s).set(1 if s is state else 0)

    def _on_attempt(self) -> None:
        self.attempts += 1
        self._set_state(StreamState.CONNECTING)

    def _on_identity(self, identity: Identity) -> None:
        self._set_state(StreamState.STREAMING)
        now = dt.datetime.now(dt.UTC)
        self.last_update, self.last_rejected = now, None
        metrics.workload_api_last_update.labels(str(self.address)).set(now.timestamp())
        if self.identity is not None and identity.version == self.identity.version:
            metrics.workload_api_updates.labels(UpdateResult.UNCHANGED).inc()
            return
        first = self.identity is None
        self._apply(identity)
        self.identity = identity
        metrics.workload_api_updates.labels(UpdateResult.APPLIED).inc()
        if first:
            logs.event(logging.INFO, "identity from the Workload API",
                       address=str(self.address), spiffe_id=str(identity.spiffe_id),
                       serial=f"{identity.serial:x}", not_after=rfc3339(identity.not_after),
                       trust_domains=sorted(identity.bundles))
            self.first.set()

    def _on_rejected(self, exc: ProblemsError) -> None:
        self._set_state(StreamState.STREAMING)
        self.last_rejected = "; ".join(str(p) for p in exc.problems[:3])
        metrics.workload_api_updates.labels(UpdateResult.REJECTED).inc()
        logs.event(logging.ERROR, "Workload API response rejected; the identity in force "
                   "stays" if self.identity else "Workload API response rejected",
                   address=str(self.address), problems=[str(p) for p in exc.problems])

    def _on_failure(self, failure: StreamFailure, detail: str, delay: float) -> None:
        self._set_state(StreamState.BACKOFF)
        self.last_failure = (failure, detail, dt.datetime.now(dt.UTC))
        metrics.workload_api_stream_failures.labels(failure).inc()
        level = logging.INFO if failure in (StreamFailure.ENDED, StreamFailure.STALLED) \
            and self.identity is not None else logging.WARNING
        logs.event(level, f"Workload API stream: {failure}; {ADVICE[failure]}",
                   address=str(self.address), reason=str(failure), detail=detail,
                   retry_in=round(delay, 2),
                   serving=str(self.identity.spiffe_id) if self.identity else None,
                   serving_until=rfc3339(self.identity.not_after) if self.identity else None)


def fetch_once(address: WorkloadAddress, wanted: SpiffeId | None,
               timeout: float = 10.0) -> Identity:
    """One identity from the agent, for `check`, `diagnose` and `inspect`: the first
    response of a stream, checked as `run` checks it. ProblemsError says why not."""
    return identity_from_der(material_of(fetch_response(address, timeout), wanted))


def fetch_response(address: WorkloadAddress, timeout: float = 10.0) -> Any:
    """The agent's first `X509SVIDResponse`, as it is (`sidecar inspect` shows all of it).
    ProblemsError says why there is none: the same words as the stream's failures."""
    grpc, pb2, pb2_grpc = load_grpc()
    where = f"workload API {address}"
    with grpc.insecure_channel(address.grpc_target) as channel:
        call = pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            pb2.X509SVIDRequest(), metadata=(SECURITY_HEADER,), timeout=timeout)
        try:
            return next(iter(call))
        except StopIteration:
            raise ProblemsError([Problem(where, "the agent ended the stream without an "
                                                "answer")]) from None
        except grpc.RpcError as exc:
            failure, detail = (StreamFailure.STALLED, f"no answer in {timeout:g} s") \
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else failure_of(address, exc)
            raise ProblemsError([Problem(where, f"{failure}: {detail} "
                                                f"({ADVICE[failure]})")]) from None
        finally:
            call.cancel()


def failure_of(address: WorkloadAddress, exc: Any) -> tuple[StreamFailure, str]:
    """Why a call to the agent at `address` failed (a `grpc.RpcError`), and the detail to
    say: one reading for the stream and for `fetch_response`. Only the socket file's
    absence is looked up here; the rest is the status's (workload_response.classify)."""
    details = exc.details() or ""
    missing = address.unix is not None and not address.unix.exists()
    failure = classify(exc.code().name, details, missing)
    if failure is StreamFailure.SOCKET_MISSING:
        details = f"{address.unix} does not exist"
    return failure, details
