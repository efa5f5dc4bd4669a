"""`workers: N`: N processes share each listener with SO_REUSEPORT, one supervisor.

The supervisor binds nothing that accepts. For a listener on port 0 it binds (but never
listens on) a SO_REUSEPORT socket to fix the port, so every worker binds the same one;
the kernel spreads connections across the workers' listening sockets.

It starts each worker as `python -m sidecar run -c CFG` with a hidden role (index, ports,
a pipe to report "ready"/"draining", and the shared ticket secret so any worker resumes
any worker's tickets), restarts a worker that dies (counted in
sidecar_worker_restarts_total, with a backoff when one keeps dying), forwards SIGHUP
(reload) and SIGTERM/SIGINT (drain; a second one ends the drain at once), and serves the
one admin endpoint: /metrics sums the workers through prometheus-client's multiprocess
mode (the workers write their values to files in a private tmp dir), /readyz is 200 only
while every worker is up and ready, /status lists them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import secrets
import select
import shutil
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.config import Address, Config, InboundListener, KtlsMode, OutboundListener
from sidecar.observe import logs
from sidecar.run import preflight, status
from sidecar.times import json_default

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ROLE_ENV = "SIDECAR_WORKER_ROLE"
# A worker that keeps dying is restarted after 0.1 s, 0.2 s, ... up to this many seconds.
MAX_BACKOFF = 5.0
# A worker that ran this long before dying is "healthy": its backoff starts over.
HEALTHY_RUN = 30.0


def usable_cpus() -> int:
    """`workers: auto`: the CPUs this process may run on, lowered to the cgroup CPU quota
    (a Kubernetes CPU limit) where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            limit, period = v2.read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        v1q, v1p = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path(
            "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if v1q.exists():
            q = int(v1q.read_text())
            return None if q <= 0 else q / int(v1p.read_text())
    except (OSError, ValueError):
        return None
    return None


def prepare_metrics_dir() -> str:
    """Before prometheus_client is imported: a private dir for the workers' value files."""
    import tempfile

    path = tempfile.mkdtemp(prefix="sidecar-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process gets from its supervisor, and its end of the pipe back: a
    line "ready", "draining", or "status {json}" (read by Supervisor._read_states)."""

    index: int
    ports: Mapping[str, int]  # listener name -> the port every worker binds (SO_REUSEPORT)
    notify_fd: int  # "ready" / "draining" lines go here
    ticket_secret: bytes  # shared, so any worker resumes any worker's tickets

    def address(self, name: str, configured: Address) -> Address:
        """Where listener `name` binds in this worker: the port the supervisor fixed."""
        if name not in self.ports:
            return configured
        return Address(configured.host, self.ports[name])

    def notify(self, state: str) -> None:
        try:
            os.write(self.notify_fd, f"{state}\n".encode())
        except OSError:
            pass  # the supervisor is gone or not reading; the worker carries on

    def report(self, serving: Mapping[str, Any]) -> None:
        """Send what /status needs to the supervisor, one line, all or nothing (a pipe
        write up to PIPE_BUF is atomic; a longer report is skipped, not torn)."""
        line = json.dumps(serving, default=json_default, separators=(",", ":"))
        if len(line) + len("status \n") <= select.PIPE_BUF:
            self.notify(f"status {line}")


def role_from_env() -> WorkerRole | None:
    raw = os.environ.get(ROLE_ENV)
    if not raw:
        return None
    role = json.loads(raw)
    return WorkerRole(role["index"], role["ports"], role["notify_fd"],
                      bytes.fromhex(role["ticket_secret"]))


@dataclass(slots=True)
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    started_at: float = 0.0
    fails_in_a_row: int = 0
    pid_history: list[int] = field(default_factory=list)
    # Its last Server.serving(): sent when it changed, looked at once a second while the
    # worker has connections and after each reload (an idle worker sends nothing).
    report: dict[str, Any] | None = None


class Supervisor:
    def __init__(self, config: Config, config_path: Path, count: int, loop_name: str) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.loop_name = loop_name
        self.workers = [Worker(i) for i in range(count)]
        self.ports: dict[str, int] = {}
        self.draining = False
        self.secret = secrets.token_bytes(32)
        self._holds: list[socket.socket] = []
        self._stop = asyncio.Event()
        self._admin: asyncio.Server | None = None
        self._identity: Any = None

    def _listeners(self) -> list[InboundListener | OutboundListener]:
        return [*self.config.inbound, *self.config.outbound]

    def _reserve_ports(self) -> None:
        for lst in self._listeners():
            if lst.listen.port == 0:
                sock = _reserve(lst.listen)
                self._holds.append(sock)
                self.ports[lst.name] = sock.getsockname()[1]
            else:
                self.ports[lst.name] = lst.listen.port

    async def run(self) -> int:
        from sidecar.observe import admin, metrics
        from sidecar.run import snapshots

        loop = asyncio.get_running_loop()
        try:
            self._reserve_ports()
        except OSError as exc:
            logs.event(logging.ERROR, f"cannot reserve listener ports: {exc.strerror}")
            return 1
        from sidecar.problems import ProblemsError

        try:
            self._identity = snapshots.identity_of(self.config)
        except ProblemsError as exc:
            logs.event(logging.ERROR, "cannot start: no valid identity",
                       problems=[str(p) for p in exc.problems])
            return 1
        preflight.log_warnings(self.config, self._identity, workers=self.count)
        pin = preflight.pin_refusal()  # else every worker refuses, and restarts
        if pin is not None:
            logs.event(logging.ERROR, f"cannot start: {pin}")
            return 1
        if self.config.tls.ktls == KtlsMode.ON:  # else every worker refuses, and restarts
            from sidecar.tls import ktls

            refusal = preflight.ktls_refusal(self.config.tls.ktls, ktls.detect())
            if refusal is not None:
                logs.event(logging.ERROR, f"cannot start: {refusal}")
                return 1
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(metrics.ProcessTotals(self._worker_pids))
        self._restarts_counter = metrics.worker_restarts
        try:
            a = self.config.admin.listen
            self._admin = await admin.start(a.host, a.port, admin.Probe(
                self.not_ready, self.status, registry))
        except OSError as exc:
            logs.event(logging.ERROR, f"cannot listen on admin {self.config.admin.listen}: "
                       f"{exc.strerror}")
            return 1
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT"),
                          (signal.SIGHUP, "SIGHUP")):
            loop.add_signal_handler(sig, self._on_signal, name)
        for lst_name, port in self.ports.items():
            host = next(x.listen.host for x in self._listeners() if x.name == lst_name)
            logs.event(logging.INFO, "listening", listener=lst_name, address=f"{host}:{port}",
                       workers=self.count)
        sock = self._admin.sockets[0].getsockname()
        logs.event(logging.INFO, "listening", listener="admin", direction="admin",
                   address=f"{sock[0]}:{sock[1]}")
        supervisors = [asyncio.create_task(self._supervise(w)) for w in self.workers]
        await self._until_all_ready()
        logs.event(logging.INFO, "ready", workers=[w.proc.pid for w in self.workers if w.proc],
                   spiffe_id=str(self._identity.spiffe_id))
        await self._stop.wait()
        await asyncio.gather(*supervisors, return_exceptions=True)
        self._admin.close()
        for s in self._holds:
            s.close()
        shutil.rmtree(os.environ.get(MULTIPROC_ENV, ""), ignore_errors=True)
        logs.event(logging.INFO, "stopped")
        return 0

    async def _until_all_ready(self) -> None:
        while not all(w.ready for w in self.workers) and not self._stop.is_set():
            await asyncio.sleep(0.05)

    async def _supervise(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        while not self.draining:
            read_fd, write_fd = os.pipe()
            role = {"index": w.index, "ports": self.ports, "notify_fd": write_fd,
                    "ticket_secret": self.secret.hex()}
            env = {**os.environ, ROLE_ENV: json.dumps(role)}
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path),
                "--loop", self.loop_name, env=env, pass_fds=(write_fd,))
            os.close(write_fd)
            if self.draining:  # the stop signal came while this one was starting
                w.proc.send_signal(signal.SIGTERM)
            w.started_at = loop.time()
            w.pid_history.append(w.proc.pid)
            reader = asyncio.create_task(self._read_states(w, read_fd))
            code = await w.proc.wait()
            reader.cancel()
            w.ready, w.report = False, None
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(w.proc.pid)  # type: ignore[no-untyped-call]
            if self.draining:
                logs.event(logging.INFO, "worker exited", worker=w.index, code=code)
                return
            ran = loop.time() - w.started_at
            w.fails_in_a_row = 0 if ran > HEALTHY_RUN else w.fails_in_a_row + 1
            delay = min(MAX_BACKOFF, 0.1 * 2 ** max(0, w.fails_in_a_row - 1))
            w.restarts += 1
            self._restarts_counter.inc()
            logs.event(logging.WARNING, "worker died; restarting", worker=w.index, code=code,
                       restart_in_s=delay)
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass

    async def _read_states(self, w: Worker, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        try:
            while line := await reader.readline():
                word, _, rest = line.strip().partition(b" ")
                if word == b"status":
                    try:
                        w.report = json.loads(rest)
                    except ValueError:
                        pass  # never torn (one atomic write), but never fatal either
                else:
                    w.ready = word == b"ready"
        finally:
            transport.close()

    def _worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers
                if w.proc is not None and w.proc.returncode is None]

    def _on_signal(self, name: str) -> None:
        logs.event(logging.INFO, f"{name} received", workers=self.count)
        if name == "SIGHUP":
            self._forward(signal.SIGHUP)
            return
        first = not self.draining
        self.draining = True
        self._forward(signal.SIGTERM)
        if first:
            asyncio.get_running_loop().create_task(self._wait_workers())

    async def _wait_workers(self) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        await asyncio.gather(*(p.wait() for p in procs))
        self._stop.set()

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(sig)

    def _current_identity(self) -> Any:
        """Re-read on each admin request (rare, cheap): the workers reload on their own,
        and the supervisor's view must follow the files, keeping the last good set."""
        from sidecar.problems import ProblemsError
        from sidecar.run import snapshots

        try:
            self._identity = snapshots.identity_of(self.config)
        except ProblemsError:
            pass
        return self._identity

    def not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        down = [w.index for w in self.workers if not w.ready]
        if down:
            return f"worker(s) {down} not ready"
        ident = self._current_identity()
        return None if ident is None else status.identity_problem(ident, dt.datetime.now(dt.UTC))

    def status(self) -> dict[str, Any]:
        """As a single process's /status, from what the workers last reported (each
        entry of `workers` also carries its own)."""
        ident = self._current_identity()
        reports = [w.report for w in self.workers if w.report is not None]
        return {
            **(status.describe_identity(ident) if ident else {"spiffe_id": None, "svid": None}),
            "listeners": [{"name": n, "port": p} for n, p in self.ports.items()],
            **status.combine(reports),
            "draining": self.draining,
            "workers": [{"index": w.index, "pid": w.proc.pid if w.proc else None,
                         "ready": w.ready, "restarts": w.restarts, **(w.report or {})}
                        for w in self.workers],
        }


def _reserve(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, 0))
    return sock
