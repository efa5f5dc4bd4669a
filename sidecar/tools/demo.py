"""`sidecar demo`: a complete zero-trust exchange on loopback, with nothing to set up.

It makes a dev CA in a temp dir and one dev SPIFFE Workload API agent per workload (the
`Agent` of `sidecar pki agent`, each on its own unix socket and handing out that one
workload's SVID, as a SPIRE agent hands each workload only its own). Each sidecar takes its
identity from its agent over the Workload API (`identity.workload_api`): no certificate or
key file is written for it. payments' sidecar is started before its agent, to show /readyz
saying what it waits for. Then a small "payments" app behind that inbound sidecar, and two
client-side sidecars (the frontend, and a batch job the policy does not allow); the calls a
user wants to see, each explained from the sidecars' own access logs and metrics; and the
agents' rotations arriving over the open streams while the frontend keeps calling.
Everything runs in this process on 127.0.0.1 with ephemeral ports, and is removed at the end.

It needs the `spire` extra (grpcio, py-spiffe's stubs), which the README's install includes
(`.[test]` pulls it in). Without it the demo says so and stops: it does not fall back to
SVID files, because the Workload API is what it shows.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config import parse_config
from sidecar.observe import logs, metrics
from sidecar.outcomes import DecisionKind, StreamFailure
from sidecar.reasons import Reason
from sidecar.run.server import Server
from sidecar.tools import pki
from sidecar.tools.demo_parts import STEP_TIMEOUT, Events, call, get

if TYPE_CHECKING:  # the spire extra: imported in main(), where its absence is explained
    from sidecar.tools.pki.agent import Agent

TRUST_DOMAIN = "example.org"
FRONTEND = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"
PAYMENTS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"
BATCH = f"spiffe://{TRUST_DOMAIN}/ns/batch/sa/report-job"
BILLING = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/billing"
# A SPIRE agent rotates at half the SVID's lifetime; these agents rotate every few seconds
# so that rotations happen while the demo runs, and its step 6 waits for one.
ROTATE_EVERY = 2.0
SVID_TTL = timedelta(hours=1)
CALL_PACE = 0.02  # seconds between the calls of step 6: a steady stream, not a flood
AFTER_ROTATION = 5  # calls made on the rotated identities before step 6 ends

NO_SPIRE_EXTRA = (
    "sidecar demo: each sidecar in the demo takes its SVID from a dev SPIFFE Workload API "
    "agent, which needs the optional `spire` extra (grpcio and py-spiffe), not installed "
    "here: pip install -e '.[spire]' from a checkout (the README's `.[test]` includes it)"
)

POLICY = f"""\
mode: enforce
default: deny
rules:
  - name: frontend-to-payments
    action: allow
    from: ["{FRONTEND}"]
"""


@dataclass
class Workload:
    """One workload's agent and sidecar, and every serial its agent has issued."""

    name: str
    spiffe_id: str
    agent: Agent
    issued: list[int] = field(default_factory=list)  # appended by the rotation thread
    server: Server | None = None

    @property
    def socket_name(self) -> str:
        return self.agent.socket.name

    @property
    def sidecar(self) -> Server:
        assert self.server is not None
        return self.server

    def serving(self) -> int:
        """The serial of the SVID the sidecar serves now."""
        source = self.sidecar.source
        assert source is not None and source.identity is not None
        return source.identity.serial


def _say(text: str = "") -> None:
    print(text, flush=True)


def _owner(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


async def _payments_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.read(4096)
    writer.write(b"payments: received " + request)
    await writer.drain()
    writer.close()


def _workload(d: Path, intermediate: pki.CA, name: str, spiffe_id: str) -> Workload:
    from sidecar.tools.pki.agent import Agent, Entry

    issued: list[int] = []

    def record(_generation: int, svids: tuple[pki.Svid, ...]) -> None:
        issued.extend(s.serial for s in svids)

    agent = Agent(intermediate, d / f"{name}.sock", [Entry(spiffe_id)], every=ROTATE_EVERY,
                  ttl=SVID_TTL, on_rotate=record)
    return Workload(name, spiffe_id, agent, issued)


def _config(d: Path, w: Workload, body: str) -> Server:
    # The address is relative: resolved against the config file's directory (d).
    text = f"""\
identity:
  workload_api: unix:{w.socket_name}
admin: {{listen: "127.0.0.1:0"}}
{body}"""
    path = d / f"{w.name}.yaml"
    path.write_text(text)
    w.server = Server(parse_config(text, path))
    return w.server


Stop = Callable[[], Awaitable[None]]


def _launch(server: Server) -> tuple[asyncio.Future[None], Stop]:
    """Run the sidecar; the future completes once it is ready, or fails if it exits."""
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.run(on_ready=lambda _s: ready.set_result(None)))

    def exited(_: object) -> None:
        if not ready.done():
            ready.set_exception(RuntimeError("a sidecar did not start: see the log above"))

    task.add_done_callback(exited)

    async def stop() -> None:
        server.stop()
        await task

    return ready, stop


