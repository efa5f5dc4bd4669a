"""The docker-compose demo, run for real without a container engine (issue 9, item 6).

`examples/docker-compose/compose.yaml` is read with PyYAML and played as processes in
network namespaces this test makes itself:

    agents ns (no network, like `network_mode: none`): ca-init's command, then one
        `sidecar pki agent` per workload, each serving the Workload API on a socket in its
        own "volume" directory, which only that workload's sidecar also mounts
    payments ns: payments' sidecar (the template rendered by the compose entry command)
        and the payments app on its loopback, as `network_mode: service:payments-sidecar`
    frontend ns, batch ns: each a sidecar and its caller app
    bridge ns: a Linux bridge joining the three workload namespaces by veth pairs, the
        compose network (10.200.0.0/24, nothing leaves this machine)

Every command is the one compose.yaml gives (the image's ENTRYPOINT from the Dockerfile,
the x-sidecar rendering script, the agents' and apps' commands, the healthchecks), with
container paths mapped to the directories standing in for the service's volumes, and
`${...}` interpolated from `.env` as compose does. The sidecars' environment is `.env`
plus the service's `environment`, with one change: PAYMENTS_ADDR names payments'
namespace address instead of the `payments-sidecar` hostname. The sidecars start before
their agents are healthy (compose waits only for `service_started`), and their SVIDs come
over the Workload API. For the rotation under traffic, payments' and frontend's agents are
restarted with `--every 1500ms` (not 30s), as `docker compose up` replaces a container: the
sidecars lose the stream, redial, and keep serving meanwhile.

Checks: frontend -> payments is allowed (rule `frontend`), batch -> payments is refused by
rule `no-batch` before the payments app is dialed, and calls in a loop while both ends'
agents restart and then rotate both ends' SVIDs every 1.5 s for ~8 s all succeed while
payments' sidecar swaps in each new identity its agent pushes.
Every namespace (and with it every veth and the bridge) and every process is removed at
the end, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import FRONTEND, PAYMENTS, REPO, Sidecar, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(40)]

EXAMPLE = REPO / "examples" / "docker-compose"
BATCH_ID = "spiffe://example.org/ns/batch/sa/batch"  # compose's batch, not conftest's BATCH

SUBNET = "10.200.0"
ADDRESS = {"payments": f"{SUBNET}.2", "frontend": f"{SUBNET}.3", "batch": f"{SUBNET}.4"}
ROTATE_EVERY = "1500ms"  # compose: 30s
SOAK_CALLS, SOAK_EVERY = 80, 0.1  # ~8 s of calls, a new connection each
KEEPALIVE_CALLS, KEEPALIVE_EVERY = 40, 0.2  # and one long-lived connection alongside
START_TIMEOUT = 15.0
STOP_TIMEOUT = 12.0  # drain_timeout is 10s in the configs; idle sidecars exit at once
RUN_TIMEOUT = 20.0


# --- compose.yaml and .env, as compose reads them ------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """.env as the README promises it: NAME=value lines, comments on their own lines."""
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), \
            f"{path}:{n}: not a plain NAME=value line: {raw!r}"
        assert not value.startswith(("'", '"')) and " " not in value, \
            f"{path}:{n}: quotes or spaces in a value: {raw!r}"
        out[name] = value
    return out


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:\?|\?|:-|-)(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """compose's `${VAR}`, `${VAR:?err}`, `${VAR:-default}` and `$$`, on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"]
        have = env.get(name)
        empty = have is None or (have == "" and op in (":?", ":-"))
        if op in (":?", "?") and empty:
            pytest.fail(f"compose.yaml: {name} is not set: {arg}")
        if op in (":-", "-") and empty:
            return arg
        return have or ""

    return _INTERPOLATION.sub(one, value)


def image_entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form) from the repository's Dockerfile."""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            entry = json.loads(line.removeprefix("ENTRYPOINT"))
            assert isinstance(entry, list), line
            return [str(x) for x in entry]
    pytest.fail("Dockerfile: no ENTRYPOINT")


