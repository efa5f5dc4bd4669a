"""Hostile TLS peers against one inbound sidecar (issue 11, item 5).

Every input is its own test: random bytes, an HTTP request, a truncated ClientHello, an
oversized record header, an oversized ClientHello, a ClientHello with a 60 KiB extension,
an oversized record after a good handshake, chains of 50 certificates, a chain deeper
than OpenSSL's verify depth, client certificates with huge extensions, ClientHellos of
SSL 2.0, SSL 3.0, TLS 1.0, 1.1 and 1.2, and a TLS 1.2 renegotiation. Each checks that

- the connection is refused with the reason a user should read in the access log (and
  nothing reaches the app),
- it ends on its own at once, or at `handshake_timeout` for a peer that stalls, never later,
- a good client gets through right after,
- the event loop did not stall for more than 50 ms meanwhile (the 0.05 bucket of
  `sidecar_event_loop_lag_seconds`, read before and after; see LoopLedger for how a stall
  that was only the machine being busy is told apart).

Then all of them run at once while a good client loops, and the last test reads
`sidecar_event_loop_lag_max_seconds` over the whole run. The loop's pid comes from
/status; the loop thread's CPU and run-queue time from /proc/PID/schedstat (Linux).

The hostile bytes are built here by hand (struct), or taken from a real ClientHello of
the stdlib client (a memory-BIO SSLObject) and then damaged: this file is the attacker, not
product code. Inputs the product handles wrongly today carry `bug=`; their own test is a
strict xfail (it fails loudly once the product is fixed, so the mark gets removed), and
the concurrent test still sends them but does not check their reason.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client.parser import text_string_to_metric_families

from sidecar.tools import pki

from .conftest import (
    FRONTEND,
    LINE_TIMEOUT,
    PAYMENTS,
    EchoApp,
    Pki,
    Sidecar,
    SidecarFactory,
    TlsClient,
    addr,
    assert_good_client,
    wait_for,
)
from .test_live_changes import admin_get

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

HANDSHAKE_TIMEOUT = 2.0  # the sidecar's limits.handshake_timeout in this file
MARGIN = 1.0  # how late after handshake_timeout a stalled peer may still be closed
PROMPT = 1.0  # a refusal that needs no timeout must come before this (half the timeout)
STALL = 0.05  # the issue's bound on one event-loop stall, and a histogram bucket of it
LAG_BUCKET = "0.05"


# --- the sidecar under attack, its app, and the loop-stall meter --------------------------


@dataclass
class Target:
    sc: Sidecar
    app: EchoApp
    client: TlsClient

    @property
    def port(self) -> int:
        return self.sc.port("in")


@pytest.fixture(scope="module")
def target(ca: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    app = EchoApp().start()
    factory = SidecarFactory(tmp_path_factory.mktemp("hostile"), ca)
    try:
        sc = factory("b", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}],
                     limits={"handshake_timeout": f"{HANDSHAKE_TIMEOUT:g}s"})
        yield Target(sc, app, TlsClient(tmp_path_factory.mktemp("clients"), ca))
    finally:
        problems = factory.stop_all()
        app.close()
    assert not problems, "\n".join(problems)


def loop_pid(sc: Sidecar) -> int:
    """The pid of the sidecar's (single) process, from /status."""
    status = json.loads(admin_get(sc, "/status")[1])
    [worker] = status["workers"]
    return int(worker["pid"])


@dataclass(frozen=True)
class Reading:
    stalls: float  # lag probes later than 50 ms, since start
    probes: float  # lag probes run, since start
    longest: float  # sidecar_event_loop_lag_max_seconds
    cpu: float  # seconds the loop's thread ran on a CPU, since start
    waited: float  # seconds it was runnable but waited for a CPU, since start


def read_loop(sc: Sidecar, pid: int) -> Reading:
    stalls = probes = longest = 0.0
    for family in text_string_to_metric_families(admin_get(sc, "/metrics")[1]):
        for s in family.samples:
            if s.name == "sidecar_event_loop_lag_seconds_count":
                probes = s.value
                stalls += s.value
            elif s.name == "sidecar_event_loop_lag_seconds_bucket" and \
                    s.labels.get("le") == LAG_BUCKET:
                stalls -= s.value
            elif s.name == "sidecar_event_loop_lag_max_seconds":
                longest = s.value
    # /proc/PID/schedstat is the main thread's, the one running the loop: ns on a CPU,
    # ns runnable but waiting for one, timeslices.
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return Reading(stalls, probes, longest, int(on_cpu) / 1e9, int(waiting) / 1e9)


