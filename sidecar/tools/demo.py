"""`sidecar demo`: a complete zero-trust exchange on loopback, with nothing to set up.

It makes a dev CA in a temp dir, issues three SVIDs, starts a small "payments" app behind
an inbound sidecar, and two client-side sidecars (the frontend, and a batch job the
policy does not allow). Then it makes the calls a user wants to see, and explains each
outcome from the sidecars' own access logs and metrics. Everything runs in this process
on 127.0.0.1 with ephemeral ports, and is removed at the end.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sidecar.config import parse_config
from sidecar.observe import logs, metrics
from sidecar.outcomes import DecisionKind
from sidecar.reasons import Reason
from sidecar.run.server import Server
from sidecar.tools import pki

TRUST_DOMAIN = "example.org"
FRONTEND = f"spiffe://{TRUST_DOMAIN}/ns/web/sa/frontend"
PAYMENTS = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/payments"
BATCH = f"spiffe://{TRUST_DOMAIN}/ns/batch/sa/report-job"
BILLING = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/billing"
STEP_TIMEOUT = 10.0  # seconds for any one call; loopback answers in milliseconds

POLICY = f"""\
mode: enforce
default: deny
rules:
  - name: frontend-to-payments
    action: allow
    from: ["{FRONTEND}"]
"""


class _AccessLog(logging.Handler):
    """Collects the sidecars' access-log lines so the demo can explain them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self.reloads: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if record.name == logs.ACCESS.name and fields:
            self.lines.append(fields)
            self.changed.set()
        elif record.getMessage() == "identity reloaded" and fields:
            self.reloads.append(fields)
            self.changed.set()

    async def wait_reload(self) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not self.reloads:
                self.changed.clear()
                await self.changed.wait()
        return self.reloads.pop(0)

    async def wait_for(self, listener: str) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for line in self.lines:
                    if line["listener"] == listener:
                        self.lines.remove(line)
                        return line
                self.changed.clear()
                await self.changed.wait()


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _payments_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.read(4096)
    writer.write(b"payments: received " + request)
    await writer.drain()
    writer.close()


async def _call(port: int, message: bytes) -> bytes:
    """Send a request and read the answer; b"" when the sidecar hung up instead."""
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(message)
            writer.write_eof()
            return await reader.read()
        except ConnectionError:
            return b""
        finally:
            writer.close()


def _config(d: Path, name: str, body: str) -> Server:
    text = f"""\
identity:
  cert: {name}/svid.pem
  key: {name}/svid_key.pem
  bundle: {name}/bundle.pem
admin: {{listen: "127.0.0.1:0"}}
{body}"""
    path = d / f"{name}.yaml"
    path.write_text(text)
    return Server(parse_config(text, path))