@dataclass
class Service:
    """One compose service with its container paths mapped to this test's directories."""

    name: str
    spec: dict[str, Any]
    mounts: dict[str, Path]  # container path -> host directory

    def map(self, value: str) -> str:
        """Each container path (a mount point, alone or as a prefix) -> the host path."""
        for cpath in sorted(self.mounts, key=len, reverse=True):
            value = re.sub(rf"(?<![\w./-]){re.escape(cpath)}(?=$|[/\s'\";])",
                           lambda _m, c=cpath: str(self.mounts[c]), value)
        return value

    def argv(self, *, entrypoint: list[str] | None = None) -> list[str]:
        entry = self.spec.get("entrypoint", entrypoint if entrypoint is not None else [])
        command = self.spec.get("command", [])
        entry = [entry] if isinstance(entry, str) else list(entry)
        command = [command] if isinstance(command, str) else list(command)
        return [self.map(str(a)) for a in [*entry, *command]]

    def healthcheck(self) -> list[str]:
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", test
        return [self.map(str(a)) for a in test[1:]]


@dataclass
class Compose:
    services: dict[str, Any]
    volumes_root: Path

    @classmethod
    def load(cls, env: dict[str, str], volumes_root: Path) -> Compose:
        doc = yaml.safe_load((EXAMPLE / "compose.yaml").read_text())
        doc = interpolate(doc, env)
        return cls(doc["services"], volumes_root)

    def service(self, name: str) -> Service:
        spec = self.services[name]
        mounts: dict[str, Path] = {}
        for volume in spec.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith((".", "/")):
                host = (EXAMPLE / source).resolve()
            else:
                host = self.volumes_root / source  # a named volume
                host.mkdir(parents=True, exist_ok=True)
            mounts[target] = host
        return Service(name, spec, mounts)


# --- network namespaces ----------------------------------------------------------------------


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Netns:
    """The namespaces of one test run: a bridge and one per container group."""

    prefix: str = field(default_factory=lambda: f"sce2e-{os.getpid()}-{secrets.token_hex(2)}")
    made: list[str] = field(default_factory=list)

    def name(self, group: str) -> str:
        return f"{self.prefix}-{group}"

    def add(self, group: str) -> str:
        ns = self.name(group)
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def build(self) -> None:
        bridge = self.add("bridge")
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        self.add("agents")  # network_mode: none -- a loopback only
        for group, address in ADDRESS.items():
            ns = self.add(group)
            port = f"v-{group}"
            # Made inside the namespaces: nothing ever appears in the host's namespace.
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
               "netns", bridge)
            ip("-n", bridge, "link", "set", port, "master", "br0")
            ip("-n", bridge, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def exec(self, group: str) -> list[str]:
        return ["ip", "netns", "exec", self.name(group)]

    def remove(self) -> list[str]:
        problems = []
        for ns in reversed(self.made):  # deleting a namespace deletes its veth ends
            try:
                ip("netns", "del", ns)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                problems.append(str(exc))
        self.made.clear()
        return problems


def namespaces_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); not root here")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`, which is not installed")
    probe = f"sce2e-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                       timeout=10)
    if r.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: ip netns add: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)


# --- processes ---------------------------------------------------------------------------------


class Proc:
    """A plain-text process (app, agent): its output lines, collected by a thread."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "it exited" if self._eof else f"timed out after {timeout}s"
                    pytest.fail(f"{self.name}: {why} waiting for {what}; output:\n"
                                + "\n".join(self.lines[-20:]))
                self._cond.wait(left)

    def count(self, predicate: Callable[[str], bool]) -> int:
        with self._cond:
            return sum(1 for line in self.lines if predicate(line))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            return -9


class NsSidecar(Sidecar):
    """conftest's Sidecar (JSON lines from stderr, wait_line, connection), started with
    compose's entry command instead of `python -m sidecar run`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], tmpdir: Path) -> None:
        super().__init__(name, tmpdir / f"{name}.yaml", "uvloop")
        self.argv, self.env, self.tmpdir = argv, env, tmpdir

    def launch(self) -> None:
        stdout = (self.tmpdir / "stdout").open("wb")
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                          stderr=subprocess.PIPE, env=self.env, cwd=self.tmpdir)
        finally:
            stdout.close()
        self._reader = threading.Thread(target=self._read, name=f"stderr-{self.name}",
                                        daemon=True)
        self._reader.start()

    def signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def finish(self) -> int:
        """Wait for the exit after SIGTERM (SIGKILL if it hangs); the exit code."""
        if self._proc is None:  # never launched
            return 0
        try:
            self.returncode = self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT)
            self.returncode = -9
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)
        return self.returncode

    def count(self, msg: str, since: float = 0.0) -> int:
        with self._cond:
            return sum(1 for ln in self.lines if ln.get("msg") == msg and ln["_t"] >= since)