class LoopLedger:
    """Event-loop stalls over 50 ms, settled interval by interval (each test, and the gaps
    between tests), so a stall is blamed on the input that caused it, not on every later
    test.

    The lag probe measures wall-clock lateness, so on a busy machine (two cores, other
    jobs) it also counts time the loop was ready to run but had no CPU: 80-190 ms here
    while a VM and benchmarks ran. A stall is excused only when the loop's thread waited
    for a CPU for at least 50 ms in the interval *and* ran for less than 50 ms in all of
    it: then no callback of its own can have held the loop 50 ms. A stall from its own
    work, a blocking call or another thread holding the GIL is never excused.
    """

    def __init__(self, sc: Sidecar) -> None:
        self.sc = sc
        self.pid = loop_pid(sc)
        self.last = read_loop(sc, self.pid)
        self.unexcused: list[str] = []
        self.excused: list[str] = []

    def settle(self, what: str, *, storm: bool = False, check: bool = True) -> Reading:
        """Judge the stalls since the last settle; with `check`, fail on one not excused
        (without, it is only recorded for the last test of the file)."""
        # Two more probes first: a stall still under way is only seen once the probe's
        # timer finally runs.
        got: list[Reading] = []

        def ticked() -> bool:
            got[:] = [read_loop(self.sc, self.pid)]
            return got[0].probes >= self.last.probes + 2
        wait_for(ticked, LINE_TIMEOUT, "the loop-lag probe to tick")
        now, before = got[0], self.last
        self.last = now
        stalls = now.stalls - before.stalls
        if not stalls:
            return now
        cpu, waited = now.cpu - before.cpu, now.waited - before.waited
        note = (f"{what}: {stalls:.0f} event-loop stall(s) over {STALL * 1000:.0f} ms "
                f"(longest since start {now.longest * 1000:.0f} ms); meanwhile the loop's "
                f"thread ran {cpu * 1000:.0f} ms and waited {waited * 1000:.0f} ms for a CPU")
        # storm: see its test; only a stall longer than all the waiting counts there
        excused = waited >= now.longest if storm else waited >= STALL and cpu < STALL
        (self.excused if excused else self.unexcused).append(note)
        if excused:
            print(f"\n(excused: the machine was busy) {note}")
        assert excused or not check, note
        return now


# --- what a hostile peer saw --------------------------------------------------------------


@dataclass
class Seen:
    local: str  # the peer's address, as the sidecar logs it (peer_addr)
    elapsed: float  # from its last hostile byte to the end of the connection
    received: bytes = b""  # what came back (an alert, a ServerHello)
    error: BaseException | None = None  # how the connection ended, if not by a clean EOF


def read_to_end(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, BaseException | None]:
    """Read until EOF, a reset or an alert; the socket's timeout bounds each read."""
    chunks: list[bytes] = []
    while True:
        try:
            data = sock.recv(65536)
        except (OSError, ssl.SSLError) as exc:  # a timeout is an OSError too
            return b"".join(chunks), exc
        if not data:
            return b"".join(chunks), None
        chunks.append(data)


def raw_peer(port: int, data: bytes) -> Seen:
    """Send `data` on a plain TCP connection, then wait, never closing first."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT + MARGIN) as s:
        local = addr(s)
        try:
            s.sendall(data)
        except OSError:
            pass  # refused before it read everything: the end shows in read_to_end
        start = time.monotonic()
        received, error = read_to_end(s)
        return Seen(local, time.monotonic() - start, received, error)


def tls_peer(port: int, ctx: ssl.SSLContext) -> Seen:
    """A stdlib TLS client: handshake, send a line, read until the end. In TLS 1.3 the
    client's handshake completes before the server has judged its certificate, so a
    refusal shows as an alert (or EOF) on the first read."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT + MARGIN) as s:
        local = addr(s)
        start = time.monotonic()
        try:
            tls = ctx.wrap_socket(s, server_hostname=None)
        except (OSError, ssl.SSLError) as exc:
            return Seen(local, time.monotonic() - start, b"", exc)
        with tls:
            try:
                tls.sendall(b"must not reach the app\n")
            except (OSError, ssl.SSLError) as exc:
                return Seen(local, time.monotonic() - start, b"", exc)
            received, error = read_to_end(tls)
            return Seen(local, time.monotonic() - start, received, error)