async def _start(server: Server) -> Callable[[], Awaitable[None]]:
    ready = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.run(on_ready=lambda s: ready.set_result(s)))
    done, _ = await asyncio.wait({ready, task}, timeout=STEP_TIMEOUT,
                                 return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        raise RuntimeError("a sidecar did not start: see the log above")

    async def stop() -> None:
        server.stop()
        await task

    return stop


def _port(server: Server, listener: str) -> int:
    return next(lst.port for lst in server.listeners if lst.name == listener)


async def _demo(d: Path) -> int:
    _say(f"1. A dev CA for trust domain {TRUST_DOMAIN}, and an SVID for each workload")
    root, intermediate = pki.init_ca_dir(d / "ca", TRUST_DOMAIN)
    for name, sid in (("frontend", FRONTEND), ("payments", PAYMENTS), ("batch", BATCH)):
        svid = pki.issue_svid(intermediate, sid)
        pki.write_svid(d / name, svid, [root.cert])
        _say(f"   {name:9} {sid}  (serial {svid.serial:x}, 1h)")
    (d / "policy.yaml").write_text(POLICY)
    _say(f"   policy on payments' sidecar: allow {FRONTEND}, deny everything else")

    access = _AccessLog()
    root_logger = logging.getLogger("sidecar")
    for handler in root_logger.handlers:
        handler.setLevel(logging.ERROR)  # the console stays quiet; the demo narrates
    root_logger.setLevel(logging.INFO)
    root_logger.addHandler(access)
    app = await asyncio.start_server(_payments_app, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    stops = []
    try:
        payments = _config(d, "payments", f"""\
inbound:
  - name: payments-in
    listen: 127.0.0.1:0
    forward_to: 127.0.0.1:{app_port}
policy: policy.yaml
""")
        stops.append(await _start(payments))
        b_port = _port(payments, "payments-in")
        frontend = _config(d, "frontend", f"""\
outbound:
  - name: to-payments
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{PAYMENTS}"]
  - name: to-billing
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{BILLING}"]
""")
        stops.append(await _start(frontend))
        batch = _config(d, "batch", f"""\
outbound:
  - name: batch-to-payments
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:{b_port}
    expect_ids: ["{PAYMENTS}"]
""")
        stops.append(await _start(batch))
        _say(f"\n2. payments app on 127.0.0.1:{app_port}, its sidecar (mTLS) on :{b_port}; "
             "frontend and batch talk plaintext to their own sidecars")
        ok = await _scenarios(access, frontend, batch)
        ok &= await _rotation(d, access, frontend, intermediate, root)
    finally:
        for stop in reversed(stops):
            await stop()
        app.close()
        await app.wait_closed()
        root_logger.removeHandler(access)
    _metrics_summary()
    _say("\nDemo finished: " + ("every call ended as expected." if ok else
                                "SOMETHING UNEXPECTED HAPPENED (see above)."))
    return 0 if ok else 1


async def _scenarios(access: _AccessLog, frontend: Server, batch: Server) -> bool:
    ok = True
    _say("\n3. frontend -> payments (allowed by the policy)")
    answer = await _call(_port(frontend, "to-payments"), b"charge order 42")
    out = await access.wait_for("to-payments")
    inn = await access.wait_for("payments-in")
    _say(f"   answer: {answer.decode()!r}")
    _say(f"   payments' sidecar saw {inn['peer_id']} ({inn['tls_version']}, "
         f"{inn['cipher']}), decision {inn['decision']} by rule '{inn['rule']}'")
    ok &= answer == b"payments: received charge order 42" and inn["decision"] == DecisionKind.ALLOW
    _ = out

    _say("\n4. frontend -> a route that expects billing, but reaches payments")
    answer = await _call(_port(frontend, "to-billing"), b"hello billing")
    out = await access.wait_for("to-billing")
    await access.wait_for("payments-in")  # payments' side of it: the caller hung up
    _say(f"   answer: {answer!r} (the frontend's sidecar hung up)")
    _say(f"   reason: {out['reason']}: {out['detail']}")
    _say(f"   meaning: {Reason.SPIFFE_ID_MISMATCH.explanation}")
    ok &= out["reason"] == Reason.SPIFFE_ID_MISMATCH and answer == b""

    _say("\n5. batch job -> payments (authenticated, but the policy denies it)")
    answer = await _call(_port(batch, "batch-to-payments"), b"export all orders")
    inn = await access.wait_for("payments-in")
    await access.wait_for("batch-to-payments")
    _say(f"   answer: {answer!r}")
    _say(f"   payments' sidecar: {inn['peer_id']} -> decision {inn['decision']} "
         f"(rule '{inn['rule']}'); the app was never dialed")
    ok &= inn["decision"] == DecisionKind.DENY and answer == b""
    return bool(ok)


async def _rotation(d: Path, access: _AccessLog, frontend: Server, intermediate: pki.CA,
                    root: pki.CA) -> bool:
    _say("\n6. payments' SVID rotates while the frontend keeps calling")
    port = _port(frontend, "to-payments")
    results: list[bool] = []

    async def keep_calling() -> None:
        for i in range(40):
            answer = await _call(port, f"order {i}".encode())
            results.append(answer == f"payments: received order {i}".encode())

    caller = asyncio.create_task(keep_calling())
    while len(results) < 3:  # a few calls answered first: the point is mid-traffic
        await asyncio.sleep(0)
    new = pki.issue_svid(intermediate, PAYMENTS)
    pki.write_svid(d / "payments", new, [root.cert])  # in place, as spiffe-helper does
    reloaded = await access.wait_reload()
    await caller
    access.lines.clear()
    _say(f"   wrote a new SVID (serial {new.serial:x}); payments' sidecar reloaded it "
         f"(serial {reloaded['serial']}) with no restart")
    _say(f"   calls during the rotation: {sum(results)} of {len(results)} answered")
    return reloaded["serial"] == f"{new.serial:x}" and all(results)


def _metrics_summary() -> None:
    _say("\n7. What the metrics say (as /metrics would show them)")
    wanted = ("sidecar_handshakes_total", "sidecar_handshake_errors_total",
              "sidecar_authz_decisions_total", "sidecar_reloads_total")
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name in wanted and sample.value:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                _say(f"   {sample.name}{{{labels}}} {sample.value:g}")


def main() -> int:
    logs.setup("warning", "text")
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as d:
        try:
            return asyncio.run(_demo(Path(d)))
        except (TimeoutError, RuntimeError, OSError) as exc:
            print(f"sidecar demo: failed: {exc}")
            return 1