# --- the topology ------------------------------------------------------------------------------


@dataclass
class Topology:
    root: Path
    netns: Netns
    compose: Compose
    dotenv: dict[str, str]
    base_env: dict[str, str]
    agents: dict[str, Proc] = field(default_factory=dict)
    sidecars: dict[str, NsSidecar] = field(default_factory=dict)
    apps: dict[str, Proc] = field(default_factory=dict)
    stopped: list[Proc] = field(default_factory=list)

    def run(self, group: str, argv: list[str], timeout: float = RUN_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.netns.exec(group), *argv], capture_output=True,
                              text=True, timeout=timeout, env=env or self.base_env,
                              cwd=self.root, stdin=subprocess.DEVNULL)

    def init_ca(self) -> None:
        init = self.compose.service("ca-init")
        r = self.run("agents", init.argv())
        assert r.returncode == 0, f"ca-init failed:\n{r.stdout}{r.stderr}"

    def start_agents(self) -> None:
        for workload in ADDRESS:
            self.start_agent(workload)

    def wait_agents_healthy(self) -> None:
        for workload in ADDRESS:  # healthy: compose's own healthcheck, until it passes
            check = self.compose.service(f"agent-{workload}").healthcheck()
            wait_for(lambda c=check: self.run("agents", c, timeout=5).returncode == 0,
                     START_TIMEOUT, f"agent-{workload}'s healthcheck")

    def start_agent(self, workload: str, every: str | None = None) -> Proc:
        """compose's agent-WORKLOAD service; with `every`, at that interval instead."""
        svc = self.compose.service(f"agent-{workload}")
        argv = svc.argv(entrypoint=image_entrypoint())
        if every is not None:
            argv[argv.index("--every") + 1] = every
        old = self.agents.pop(workload, None)
        if old is not None:  # as `docker compose up` replacing the container: stop, start
            old.signal(signal.SIGTERM)
            old.wait(STOP_TIMEOUT)
            self.stopped.append(old)
        proc = Proc(svc.name, [*self.netns.exec("agents"), *argv], self.base_env, self.root)
        self.agents[workload] = proc
        return proc

    def start_sidecars(self) -> None:
        env_from_compose = dict(self.dotenv)
        port = self.dotenv["PAYMENTS_ADDR"].rpartition(":")[2]
        env_from_compose["PAYMENTS_ADDR"] = f"{ADDRESS['payments']}:{port}"  # hostname -> IP
        for workload in ADDRESS:
            svc = self.compose.service(f"{workload}-sidecar")
            assert svc.spec.get("env_file") == [".env"], svc.spec.get("env_file")
            tmpfs = self.root / "tmpfs" / svc.name  # the container's tmpfs on /tmp
            tmpfs.mkdir(parents=True)
            env = dict(self.base_env)
            env.update(env_from_compose)
            env.update({k: svc.map(str(v)) for k, v in svc.spec["environment"].items()})
            env["TMPDIR"] = env["HOME"] = str(tmpfs)  # the image's ENV
            sc = NsSidecar(svc.name, [*self.netns.exec(workload), *svc.argv()], env, tmpfs)
            self.sidecars[workload] = sc
            sc.launch()  # all three start together; then wait for each
        for workload, sc in self.sidecars.items():
            sc.wait_line(lambda ln: ln.get("msg") == "ready", START_TIMEOUT, "the 'ready' line")
            check = self.compose.service(f"{workload}-sidecar").healthcheck()
            r = self.run(workload, check, timeout=10)
            assert r.returncode == 0, f"{sc.name}'s healthcheck failed:\n{r.stdout}{r.stderr}"

    def start_payments_app(self) -> Proc:
        svc = self.compose.service("payments")
        assert svc.spec["network_mode"] == "service:payments-sidecar"
        app = Proc("payments", [*self.netns.exec("payments"), *svc.argv()], self.base_env,
                   self.root)
        self.apps["payments"] = app
        app.wait_line(lambda ln: "listening on" in ln, START_TIMEOUT, "'listening on'")
        return app

    def caller(self, workload: str, *extra: str) -> list[str]:
        svc = self.compose.service(workload)
        assert svc.spec["network_mode"] == f"service:{workload}-sidecar"
        return [*svc.argv(), *extra]

    def stop(self) -> list[str]:
        """Apps and sidecars by SIGTERM (a sidecar must exit 0), agents too; kill
        anything that hangs. Returns what went wrong."""
        problems: list[str] = []
        for app in self.apps.values():
            app.signal(signal.SIGTERM)
        for app in self.apps.values():
            app.wait(STOP_TIMEOUT)
        for sc in self.sidecars.values():
            sc.signal(signal.SIGTERM)  # once: a second SIGTERM would end the drain at once
        for sc in self.sidecars.values():
            rc = sc.finish()
            # One killed before it was up (the test failed first) is not its fault.
            if rc != 0 and sc.count("ready"):
                problems.append(f"{sc.name} exited {rc} after SIGTERM; last lines:\n"
                                f"{sc.tail(15)}")
        for p in self.agents.values():
            p.signal(signal.SIGTERM)
        for p in self.agents.values():
            p.wait(STOP_TIMEOUT)
        return problems


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    namespaces_or_skip()
    # `sidecar` on PATH, as the image's console script; `python` is this venv's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "sidecar"
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom sidecar.cli import main\n"
                    "sys.exit(main())\n")
    shim.chmod(0o755)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    base_env["PATH"] = os.pathsep.join(
        [str(bin_dir), str(Path(sys.executable).parent), base_env.get("PATH", "")])
    base_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    base_env["PYTHONDONTWRITEBYTECODE"] = "1"
    base_env["PYTHONUNBUFFERED"] = "1"
    dotenv = read_dotenv(EXAMPLE / ".env")

    netns = Netns()
    topo = Topology(tmp_path, netns, Compose.load(dotenv, tmp_path / "volumes"), dotenv,
                    base_env)
    problems: list[str] = []
    try:
        netns.build()
        yield topo
    finally:
        try:
            problems += topo.stop()
        finally:
            problems += netns.remove()
    assert not problems, "\n".join(problems)