# --- hostile bytes, by hand -------------------------------------------------------------

HANDSHAKE, APPLICATION_DATA = 22, 23  # TLS record content types
CLIENT_HELLO = 1
MAX_PLAINTEXT = 16384  # RFC 8446 5.1
MAX_CIPHERTEXT_TLS12 = MAX_PLAINTEXT + 2048  # RFC 5246 6.2.3: the largest record ever legal
MAX_CIPHERTEXT_TLS13 = MAX_PLAINTEXT + 256  # RFC 8446 5.2
OPENSSL_CLIENT_HELLO_MAX = 131396  # OpenSSL's CLIENT_HELLO_MAX_LENGTH (statem_srvr.c)


def record(content_type: int, body: bytes, version: int = 0x0301) -> bytes:
    return struct.pack("!BHH", content_type, version, len(body)) + body


def records(message: bytes, version: int = 0x0301) -> bytes:
    """A handshake message cut into records of at most 16 KiB, as a real peer sends it."""
    return b"".join(record(HANDSHAKE, message[i : i + MAX_PLAINTEXT], version)
                    for i in range(0, len(message), MAX_PLAINTEXT))


def legacy_client_hello(version: int, record_version: int = 0x0301) -> bytes:
    """A pre-TLS-1.3 ClientHello: `version` in client_version, no supported_versions
    extension, so the highest version it offers is `version`."""
    suites = (0xC02F, 0xC030, 0xC013, 0xC014, 0x002F, 0x0035, 0x000A, 0x00FF)
    body = (struct.pack("!H", version) + secrets.token_bytes(32) + b"\x00"
            + struct.pack(f"!H{len(suites)}H", 2 * len(suites), *suites) + b"\x01\x00")
    return record(HANDSHAKE, bytes([CLIENT_HELLO]) + len(body).to_bytes(3) + body,
                  record_version)


def sslv2_client_hello() -> bytes:
    """SSL 2.0's own record format (a 2-byte header with the top bit set)."""
    specs = bytes.fromhex("0700c0 050080 030080 010080 060040 040080 020080")
    challenge = secrets.token_bytes(16)
    body = (b"\x01\x00\x02" + struct.pack("!HHH", len(specs), 0, len(challenge))
            + specs + challenge)
    return struct.pack("!H", 0x8000 | len(body)) + body


def real_client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of the stdlib client: one record holding its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    flight = outgoing.read()
    assert flight[0] == HANDSHAKE and flight[5] == CLIENT_HELLO, flight[:6]
    assert len(flight) == 5 + int.from_bytes(flight[3:5]), "one record expected"
    return flight


def with_extension(flight: bytes, ext_type: int, size: int) -> bytes:
    """The ClientHello message of `flight` with an unknown extension of `size` bytes put
    first (pre_shared_key, if any, must stay last), every length fixed up."""
    hello = flight[5:]
    p = 4 + 2 + 32  # handshake header, legacy_version, random
    p += 1 + hello[p]  # session id
    p += 2 + int.from_bytes(hello[p : p + 2])  # cipher suites
    p += 1 + hello[p]  # compression methods
    extensions = hello[p + 2 : p + 2 + int.from_bytes(hello[p : p + 2])]
    extensions = struct.pack("!HH", ext_type, size) + bytes(size) + extensions
    body = hello[4:p] + struct.pack("!H", len(extensions)) + extensions
    return bytes([CLIENT_HELLO]) + len(body).to_bytes(3) + body


def non_tls_random_bytes() -> bytes:
    """4 KiB of random bytes, drawn again when they happen to look like a record header
    (second byte 3, one draw in 256: OpenSSL would wait for the rest of a random-length
    record, a handshake_timeout) or like an SSL 2.0 ClientHello (top bit, then type 1 in
    the third byte: one in 512), so that the answer is always OpenSSL's first check."""
    while True:
        data = secrets.token_bytes(4096)
        if data[1] != 3 and not (data[0] & 0x80 and data[2] == 1):
            return data


# --- certificates, by pki ----------------------------------------------------------------


def chain_in_a_line(top: pki.CA, n: int) -> pki.CA:
    """`n` intermediates one under the other below `top`, none with a path length limit."""
    ca = top
    for _ in range(n):
        ca = pki.new_intermediate(ca, path_length=None)
    return ca