async def _ready(ready: asyncio.Future[None]) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        await ready


def _port(server: Server, listener: str) -> int:
    return next(lst.port for lst in server.listeners if lst.name == listener)


async def _demo(d: Path) -> int:
    _say(f"1. A dev CA for trust domain {TRUST_DOMAIN}, and a dev Workload API agent per "
         "workload")
    _, intermediate = pki.init_ca_dir(d / "ca", TRUST_DOMAIN)
    workloads = {name: _workload(d, intermediate, name, sid)
                 for name, sid in (("payments", PAYMENTS), ("frontend", FRONTEND),
                                   ("batch", BATCH))}
    for w in workloads.values():
        _say(f"   agent {w.socket_name:14} hands out {w.spiffe_id} only")
    hours = SVID_TTL / timedelta(hours=1)
    _say(f"   each on a unix socket in {d}; SVIDs valid {hours:g}h, re-issued with a new key "
         f"every {ROTATE_EVERY:g} s")
    (d / "policy.yaml").write_text(POLICY)
    _say(f"   policy on payments' sidecar: allow {FRONTEND}, deny everything else")

    events = Events()
    root_logger = logging.getLogger("sidecar")
    for handler in root_logger.handlers:
        handler.setLevel(logging.ERROR)  # the console stays quiet; the demo narrates
    root_logger.setLevel(logging.INFO)
    root_logger.addHandler(events)
    app = await asyncio.start_server(_payments_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    stops: list[Stop] = []
    started: list[Agent] = []
    try:
        ok = await _start_all(d, workloads, events, app_port, stops, started)
        ok &= await _scenarios(events, workloads)
        ok &= await _rotation(events, workloads)
    finally:
        for stop in reversed(stops):
            await stop()
        for agent in started:
            await asyncio.to_thread(agent.close)
        app.close()
        await app.wait_closed()
        root_logger.removeHandler(events)
    _metrics_summary()
    _say("\nDemo finished: " + ("every call ended as expected." if ok else
                                "SOMETHING UNEXPECTED HAPPENED (see above)."))
    return 0 if ok else 1


async def _start_all(d: Path, workloads: dict[str, Workload], events: Events, app_port: int,
                     stops: list[Stop], started: list[Agent]) -> bool:
    payments, frontend, batch = (workloads[n] for n in ("payments", "frontend", "batch"))
    _say(f"\n2. payments app on 127.0.0.1:{app_port}; its sidecar starts before its agent")
    server = _config(d, payments, f"""\
inbound:
  - name: payments-in
    listen: 127.0.0.1:0
    forward_to: 127.0.0.1:{app_port}
policy: policy.yaml
""")
    ready, stop = _launch(server)
    stops.append(stop)
    failure = await events.wait(lambda msg, f: msg.startswith("Workload API stream:")
                                and f.get("address") == f"unix://{payments.agent.socket}")
    status, body = await get(server.admin_address, "/readyz")
    _say(f"   /readyz of payments' sidecar: {status}")
    _say(f"     {body}")
    ok = status.startswith("503") and failure["reason"] == StreamFailure.SOCKET_MISSING
    for w in (payments, frontend, batch):
        w.agent.start()
        started.append(w.agent)
    _say("   the three agents start; payments' sidecar redials (backoff with jitter)")
    await _ready(ready)
    status, body = await get(server.admin_address, "/readyz")
    _say(f"   /readyz of payments' sidecar: {status} ({body})")
    ok &= status.startswith("200")
    b_port = _port(server, "payments-in")
    bodies = [(frontend, f"""\
outbound:
  - name: to-payments
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{PAYMENTS}"]
  - name: to-billing
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{BILLING}"]
"""), (batch, f"""\
outbound:
  - name: batch-to-payments
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{PAYMENTS}"]
""")]
    for w, body in bodies:
        ready, stop = _launch(_config(d, w, body))
        stops.append(stop)
        await _ready(ready)
    _say("   each sidecar got its SVID, the key and the trust bundle from its own agent over "
         "the Workload API\n   (a FetchX509SVID stream it keeps open; no SVID or key file is "
         "written):")
    for w in (payments, frontend, batch):
        serial = w.serving()
        _say(f"   {w.name:9} {w.spiffe_id}, serial {serial:x}, from agent {w.socket_name}")
        ok &= serial in w.issued
    _say(f"   payments' sidecar (mTLS) listens on :{b_port}; frontend and batch talk "
         "plaintext to their own sidecars")
    return ok


async def _scenarios(events: Events, workloads: dict[str, Workload]) -> bool:
    frontend, batch = workloads["frontend"].sidecar, workloads["batch"].sidecar
    ok = True
    _say("\n3. frontend -> payments (allowed by the policy)")
    answer = await call(_port(frontend, "to-payments"), b"charge order 42")
    await events.access("to-payments")
    inn = await events.access("payments-in")
    _say(f"   answer: {answer.decode()!r}")
    _say(f"   payments' sidecar saw {inn['peer_id']} ({inn['tls_version']}, "
         f"{inn['cipher']}), decision {inn['decision']} by rule '{inn['rule']}'")
    ok &= answer == b"payments: received charge order 42" and inn["decision"] == DecisionKind.ALLOW

    _say("\n4. frontend -> a route that expects billing, but reaches payments")
    answer = await call(_port(frontend, "to-billing"), b"hello billing")
    out = await events.access("to-billing")
    await events.access("payments-in")  # payments' side of it: the caller hung up
    _say(f"   answer: {answer!r} (the frontend's sidecar hung up)")
    _say(f"   reason: {out['reason']}: {out['detail']}")
    _say(f"   meaning: {Reason.SPIFFE_ID_MISMATCH.explanation}")
    ok &= out["reason"] == Reason.SPIFFE_ID_MISMATCH and answer == b""

    _say("\n5. batch job -> payments (authenticated, but the policy denies it)")
    answer = await call(_port(batch, "batch-to-payments"), b"export all orders")
    inn = await events.access("payments-in")
    await events.access("batch-to-payments")
    _say(f"   answer: {answer!r}")
    _say(f"   payments' sidecar: {inn['peer_id']} -> decision {inn['decision']} "
         f"(rule '{inn['rule']}'); the app was never dialed")
    ok &= inn["decision"] == DecisionKind.DENY and answer == b""
    return bool(ok)


async def _rotation(events: Events, workloads: dict[str, Workload]) -> bool:
    payments, frontend = workloads["payments"], workloads["frontend"]
    _say(f"\n6. The agents rotate every {ROTATE_EVERY:g} s while the frontend keeps calling "
         "payments")
    port = _port(frontend.sidecar, "to-payments")
    mark = len(events.reloads)
    results: list[bool] = []

    def rotated(w: Workload) -> list[dict[str, object]]:
        return [r for r in events.reloads[mark:] if r["spiffe_id"] == w.spiffe_id]

    async with asyncio.timeout(STEP_TIMEOUT):
        after = 0
        while after < AFTER_ROTATION:
            i = len(results)
            answer = await call(port, f"order {i}".encode())
            results.append(answer == f"payments: received order {i}".encode())
            if rotated(payments) and rotated(frontend):
                after += 1
            await asyncio.sleep(CALL_PACE)
    ok = all(results)
    for w in (payments, frontend):
        new = rotated(w)[0]
        _say(f"   agent {w.socket_name} pushed a new SVID down the open stream; "
             f"{_owner(w.name)} sidecar swapped it in (serial {new['serial']}): no restart, "
             "no file")
        ok &= int(str(new["serial"]), 16) in w.issued
    _say(f"   calls during the rotation: {sum(results)} of {len(results)} answered")
    _say("   rotations so far, issued by each agent / applied by its sidecar:")
    for w in workloads.values():
        applied = sum(1 for r in events.reloads if r["spiffe_id"] == w.spiffe_id)
        issued = len(w.issued) - 1  # the first issue is not a rotation
        _say(f"     {w.name:9} {issued} / {applied}")
        ok &= applied <= issued
    return ok


def _metrics_summary() -> None:
    _say("\n7. What the metrics say (as /metrics would show them; the three sidecars share "
         "this process, so the workload_api counters are their sums)")
    wanted = ("sidecar_handshakes_total", "sidecar_handshake_errors_total",
              "sidecar_authz_decisions_total", "sidecar_workload_api_updates_total",
              "sidecar_workload_api_stream_failures_total")
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name in wanted and sample.value:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                _say(f"   {sample.name}{{{labels}}} {sample.value:g}")


def main() -> int:
    try:
        import sidecar.tools.pki.agent  # noqa: F401  (grpc: only here, where it is explained)
    except ImportError as exc:
        print(f"{NO_SPIRE_EXTRA} ({exc})")
        return 1
    logs.setup("warning", "text")
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as d:
        try:
            return asyncio.run(_demo(Path(d)))
        except TimeoutError:
            print(f"sidecar demo: failed: a step took longer than {STEP_TIMEOUT:g} s")
            return 1
        except (RuntimeError, OSError) as exc:
            print(f"sidecar demo: failed: {exc}")
            return 1