# --- the test ---------------------------------------------------------------------------------


def test_compose_topology_in_network_namespaces(topology: Topology) -> None:
    t = topology
    t.init_ca()
    # The sidecars start with their agents, not after them: compose's `service_started`.
    t.start_agents()
    t.start_sidecars()
    t.wait_agents_healthy()
    # Each identity came over the Workload API, from that workload's own agent.
    for workload, expected in (("payments", PAYMENTS), ("frontend", FRONTEND),
                               ("batch", BATCH_ID)):
        first = t.sidecars[workload].wait_line(
            lambda ln: ln.get("msg") == "identity from the Workload API", START_TIMEOUT,
            "the identity from the Workload API")
        assert first["spiffe_id"] == expected, first
        assert first["address"].endswith("/socket-" + workload + "/agent.sock"), first
    app = t.start_payments_app()
    payments, frontend_sc = t.sidecars["payments"], t.sidecars["frontend"]

    def app_requests() -> int:
        return app.count(lambda ln: '"GET /' in ln)

    # The allowed call: frontend app -> frontend sidecar -> bridge -> payments sidecar -> app.
    r = t.run("frontend", t.caller("frontend", "--count", "1"))
    assert r.returncode == 0, f"frontend's call failed:\n{r.stdout}{r.stderr}"
    assert "ok 200 'payments: hello from payments (you asked for /call/1)" in r.stdout, r.stdout
    line = payments.connection(peer_id=FRONTEND, direction="inbound")
    assert (line["decision"], line["rule"], line["reason"]) == ("allow", "frontend", None), line
    assert line["peer_addr"].startswith(f"{ADDRESS['frontend']}:"), line  # over the veths
    assert line["bytes_to_app"] > 0, line
    out = frontend_sc.connection(direction="outbound")
    assert out["peer_id"] == PAYMENTS and out["reason"] is None, out
    wait_for(lambda: app_requests() == 1, 5.0, "the payments app to log the call")

    # The denied call: batch holds a valid SVID, payments' policy refuses it by name, and
    # the payments app never hears of it.
    r = t.run("batch", t.caller("batch", "--count", "1"))
    assert r.returncode == 1, f"batch's call was not refused:\n{r.stdout}{r.stderr}"
    assert "FAILED: the connection was closed before any answer" in r.stdout, r.stdout
    line = payments.connection(peer_id=BATCH_ID, direction="inbound")
    assert (line["decision"], line["rule"]) == ("deny", "no-batch"), line
    assert line["bytes_to_app"] == 0 and line["close"] == "denied", line
    assert line["peer_addr"].startswith(f"{ADDRESS['batch']}:"), line
    out = t.sidecars["batch"].connection(direction="outbound")
    assert out["peer_id"] == PAYMENTS, out  # authentication worked; authorization refused
    assert app_requests() == 1, "the payments app saw the denied call:\n" + "\n".join(app.lines)

    # A rotation under traffic: payments' and frontend's agents restarted to re-issue every
    # 1.5 s (not compose's 30 s) while frontend calls (a new connection each call) and a
    # long-lived connection calls alongside.
    since = time.monotonic()
    for workload in ("payments", "frontend"):
        t.start_agent(workload, every=ROTATE_EVERY)
    loops = {
        "calls": subprocess.Popen(
            [*t.netns.exec("frontend"), *t.caller(
                "frontend", "--every", str(SOAK_EVERY), "--count", str(SOAK_CALLS))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=t.base_env,
            stdin=subprocess.DEVNULL),
        "long-lived": subprocess.Popen(
            [*t.netns.exec("frontend"), *t.caller(
                "frontend", "--keep-alive", "--every", str(KEEPALIVE_EVERY),
                "--count", str(KEEPALIVE_CALLS), "--name", "long-lived")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=t.base_env,
            stdin=subprocess.DEVNULL),
    }
    results = {}
    try:
        for name, p in loops.items():
            results[name] = (p.communicate(timeout=RUN_TIMEOUT)[0], p.returncode)
    finally:
        for p in loops.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    soak_seconds = time.monotonic() - since
    for name, (output, rc) in results.items():
        calls = SOAK_CALLS if name == "calls" else KEEPALIVE_CALLS
        tail = "\n".join(output.splitlines()[-5:])
        assert rc == 0 and f"[ok={calls} failed=0]" in output, \
            f"{name}: calls failed during rotation (exit {rc}):\n" + "\n".join(
                ln for ln in output.splitlines() if "FAILED" in ln)[:3000] + f"\n...\n{tail}"
    reloads = payments.count("identity reloaded", since)
    assert reloads >= 3, (f"payments' sidecar reloaded its identity {reloads} times in "
                          f"{soak_seconds:.1f}s of rotation every {ROTATE_EVERY}; last lines:\n"
                          f"{payments.tail(15)}")
    reloaded = [ln for ln in payments.lines if ln.get("msg") == "identity reloaded"]
    assert all(ln["spiffe_id"] == PAYMENTS for ln in reloaded), reloaded
    failed = [ln for ln in payments.connections() if ln["_t"] >= since and ln["reason"]]
    assert not failed, f"payments' sidecar logged failed connections: {failed[:3]}"
    allowed = [ln for ln in payments.connections(decision="allow") if ln["_t"] >= since]
    assert len(allowed) >= SOAK_CALLS, len(allowed)  # plus the long-lived one, once done
    assert app_requests() == 1 + SOAK_CALLS + KEEPALIVE_CALLS
    # Each reload is an SVID the restarted agent issued (its first one counts: "rotation 1").
    rotations = t.agents["payments"].count(lambda ln: ln.startswith("rotation "))
    assert rotations >= reloads, t.agents["payments"].lines
    print(f"soak {soak_seconds:.1f}s: {reloads} payments reloads, "
              f"{frontend_sc.count('identity reloaded', since)} frontend reloads, "
              f"{len(allowed)} allowed connections")