def with_huge_extension(issuer: pki.CA, size: int) -> pki.Svid:
    """A valid SVID from `issuer` plus a non-critical extension of `size` random bytes
    under a private OID: nothing may reject it for being unknown."""
    base = pki.issue_svid(issuer, FRONTEND)
    builder = (x509.CertificateBuilder()
               .subject_name(base.cert.subject).issuer_name(base.cert.issuer)
               .public_key(base.key.public_key()).serial_number(pki.new_serial())
               .not_valid_before(base.cert.not_valid_before_utc)
               .not_valid_after(base.cert.not_valid_after_utc))
    for ext in base.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.11.5"), secrets.token_bytes(size)),
        critical=False)
    cert = builder.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]  # EC P-256
    return pki.Svid(cert, base.key, base.intermediates)


@dataclass
class Material:
    """Client contexts built once per module (a 101-deep chain takes a moment)."""

    contexts: dict[str, ssl.SSLContext]


@pytest.fixture(scope="module")
def ledger(target: Target) -> LoopLedger:
    return LoopLedger(target.sc)


@pytest.fixture(scope="module")
def material(ca: Pki, target: Target) -> Material:
    c = target.client
    ours49 = chain_in_a_line(ca.root, 49)
    foreign49 = chain_in_a_line(ca.foreign_root, 49)
    deep = chain_in_a_line(ca.root, 101)
    return Material({
        "good": c.context(ca.svid(FRONTEND)),
        "tls12": c.context(ca.svid(FRONTEND), max_version=ssl.TLSVersion.TLSv1_2),
        "50 in a line, our root": c.context(pki.issue_svid(ours49, FRONTEND)),
        "50 copies": c.context(ca.svid(FRONTEND), chain=[ca.intermediate.cert] * 49),
        "50 in a line, foreign root": c.context(pki.issue_svid(foreign49, FRONTEND)),
        # The sidecar bounds the chain (tls/contexts.py: depth and bytes); these are
        # far past both.
        "101 intermediates": c.context(pki.issue_svid(deep, FRONTEND)),
        "60 KiB extension, foreign CA": c.context(
            with_huge_extension(ca.foreign_intermediate, 60 * 1024)),
        "120 KiB extension, our CA": c.context(with_huge_extension(ca.intermediate, 120 * 1024)),
    })


# --- the hostile inputs --------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    run: Callable[[Target, Material], Seen]
    reason: str | None  # the access log's `reason`
    detail: str  # words the log's `detail` must contain (lowercase)
    stalls: bool = False  # the peer stalls: it must be cut at handshake_timeout, not before
    bug: str | None = None  # a product bug makes it fail today (strict xfail)
    after_handshake: bool = False  # refused by the pump, not the handshake

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError,
                                   reason=f"product bug: {self.bug}")] if self.bug else []
        return pytest.param(self, id=self.name.replace(" ", "-"), marks=marks)


def _tls(name: str) -> Callable[[Target, Material], Seen]:
    return lambda t, m: tls_peer(t.port, m.contexts[name])


def _raw(build: Callable[[Material], bytes]) -> Callable[[Target, Material], Seen]:
    return lambda t, m: raw_peer(t.port, build(m))


