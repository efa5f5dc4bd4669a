"""Rotation soak: does traffic through a sidecar pair survive every way identities change?

Run (from the repo root):

    PYTHONPATH=. python bench/soak_rotation.py                        # all, 60 s each
    PYTHONPATH=. python bench/soak_rotation.py --seconds 20 --scenarios helper,bundle
    PYTHONPATH=. python bench/soak_rotation.py --session-store tickets --json

The measurement behind issue 15's "How we will know". Each scenario starts its own
processes, all on 127.0.0.1 with port 0: an echo app (`memory_idle.py --worker echo`),
an inbound sidecar B (`python -m sidecar run`, SPIFFE ID payments, policy allowing
frontend) in front of it, and an outbound sidecar A (frontend, `expect_ids: [payments]`)
whose route leads to B. While identities change on disk, this process drives A's
plaintext listener with

- short connections (`--clients` threads, `--rate` connections a second in all): a random
  payload of 1 B..16 KiB, a half-close, the echo read until EOF and its sha256 checked;
- long streams (`--streams`, each `--stream-kib` KiB a second), open for the whole run:
  every chunk must come back byte for byte; a broken stream is counted and reopened.

Scenarios (`--scenarios`, all by default):

- `helper`, `csi`, `k8s`: both sidecars' SVIDs re-issued every second by `sidecar pki
  rotate --layout L` (one process per side, one dev CA), in the layout's own way:
  spiffe-helper rewrites svid.pem, svid_key.pem, bundle.pem in place; csi-driver-spiffe
  replaces tls.crt, tls.key, ca.crt by rename; a Kubernetes secret volume swaps the
  `..data` symlink the visible names point through (see sidecar/tools/pki/layouts.py);
- `bundle`: a trust-bundle rotation, the two sidecars always on DIFFERENT intermediates of
  the same root, SVIDs re-issued every second throughout, in five equal stages: R1 (A on
  I1a, B on I1b); new intermediates I2a, I2b of R1; both bundles R1+R2; SVIDs from R2's
  I3a, I3b; R1 dropped. A stage starts only once both sidecars serve the previous one
  (their /status shows its SVID serial and bundle), as an orderly CA rotation would;
- `short-ttl`: 15 s SVIDs re-issued every 4 s (spiffe-helper layout), so that a
  certificate a session remembers expires during the run.

Reported per scenario (a table, then one summary line per scenario): connections, the
client-visible failures by kind, `sidecar_handshake_errors_total` deltas by reason on
each side, access-log lines carrying a failure reason, broken long streams, corrupted
bytes, and the resumption ratio on each side (`sidecar_handshakes_total` with
`resumed="true"` over all, from both sidecars' /metrics). The exit status is 1 if any
scenario saw a failure of any kind, 0 otherwise.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import compare_haproxy as ch
import memory_idle as mi

from sidecar.tools import pki

TRUST_DOMAIN = ch.TRUST_DOMAIN
FRONTEND = ch.CLIENT_ID  # sidecar A, the caller
PAYMENTS = ch.SERVER_ID  # sidecar B, in front of the echo app
IO_TIMEOUT = 10.0  # one socket operation of a client; a handshake times out at 10 s too
SHORT_MAX = 16 * 1024  # short payloads fit the loopback buffers: send all, then read
STREAM_CHUNK = 16 * 1024
SYNC_TIMEOUT = 10.0  # a sidecar must load a stage's files in this time (it watches them)
STOP_TIMEOUT = 30.0  # traffic threads to finish their last exchange after the run
SCENARIOS = ("helper", "csi", "k8s", "bundle", "short-ttl")
LAYOUT_OF = {"helper": pki.Layout.SPIFFE_HELPER, "csi": pki.Layout.CSI,
             "k8s": pki.Layout.K8S}
SHORT_TTL = 15.0  # seconds: issue 15 item 2 saw failures from 15 s SVIDs ...
SHORT_TTL_EVERY = 4.0  # ... re-issued every 4 s
log = ch.log


# --- what the clients saw ------------------------------------------------------------------


@dataclass
class Tally:
    """Everything the clients saw, shared by the traffic threads (under `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    connections: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_times: list[float] = field(default_factory=list)  # seconds since `t0`
    t0: float = field(default_factory=time.monotonic)
    examples: list[str] = field(default_factory=list)
    corrupted_bytes: int = 0
    bytes_verified: int = 0
    streams_opened: int = 0
    streams_broken: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        with self.lock:
            self.failures[kind] += 1
            self.failure_times.append(round(time.monotonic() - self.t0, 2))
            if len(self.examples) < 5:
                self.examples.append(f"{kind}: {detail}"[:200])


def differing(sent: bytes, got: bytes) -> int:
    """Bytes of `got` that are not what was sent at that offset (extra bytes included)."""
    common = min(len(sent), len(got))
    wrong = sum(a != b for a, b in zip(sent[:common], got[:common], strict=True))
    return wrong + max(0, len(got) - len(sent))


def short_connection(port: int, rng: random.Random, tally: Tally) -> None:
    payload = rng.randbytes(rng.randint(1, SHORT_MAX))
    chunks: list[bytes] = []
    error: str | None = None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while data := s.recv(65536):
                chunks.append(data)
    except OSError as exc:
        error = type(exc).__name__ + (f" {errno.errorcode.get(exc.errno, exc.errno)}"
                                      if type(exc) is OSError and exc.errno else "")
    got = b"".join(chunks)
    ok = error is None and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    with tally.lock:
        tally.connections += 1
        tally.ok += ok
        tally.corrupted_bytes += differing(payload, got)
        tally.bytes_verified += min(len(got), len(payload))
    if not ok:
        where = "before any byte" if not got else "after some bytes"
        kind = f"{error or 'EOF'} {where}" if len(got) < len(payload) else "wrong bytes"
        tally.fail(kind, f"got {len(got)} of {len(payload)} bytes")


def short_clients(port: int, rate: float, seed: int, stop: threading.Event,
                  tally: Tally) -> None:
    """Connections at `rate` a second; when behind, no burst to catch up."""
    rng = random.Random(seed)
    due = time.monotonic()
    while not stop.is_set():
        short_connection(port, rng, tally)
        due += 1.0 / rate
        delay = due - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            due = time.monotonic()


def recv_exactly(s: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = s.recv(size - len(got))
        if not data:
            raise ConnectionError(f"EOF after {len(got)} of {size} echoed bytes")
        got += data
    return bytes(got)


def one_stream(port: int, rate: float, rng: random.Random, stop: threading.Event,
               tally: Tally, moved: list[int]) -> None:
    """One long stream until `stop`: each chunk must come back byte for byte. `moved[0]`
    counts the bytes echoed so far (0: the stream never opened)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        due = time.monotonic()
        while not stop.is_set():
            chunk = rng.randbytes(STREAM_CHUNK)
            s.sendall(chunk)
            back = recv_exactly(s, len(chunk))
            with tally.lock:
                tally.corrupted_bytes += differing(chunk, back)
                tally.bytes_verified += len(chunk)
                tally.streams_opened += moved[0] == 0
            moved[0] += len(chunk)
            due += len(chunk) / rate
            stop.wait(max(0.0, due - time.monotonic()))
        s.shutdown(socket.SHUT_WR)
        if (extra := s.recv(1)) != b"":
            raise ConnectionError(f"bytes after the last echo: {extra!r}")


def long_stream(port: int, rate: float, seed: int, stop: threading.Event,
                tally: Tally) -> None:
    """A stream through the whole run; a broken one is counted and reopened. One that
    breaks before its first echo failed to open (its handshake, most likely): that is a
    failed connection, not a broken stream."""
    rng = random.Random(seed)
    while not stop.is_set():
        moved = [0]
        try:
            one_stream(port, rate, rng, stop, tally, moved)
        except OSError as exc:
            if moved[0] == 0:
                tally.fail(f"stream open: {type(exc).__name__}", str(exc))
            else:
                with tally.lock:
                    tally.streams_broken.append(
                        f"{type(exc).__name__} after {moved[0] / 2**20:.1f} MiB: {exc}"[:200])
            stop.wait(0.5)  # a route that is down is not hammered


# --- the processes -------------------------------------------------------------------------


@dataclass
class Sidecar:
    """One `sidecar run` process and the ports it logged (port 0 everywhere)."""

    proc: ch.Proc
    ports: dict[str, int]

    def get(self, path: str) -> str:
        return mi.http_get(self.ports["admin"], path)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.get("/status"))
        return body

    def log_records(self) -> list[dict[str, Any]]:
        return log_records(self.proc)


def log_records(proc: ch.Proc) -> list[dict[str, Any]]:
    """The JSON lines of a sidecar's log so far."""
    out = []
    for line in proc.log_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def start_sidecar(name: str, work: Path, body: dict[str, Any], session_store: str) -> Sidecar:
    config: dict[str, Any] = {
        **body, "admin": {"listen": "127.0.0.1:0"}, "drain_timeout": "5s", "workers": 1,
        "tls": {"session_store": session_store},
        "log": {"level": "info", "format": "json"}}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ch.ROOT) + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
    proc = ch.Proc(name, [sys.executable, "-m", "sidecar", "run", "-c", str(path),
                          "--loop", "uvloop"], work, callgrind=False, env=env)
    try:
        ch.wait_until(f"{name} ready", lambda: ch._says_ready(proc), [proc])
    except BaseException:
        proc.stop()
        raise
    ports = {rec["listener"]: int(rec["address"].rpartition(":")[2])
             for rec in log_records(proc) if rec.get("msg") == "listening"}
    return Sidecar(proc, ports)


def identity_paths(directory: Path, layout: pki.Layout) -> dict[str, str]:
    f = layout.files
    return {"cert": str(directory / f.cert), "key": str(directory / f.key),
            "bundle": str(directory / f.bundle)}


@dataclass
class Pair:
    echo: mi.Worker
    a: Sidecar  # outbound: plaintext "out" -> mTLS to B
    b: Sidecar  # inbound: mTLS "in" -> the echo app

    def stop(self) -> None:
        self.a.proc.stop()
        self.b.proc.stop()
        self.echo.stop()


def start_pair(work: Path, a_dir: Path, b_dir: Path, layout: pki.Layout,
               session_store: str) -> Pair:
    echo, echo_port = mi.start_echo(mi.__file__, work)
    started: list[Sidecar] = []
    try:
        policy = work / "policy.yaml"
        policy.write_text(json.dumps({"mode": "enforce", "default": "deny", "rules": [
            {"name": "frontend", "action": "allow", "from": [FRONTEND]}]}))
        b = start_sidecar("sidecar-b", work, {
            "identity": identity_paths(b_dir, layout), "policy": str(policy),
            "inbound": [{"name": "in", "listen": "127.0.0.1:0",
                         "forward_to": f"127.0.0.1:{echo_port}"}]}, session_store)
        started.append(b)
        a = start_sidecar("sidecar-a", work, {
            "identity": identity_paths(a_dir, layout),
            "outbound": [{"name": "out", "listen": "127.0.0.1:0",
                          "connect_to": f"127.0.0.1:{b.ports['in']}",
                          "expect_ids": [PAYMENTS]}]}, session_store)
    except BaseException:
        for sc in started:
            sc.proc.stop()
        echo.stop()
        raise
    return Pair(echo, a, b)


# --- what the sidecars counted -------------------------------------------------------------

_LABEL = re.compile(r'(\w+)="([^"]*)"')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(_LABEL.findall(key)), value)
            for key, value in mi.metric_values(text, name).items()]


@dataclass(frozen=True)
class Counted:
    """One sidecar's counters that the soak reads, at one moment."""

    handshakes: int
    resumed: int
    resumed_failed: int  # resumed="true", result="error": a resumption offered and lost
    errors: Counter[str]  # sidecar_handshake_errors_total by reason
    reloads: Counter[str]  # sidecar_reloads_total by "kind/result"

    @staticmethod
    def read(sc: Sidecar) -> Counted:
        text = sc.get("/metrics")
        hs = samples(text, "sidecar_handshakes_total")
        errors: Counter[str] = Counter()
        for labels, v in samples(text, "sidecar_handshake_errors_total"):
            errors[labels["reason"]] += int(v)
        reloads: Counter[str] = Counter()
        for labels, v in samples(text, "sidecar_reloads_total"):
            reloads[f"{labels['kind']}/{labels['result']}"] += int(v)
        return Counted(handshakes=int(sum(v for _, v in hs)),
                       resumed=int(sum(v for lb, v in hs if lb.get("resumed") == "true")),
                       resumed_failed=int(sum(v for lb, v in hs if lb.get("resumed") == "true"
                                              and lb.get("result") == "error")),
                       errors=errors, reloads=reloads)

    def since(self, before: Counted) -> Counted:
        return Counted(self.handshakes - before.handshakes, self.resumed - before.resumed,
                       self.resumed_failed - before.resumed_failed,
                       self.errors - before.errors, self.reloads - before.reloads)


def logged_reasons(sc: Sidecar) -> Counter[str]:
    """Access-log lines with a failure reason (what the metrics may not show, e.g. a
    peer refused after its handshake)."""
    return Counter(str(rec["reason"]) for rec in sc.log_records()
                   if rec.get("msg") == "connection" and rec.get("reason"))


# --- how identities change -----------------------------------------------------------------


class Rotation:
    """Changes the sidecars' files while traffic runs; `start` returns at once."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        """Stop changing files; what was done (rotations written, stage problems)."""
        raise NotImplementedError


class RotateCommand(Rotation):
    """`sidecar pki rotate`, one process per sidecar, from one dev CA directory."""

    def __init__(self, ca_dir: Path, outs: dict[str, Path], layout: pki.Layout,
                 every: float, ttl: float, work: Path) -> None:
        self.argv = {
            spiffe_id: [sys.executable, "-m", "sidecar", "pki", "rotate", "--dir",
                        str(ca_dir), "--spiffe-id", spiffe_id, "--out", str(out),
                        "--every", f"{every}s", "--ttl", f"{ttl}s", "--layout", str(layout)]
            for spiffe_id, out in outs.items()}
        self.work = work
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.output: dict[str, list[str]] = {}
        self.readers: list[threading.Thread] = []

    def _read(self, spiffe_id: str, first: threading.Event) -> None:
        stdout = self.procs[spiffe_id].stdout
        assert stdout is not None
        for line in stdout:
            self.output[spiffe_id].append(line.rstrip("\n"))
            first.set()
        first.set()  # the process ended: do not wait for a line that cannot come

    def start(self) -> None:
        """Start both rotators; return once each has written its first SVID, so that a
        loaded machine's slow start does not eat into the measured seconds."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ch.ROOT)
        firsts = []
        for spiffe_id, argv in self.argv.items():
            self.procs[spiffe_id] = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                cwd=self.work)
            self.output[spiffe_id] = []
            first = threading.Event()
            firsts.append(first)
            self.readers.append(threading.Thread(target=self._read, args=(spiffe_id, first),
                                                 daemon=True))
            self.readers[-1].start()
        for first in firsts:
            if not first.wait(ch.START_TIMEOUT):
                raise RuntimeError(f"sidecar pki rotate wrote nothing in {ch.START_TIMEOUT} s")

    def stop(self) -> dict[str, Any]:
        for proc in self.procs.values():
            proc.terminate()  # SIGTERM: the loop stops; a half-written file is the point
        for proc in self.procs.values():
            proc.wait(STOP_TIMEOUT)
        for reader in self.readers:
            reader.join(STOP_TIMEOUT)
        written = {spiffe_id: sum(line.startswith("rotation ") for line in lines)
                   for spiffe_id, lines in self.output.items()}
        problems = [f"pki rotate {spiffe_id}: {' | '.join(lines)[-300:]}"
                    for spiffe_id, lines in self.output.items()
                    if any("error" in line for line in lines)]
        return {"rotations": written, "problems": problems}


@dataclass(frozen=True)
class Stage:
    about: str
    a_ca: pki.CA  # issues A's SVIDs in this stage
    b_ca: pki.CA  # issues B's SVIDs: always another intermediate than A's
    bundle: tuple[pki.CA, ...]  # the roots both sidecars trust in this stage


def bundle_stages() -> list[Stage]:
    def inter(root: pki.CA, name: str) -> pki.CA:
        return pki.new_intermediate(root, name=name)

    r1 = pki.new_root(TRUST_DOMAIN, name="R1")
    r2 = pki.new_root(TRUST_DOMAIN, name="R2")
    i2a, i2b = inter(r1, "I2a"), inter(r1, "I2b")
    i3a, i3b = inter(r2, "I3a"), inter(r2, "I3b")
    return [
        Stage("R1; A on I1a, B on I1b", inter(r1, "I1a"), inter(r1, "I1b"), (r1,)),
        Stage("new intermediates: A on I2a, B on I2b", i2a, i2b, (r1,)),
        Stage("both bundles R1+R2", i2a, i2b, (r1, r2)),
        Stage("SVIDs from R2: A on I3a, B on I3b", i3a, i3b, (r1, r2)),
        Stage("R1 dropped", i3a, i3b, (r2,)),
    ]


class BundleRotation(Rotation):
    """Five stages over `seconds`, SVIDs re-issued every `every` s (spiffe-helper files).

    Before a stage starts, both sidecars must serve the previous stage's last SVID and
    bundle, as a CA rotation waits for every workload to have the new bundle before any
    peer presents a chain only it verifies."""

    def __init__(self, stages: list[Stage], a_dir: Path, b_dir: Path, seconds: float,
                 every: float) -> None:
        self.stages = stages
        self.dirs = {"a": a_dir, "b": b_dir}
        self.seconds = seconds
        self.every = every
        self.sidecars: dict[str, Sidecar] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bundle-rotation", daemon=True)
        self.rotations = 0
        self.problems: list[str] = []
        self.begun: list[tuple[float, str]] = []  # (seconds since start, stage)

    def write(self, stage: Stage) -> dict[str, str]:
        """One re-issue on both sides; the serials written, as /status spells them."""
        serials = {}
        roots = [ca.cert for ca in stage.bundle]
        for side, (ca, spiffe_id) in {"a": (stage.a_ca, FRONTEND),
                                      "b": (stage.b_ca, PAYMENTS)}.items():
            svid = pki.issue_svid(ca, spiffe_id)
            pki.write_svid(self.dirs[side], svid, roots, pki.Layout.SPIFFE_HELPER)
            serials[side] = f"{svid.serial:x}"
        self.rotations += 1
        return serials

    def serves(self, side: str, serial: str, stage: Stage) -> bool:
        st = self.sidecars[side].status()
        subjects = {c["subject"] for cas in st["bundles"].values() for c in cas}
        return st["svid"]["serial"] == serial and subjects == {
            ca.cert.subject.rfc4514_string() for ca in stage.bundle}

    def settle(self, stage: Stage) -> None:
        serials = self.write(stage)
        deadline = time.monotonic() + SYNC_TIMEOUT
        waiting = set(serials)
        while waiting and not self.stop_event.is_set():
            waiting = {s for s in waiting if not self.serves(s, serials[s], stage)}
            if waiting and time.monotonic() > deadline:
                self.problems.append(f"stage '{stage.about}': sidecar(s) {sorted(waiting)} "
                                     f"did not load it within {SYNC_TIMEOUT:.0f} s")
                return
            self.stop_event.wait(0.05)

    def _run(self) -> None:
        try:
            self._stages()
        except Exception as exc:  # reported with the results, not lost with the thread
            self.problems.append(f"the bundle rotation stopped: {type(exc).__name__}: {exc}")

    def _stages(self) -> None:
        span = self.seconds / len(self.stages)
        t0 = time.monotonic()
        for i, stage in enumerate(self.stages):
            if i:
                self.settle(self.stages[i - 1])
                if self.stop_event.is_set():
                    return  # the run ended while the previous stage was loading
            self.begun.append((round(time.monotonic() - t0, 2), stage.about))
            end = t0 + span * (i + 1)
            while not self.stop_event.is_set() and time.monotonic() < end:
                self.write(stage)
                self.stop_event.wait(min(self.every, max(0.0, end - time.monotonic())))
            if self.stop_event.is_set():
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        self.thread.join(STOP_TIMEOUT)
        return {"rotations": {"both": self.rotations}, "problems": self.problems,
                "stages": self.begun}


# --- one scenario --------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    about: str
    seconds: float
    connections: int
    ok: int
    client_failures: dict[str, int]
    failure_times: list[float]  # seconds into the run
    examples: list[str]
    streams_opened: int
    streams_broken: list[str]
    mib_verified: float
    corrupted_bytes: int
    handshakes: dict[str, int]  # side -> handshakes counted by that sidecar
    resumed: dict[str, int]
    resumed_failed: dict[str, int]
    handshake_errors: dict[str, dict[str, int]]  # side -> reason -> count
    logged_reasons: dict[str, dict[str, int]]
    reloads: dict[str, dict[str, int]]
    rotation: dict[str, Any]

    @property
    def failed(self) -> bool:
        return bool(self.client_failures or self.streams_broken or self.corrupted_bytes
                    or any(self.handshake_errors.values())
                    or any(self.logged_reasons.values()) or self.rotation["problems"])

    def ratio(self, side: str) -> str:
        n = self.handshakes[side]
        if not n:
            return "-"
        return (f"{self.resumed[side] / n:.3f} ({self.resumed[side]}/{n}; "
                f"{self.resumed_failed[side]} of the resumed failed)")


def drive(pair: Pair, rotation: Rotation, args: argparse.Namespace,
          ) -> tuple[Tally, dict[str, Any], dict[str, Counted]]:
    """Traffic for `args.seconds` while `rotation` runs; what the clients saw, what the
    rotation did, and each side's counters over the run."""
    before = {"outbound": Counted.read(pair.a), "inbound": Counted.read(pair.b)}
    port = pair.a.ports["out"]
    tally = Tally()
    stop = threading.Event()
    threads = [threading.Thread(target=short_clients, name=f"short-{i}", daemon=True,
                                args=(port, args.rate / args.clients, i, stop, tally))
               for i in range(args.clients)]
    threads += [threading.Thread(target=long_stream, name=f"stream-{i}", daemon=True,
                                 args=(port, args.stream_kib * 1024, 1000 + i, stop, tally))
                for i in range(args.streams)]
    tally.t0 = time.monotonic()
    rotation.start()
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + args.seconds
        while (left := deadline - time.monotonic()) > 0:
            pair.a.proc.check_alive()
            pair.b.proc.check_alive()
            stop.wait(min(1.0, left))
    finally:
        try:
            done = rotation.stop()
        finally:
            stop.set()
            for t in threads:
                t.join(STOP_TIMEOUT)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        done["problems"].append(f"traffic threads still running {STOP_TIMEOUT:.0f} s after "
                                f"the end: {stuck}")
    after = {"outbound": Counted.read(pair.a), "inbound": Counted.read(pair.b)}
    return tally, done, {side: after[side].since(before[side]) for side in after}


def run_scenario(name: str, args: argparse.Namespace, work: Path) -> Result:
    a_dir, b_dir = work / "a-svid", work / "b-svid"
    layout = LAYOUT_OF.get(name, pki.Layout.SPIFFE_HELPER)
    rotation: Rotation
    if name == "bundle":
        stages = bundle_stages()
        about = (f"trust-bundle rotation in {len(stages)} stages, A and B on different "
                 "intermediates, SVIDs re-issued every 1 s (spiffe-helper layout)")
        bundle_rotation = BundleRotation(stages, a_dir, b_dir, args.seconds, 1.0)
        bundle_rotation.write(stages[0])
        rotation = bundle_rotation
    else:
        every, ttl = (SHORT_TTL_EVERY, SHORT_TTL) if name == "short-ttl" else (1.0, 3600.0)
        about = (f"{layout} layout, {ttl:g} s SVIDs re-issued every {every:g} s by "
                 "`sidecar pki rotate`, both sides, one intermediate")
        _, intermediate = pki.init_ca_dir(work / "ca", TRUST_DOMAIN)
        for d, spiffe_id in ((a_dir, FRONTEND), (b_dir, PAYMENTS)):
            pki.write_svid(d, pki.issue_svid(intermediate, spiffe_id, ttl=timedelta(seconds=ttl)),
                           [intermediate.trust_anchor], layout)
        rotation = RotateCommand(work / "ca", {FRONTEND: a_dir, PAYMENTS: b_dir}, layout,
                                 every, ttl, work)
    log(f"{name}: {about}; {args.seconds:g} s")
    pair = start_pair(work, a_dir, b_dir, layout, args.session_store)
    try:
        if isinstance(rotation, BundleRotation):
            rotation.sidecars = {"a": pair.a, "b": pair.b}
        tally, done, counted = drive(pair, rotation, args)
        reasons = {"outbound": logged_reasons(pair.a), "inbound": logged_reasons(pair.b)}
    finally:
        pair.stop()
    return Result(
        scenario=name, about=about, seconds=args.seconds, connections=tally.connections,
        ok=tally.ok, client_failures=dict(tally.failures),
        failure_times=tally.failure_times, examples=tally.examples,
        streams_opened=tally.streams_opened, streams_broken=tally.streams_broken,
        mib_verified=tally.bytes_verified / 2**20, corrupted_bytes=tally.corrupted_bytes,
        handshakes={s: c.handshakes for s, c in counted.items()},
        resumed={s: c.resumed for s, c in counted.items()},
        resumed_failed={s: c.resumed_failed for s, c in counted.items()},
        handshake_errors={s: dict(c.errors) for s, c in counted.items()},
        logged_reasons={s: dict(r) for s, r in reasons.items()},
        reloads={s: dict(c.reloads) for s, c in counted.items()}, rotation=done)


# --- the report ----------------------------------------------------------------------------


def _by_kind(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")"


def table(r: Result) -> str:
    rows = [
        ("connections (short)", f"{r.connections}, {r.ok} echoed intact"),
        ("client-visible failures", _by_kind(r.client_failures)),
        ("  at (s into the run)", ", ".join(f"{t:.1f}" for t in r.failure_times[:10])
         + (" ..." if len(r.failure_times) > 10 else "")),
        *((f"handshake errors, {side}", _by_kind(r.handshake_errors[side]))
          for side in ("outbound", "inbound")),
        *((f"access-log failures, {side}", _by_kind(r.logged_reasons[side]))
          for side in ("outbound", "inbound")),
        ("long streams broken", f"{len(r.streams_broken)} (of {r.streams_opened} opened)"),
        ("bytes verified", f"{r.mib_verified:.1f} MiB"),
        ("corrupted bytes", str(r.corrupted_bytes)),
        *((f"resumption ratio, {side}", r.ratio(side)) for side in ("outbound", "inbound")),
        *((f"reloads, {side}", _by_kind(r.reloads[side])) for side in ("outbound", "inbound")),
        ("rotations written", ", ".join(f"{k}: {v}" for k, v in r.rotation["rotations"].items())),
    ]
    lines = [f"== {r.scenario}: {r.about}; {r.seconds:g} s"]
    lines += [f"  {k:<30} {v}" for k, v in rows]
    stages = r.rotation.get("stages", [])
    for i, (begun, about) in enumerate(stages):
        until = stages[i + 1][0] if i + 1 < len(stages) else float("inf")
        failed = sum(begun <= t < until for t in r.failure_times)
        lines.append(f"  from {begun:5.1f} s: {about:<40} client failures {failed}")
    lines += [f"  problem: {p}" for p in r.rotation["problems"]]
    lines += [f"  e.g. {e}" for e in r.examples[:3]]
    lines += [f"  broken stream: {b}" for b in r.streams_broken[:3]]
    lines.append(f"  verdict: {'FAIL' if r.failed else 'ok'}")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    head = (f"{'scenario':<10} {'conns':>6} {'failed':>6} {'hs-err out':>10} "
            f"{'hs-err in':>9} {'streams broken':>14} {'corrupted':>9} "
            f"{'resumed out':>11} {'resumed in':>10}  verdict")
    lines = [head]
    for r in results:
        def ratio(side: str, r: Result = r) -> str:
            n = r.handshakes[side]
            return f"{r.resumed[side] / n:.2f}" if n else "-"
        lines.append(
            f"{r.scenario:<10} {r.connections:>6} {sum(r.client_failures.values()):>6} "
            f"{sum(r.handshake_errors['outbound'].values()):>10} "
            f"{sum(r.handshake_errors['inbound'].values()):>9} "
            f"{len(r.streams_broken):>14} {r.corrupted_bytes:>9} "
            f"{ratio('outbound'):>11} {ratio('inbound'):>10}  "
            f"{'FAIL' if r.failed else 'ok'}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--seconds", type=float, default=60.0, help="per scenario (60)")
    ap.add_argument("--rate", type=float, default=40.0,
                    help="short connections a second, all clients together (40)")
    ap.add_argument("--clients", type=int, default=4, help="short-connection threads (4)")
    ap.add_argument("--streams", type=int, default=3, help="long streams (3)")
    ap.add_argument("--stream-kib", type=float, default=256.0,
                    help="KiB a second each long stream sends (256)")
    ap.add_argument("--session-store", choices=["auto", "memory", "tickets"], default="auto",
                    help="the sidecars' tls.session_store (auto)")
    ap.add_argument("--keep", type=Path, help="keep configs, files and logs under this dir")
    ap.add_argument("--json", action="store_true",
                    help="the results as JSON on stdout (the tables go to stderr)")
    args = ap.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenario_list) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.seconds <= 0 or args.rate <= 0 or args.clients < 1 or args.streams < 0:
        ap.error("--seconds and --rate must be positive, --clients at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    tables = sys.stderr if args.json else sys.stdout
    for name in args.scenario_list:
        result = mi.in_workdir(f"soak-{name}", args.keep, partial(run_scenario, name, args))
        print(table(result), file=tables, flush=True)
        results.append(result)
    print(summary(results), file=tables)
    if args.json:
        print(json.dumps([{**asdict(r), "failed": r.failed} for r in results], indent=2))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