def _half_hello(m: Material) -> bytes:
    flight = real_client_hello(m.contexts["good"])
    return flight[: len(flight) // 2]


def _oversized_record_header(m: Material) -> bytes:
    size = MAX_CIPHERTEXT_TLS12 + 1
    return struct.pack("!BHH", HANDSHAKE, 0x0301, size) + bytes(size)


def _oversized_client_hello(m: Material) -> bytes:
    """A ClientHello whose handshake header claims 200 KiB, more than OpenSSL ever reads
    for one (the extensions block of a legal one cannot pass 64 KiB), and all those bytes
    following in 16 KiB records."""
    claimed = 200 * 1024
    assert claimed > OPENSSL_CLIENT_HELLO_MAX
    hello = real_client_hello(m.contexts["good"])[5:]
    body = hello[4:] + bytes(claimed - len(hello[4:]))
    return records(bytes([CLIENT_HELLO]) + claimed.to_bytes(3) + body)


def _huge_extension_hello(t: Target, m: Material) -> Seen:
    """A real ClientHello carrying a 60 KiB unknown extension (legal, ~4 records): the
    server must read it and answer at once; then this peer hangs up."""
    hello = with_extension(real_client_hello(m.contexts["good"]), 0xFE00, 60 * 1024)
    with socket.create_connection(("127.0.0.1", t.port), timeout=HANDSHAKE_TIMEOUT) as s:
        local = addr(s)
        s.sendall(records(hello))
        start = time.monotonic()
        header = b""
        while len(header) < 6:
            more = s.recv(6 - len(header))
            assert more, f"the server closed instead of answering: {header!r}"
            header += more
        elapsed = time.monotonic() - start
    assert header[0] == HANDSHAKE and header[5] == 2, f"no ServerHello: {header!r}"
    return Seen(local, elapsed, header)


def _oversized_record_after_handshake(t: Target, m: Material) -> Seen:
    """A good mTLS connection, an echoed "ping", then a record header claiming one byte
    more than TLS 1.3 allows (RFC 8446 5.2), spliced in on the raw socket under the
    stdlib's TLS: the sidecar must refuse it from the header, before reading the body."""
    with socket.create_connection(("127.0.0.1", t.port), timeout=HANDSHAKE_TIMEOUT) as s:
        local = addr(s)
        with m.contexts["good"].wrap_socket(s) as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"
            size = MAX_CIPHERTEXT_TLS13 + 1
            os.write(tls.fileno(), struct.pack("!BHH", APPLICATION_DATA, 0x0303, size)
                     + bytes(size))
            start = time.monotonic()
            received, error = read_to_end(tls)
            return Seen(local, time.monotonic() - start, received, error)



HOSTILE = [
    Hostile("random bytes", _raw(lambda m: non_tls_random_bytes()), "not_tls",
            "wrong version number"),
    Hostile("http request", _raw(lambda m: b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n"),
            "not_tls", "http request"),
    Hostile("truncated client hello", _raw(_half_hello), "handshake_timeout",
            "did not finish in time", stalls=True),
    Hostile("truncated record header", _raw(lambda m: bytes([HANDSHAKE, 3, 1])),
            "handshake_timeout", "did not finish in time", stalls=True),
    Hostile("oversized record header", _raw(_oversized_record_header), "not_tls",
            "packet length too long"),
    Hostile("oversized client hello", _raw(_oversized_client_hello), "message_too_large",
            "excessive message size"),
    Hostile("client hello with a 60 KiB extension", _huge_extension_hello, "peer_closed",
            "closed the connection"),
    Hostile("oversized record after the handshake", _oversized_record_after_handshake, None,
            "encrypted length too long", after_handshake=True),
    # Every chain below is past the 16 KiB bound on a peer's Certificate message
    # (contexts.py), refused before its CA is even looked at; a chain under that bound but
    # deeper than the verify depth is `chain_too_long` (test_failure_reasons.py).
    Hostile("50 in a line, our root", _tls("50 in a line, our root"), "message_too_large",
            "excessive message size"),
    Hostile("50 copies", _tls("50 copies"), "message_too_large", "excessive message size"),
    Hostile("50 in a line, foreign root", _tls("50 in a line, foreign root"),
            "message_too_large", "excessive message size"),
    Hostile("101 intermediates", _tls("101 intermediates"), "message_too_large",
            "excessive message size"),
    Hostile("60 KiB extension, foreign CA", _tls("60 KiB extension, foreign CA"),
            "message_too_large", "excessive message size"),
    Hostile("120 KiB extension, our CA", _tls("120 KiB extension, our CA"),
            "message_too_large", "excessive message size"),
    Hostile("sslv2 client hello", _raw(lambda m: sslv2_client_hello()), "not_tls",
            "unknown protocol"),
    Hostile("ssl3 client hello", _raw(lambda m: legacy_client_hello(0x0300, 0x0300)),
            "protocol_version", ""),
    Hostile("tls1.0 client hello", _raw(lambda m: legacy_client_hello(0x0301)),
            "protocol_version", "unsupported protocol"),
    Hostile("tls1.1 client hello", _raw(lambda m: legacy_client_hello(0x0302, 0x0302)),
            "protocol_version", "unsupported protocol"),
    Hostile("tls1.2 client hello", _tls("tls12"), "protocol_version", "unsupported protocol"),
]


def check_refused(t: Target, h: Hostile, seen: Seen, *, prompt: float = PROMPT) -> None:
    """The access-log line of `seen` tells the refusal `h` expects, in time."""
    line = t.sc.connection(peer_addr=seen.local)
    shown = f"{h.name}: " + ", ".join(f"{k}={line.get(k)!r}" for k in (
        "reason", "detail", "decision", "peer_id", "close", "bytes_to_app", "handshake_ms"))
    assert line["reason"] == h.reason, shown
    assert h.detail in (line["detail"] or "").lower(), shown
    if h.after_handshake:
        assert line["close"] == "error", shown
        assert line["bytes_to_app"] == len(b"ping"), shown
    else:
        assert line["decision"] is None, f"a refused handshake reached authorization: {shown}"
        assert line["bytes_to_app"] == 0, shown
    assert not isinstance(seen.error, TimeoutError), (
        f"still open {HANDSHAKE_TIMEOUT + MARGIN:g} s after the hostile bytes: {shown}")
    if h.stalls:
        assert HANDSHAKE_TIMEOUT - 0.1 <= seen.elapsed <= HANDSHAKE_TIMEOUT + MARGIN, \
            f"closed after {seen.elapsed:.2f} s: {shown}"
    else:
        assert seen.elapsed < prompt, f"refused only after {seen.elapsed:.2f} s: {shown}"


# --- one test per input --------------------------------------------------------------------


@pytest.mark.parametrize("hostile", [h.param() for h in HOSTILE])
def test_hostile_input_is_refused_with_its_reason_in_time(
    hostile: Hostile, target: Target, material: Material, ledger: LoopLedger,
) -> None:
    ledger.settle(f"before {hostile.name}")
    seen = hostile.run(target, material)
    check_refused(target, hostile, seen)
    assert_good_client(target.sc, target.client)
    ledger.settle(hostile.name)


def test_the_tls13_listener_cannot_be_renegotiated(
    target: Target, material: Material, ledger: LoopLedger,
) -> None:
    """Renegotiation exists only up to TLS 1.2, and the listener refuses TLS 1.2 (and
    below) in the ClientHello: there is nothing to renegotiate. The stdlib client cannot
    renegotiate at all; the TLS 1.2 listener's refusal is the next test (nassl)."""
    ledger.settle("before the TLS 1.2 ClientHello")
    seen = tls_peer(target.port, material.contexts["tls12"])
    assert isinstance(seen.error, ssl.SSLError), seen
    assert "PROTOCOL_VERSION" in str(seen.error).upper(), seen.error
    line = target.sc.connection(peer_addr=seen.local)
    assert line["reason"] == "protocol_version", line
    assert_good_client(target.sc, target.client)
    ledger.settle("TLS 1.2 ClientHello")


def test_a_tls12_listener_refuses_client_renegotiation(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp], ca: Pki, tls_client: TlsClient,
    tmp_path: Path,
) -> None:
    """With `tls.min_version: "1.2"`, a TLS 1.2 client that renegotiates after its first
    round trip gets the no_renegotiation alert at once; nothing more reaches the app."""
    legacy = pytest.importorskip(
        "nassl.legacy_ssl_client",
        reason="nassl (installed with sslyze) is the only client here that renegotiates")
    from nassl._nassl import OpenSSLError
    from nassl.ssl_client import OpenSslVerifyEnum, OpenSslVersionEnum

    app = echo_app()
    b = sidecar("b12", spiffe_id=PAYMENTS, inbound=[{"name": "in", "forward_to": app.address}],
                limits={"handshake_timeout": f"{HANDSHAKE_TIMEOUT:g}s"},
                tls={"min_version": "1.2"})
    ledger = LoopLedger(b)
    svid = ca.svid(FRONTEND)
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    with socket.create_connection(("127.0.0.1", b.port("in")), timeout=HANDSHAKE_TIMEOUT) as s:
        local = addr(s)
        client = legacy.LegacySslClient(
            underlying_socket=s, ssl_version=OpenSslVersionEnum.TLSV1_2,
            ssl_verify=OpenSslVerifyEnum.NONE, client_certificate_chain=cert, client_key=key)
        client.do_handshake()
        client.write(b"ping")
        assert client.read(4) == b"ping"
        start = time.monotonic()
        with pytest.raises(OpenSSLError, match="no renegotiation"):
            client.do_renegotiate()
        assert time.monotonic() - start < PROMPT
    line = b.connection(peer_addr=local)
    assert line["tls_version"] == "TLSv1.2", line
    assert line["decision"] == "allow", line
    assert line["bytes_to_app"] == len(b"ping"), line
    assert_good_client(b, tls_client)
    ledger.settle("TLS 1.2 renegotiation")


# --- all at once ---------------------------------------------------------------------------

GOOD_EVERY = 0.02  # the good client's pace during the storm: ~50 new connections a second


def test_all_hostile_inputs_at_once_while_a_good_client_loops(
    target: Target, material: Material, ledger: LoopLedger,
) -> None:
    """Every input above, twice, at the same moment, while a good client keeps opening
    connections: each hostile one still ends with its reason and in time, and every good
    connection works, none as slow as handshake_timeout.

    The stall check here is weaker than per input: the loop's own CPU is well over 50 ms
    in a storm, so the sound excuse of LoopLedger cannot apply, and a stall is excused
    when the loop's thread waited for a CPU at least as long as the longest stall. Whether
    one input can hold the loop is what the per-input tests decide; this one prints the
    storm's figures (the last test puts the run's longest stall in junit's properties).
    """
    ledger.settle("before the storm")
    before = ledger.last
    done = threading.Event()
    good: list[float] = []
    failures: list[str] = []

    def good_loop() -> None:
        payload = secrets.token_bytes(1024)
        while not done.is_set():
            start = time.monotonic()
            out = target.client.exchange(target.port, material.contexts["good"], payload,
                                         timeout=HANDSHAKE_TIMEOUT + MARGIN)
            good.append(time.monotonic() - start)
            if out.handshake_error or out.error or out.received != payload:
                failures.append(f"{out.local}: {out.handshake_error or out.error}")
            done.wait(GOOD_EVERY)  # pacing, not synchronisation: it ends when done is set

    runs = [h for h in HOSTILE for _ in range(2)]
    looper = threading.Thread(target=good_loop, name="good-client", daemon=True)
    looper.start()
    try:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            seen = list(pool.map(lambda h: (h, h.run(target, material)), runs))
    finally:
        done.set()
        looper.join(HANDSHAKE_TIMEOUT + MARGIN)
        # Settled here whatever happens, so that the last test judges the storm by the
        # storm's rule; checked at the end.
        after = ledger.settle("all hostile inputs at once", storm=True, check=False)
    print(f"\nstorm: {len(runs)} hostile and {len(good)} good connections, slowest good "
          f"{max(good, default=0) * 1000:.0f} ms; longest loop stall since start "
          f"{after.longest * 1000:.0f} ms; loop thread ran {(after.cpu - before.cpu) * 1000:.0f}"
          f" ms, waited {(after.waited - before.waited) * 1000:.0f} ms for a CPU")
    assert not looper.is_alive(), "the good client is stuck"
    for h, one in seen:
        if h.bug is None:  # the bugged ones were sent as load; their reason is wrong today
            # At once means before handshake_timeout here: 38 handshakes and a good
            # client share one loop, and this box's two cores with the test's threads.
            check_refused(target, h, one, prompt=HANDSHAKE_TIMEOUT)
    assert not failures, failures
    assert len(good) >= 20, f"only {len(good)} good connections during the storm"
    assert max(good) < HANDSHAKE_TIMEOUT, f"a good connection took {max(good):.2f} s"
    assert not any(n.startswith("all hostile inputs at once") for n in ledger.unexcused), \
        ledger.unexcused


def test_event_loop_never_stalled_over_the_whole_hostile_run(
    target: Target, ledger: LoopLedger, record_property: Callable[[str, object], None],
) -> None:
    """Last in this file: `sidecar_event_loop_lag_max_seconds` since the sidecar started,
    every input above included (the strict-xfail ones too). Under 50 ms, or every
    interval that saw a longer stall was excused by LoopLedger's rules (printed)."""
    now = ledger.settle("after the last test")
    record_property("event_loop_lag_max_seconds", now.longest)
    print(f"\nsidecar_event_loop_lag_max_seconds over the hostile run: {now.longest:.4f} "
          f"({now.probes:.0f} probes; loop thread ran {now.cpu:.2f} s, waited "
          f"{now.waited:.2f} s for a CPU)")
    assert now.probes > 0
    assert not ledger.unexcused, ledger.unexcused
    assert now.longest < STALL or ledger.excused, (
        f"the event loop stalled for {now.longest * 1000:.0f} ms outside any settled interval")
