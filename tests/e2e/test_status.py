"""What /status says (issue 16, item 7): the same keys with workers as without, the last
reload of each kind with its outcome, and every time in RFC 3339 with `Z`."""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    FRONTEND,
    IO_TIMEOUT,
    EchoApp,
    Pki,
    Sidecar,
    SidecarFactory,
    TlsClient,
    wait_for,
)
from .test_live_changes import admin_get
from .test_workers import pair  # noqa: F401  (fixture: a sidecar with workers: 2)

pytestmark = pytest.mark.timeout(90)
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def status_of(sc: Sidecar) -> dict[str, Any]:
    code, body = admin_get(sc, "/status")
    assert code == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


def sighup(sc: Sidecar) -> None:
    assert sc._proc is not None
    sc._proc.send_signal(signal.SIGHUP)


def test_with_workers_status_has_policy_sessions_ktls_and_connections(
    pair: Sidecar, ca: Pki, tls_client: TlsClient,  # noqa: F811
) -> None:
    ctx = tls_client.context(ca.svid(FRONTEND))
    with socket.create_connection(("127.0.0.1", pair.port("in")), timeout=IO_TIMEOUT) as raw, \
            ctx.wrap_socket(raw) as held:
        held.sendall(b"hello")
        assert held.recv(5) == b"hello"
        wait_for(lambda: (status_of(pair).get("connections") or {}).get("active") == 1, 15,
                 "the held connection to show in /status")
    st = status_of(pair)
    assert st["policy"]["version"] and st["policy"]["mode"] == "enforce", st
    assert st["sessions"]["store"] == "tickets", st
    assert st["ktls"]["mode"] == "auto" and "available" in st["ktls"], st
    assert st["reloads"]["svid"]["result"] == "ok", st
    for worker in st["workers"]:
        assert {"policy", "sessions", "ktls", "connections", "reloads"} <= set(worker), worker


def test_a_failed_reload_with_workers_shows_in_status(
    pair: Sidecar, tmp_path: Path,  # noqa: F811
) -> None:
    (tmp_path / "policy.yaml").write_text("rules: [\n")
    sighup(pair)
    wait_for(lambda: (status_of(pair)["reloads"].get("policy") or {}).get("result") == "error",
             15, "the failed policy reload to show in /status")
    failed = status_of(pair)["reloads"]["policy"]
    assert "policy.yaml" in failed["error"] and RFC3339.fullmatch(failed["at"]), failed


def test_sighup_logs_each_outcome_and_status_keeps_the_last(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
) -> None:
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])
    sighup(b)
    for kind in ("svid", "policy"):
        line = b.wait_line(lambda ln, k=kind: ln.get("kind") == k  # type: ignore[misc]
                           and ln.get("trigger") == "SIGHUP")
        assert line["result"] == "ok" and line["msg"] == f"{kind} reload: ok, nothing changed"
    policy = b.config_path.parent / "policy.yaml"
    policy.write_text("rules: [\n")
    sighup(b)
    line = b.wait_line(lambda ln: ln.get("kind") == "policy" and ln.get("result") == "error")
    assert line["trigger"] == "SIGHUP"
    st = status_of(b)
    failed = st["reloads"]["policy"]
    assert failed["result"] == "error" and failed["trigger"] == "SIGHUP", failed
    assert str(policy) in failed["error"] and RFC3339.fullmatch(failed["at"]), failed
    assert st["reloads"]["svid"]["result"] == "ok"


def test_status_writes_times_in_rfc3339(sidecar: SidecarFactory,
                                        echo_app: Callable[..., EchoApp]) -> None:
    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])
    st = status_of(b)
    times = [st["svid"]["not_after"], st["svid"]["not_before"],
             *(ca["not_after"] for cas in st["bundles"].values() for ca in cas)]
    assert all(RFC3339.fullmatch(t) for t in times), times


def test_a_bundle_merged_after_start_is_warned_about(
    sidecar: SidecarFactory, echo_app: Callable[..., EchoApp],
) -> None:
    from sidecar.tools import pki

    b = sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])
    other = pki.new_root("other.org")
    bundle = next(b.config_path.parent.glob("svid/bundle.pem"))
    bundle.write_bytes(bundle.read_bytes() + pki.certs_pem([other.cert]))
    sighup(b)
    line = b.wait_line(lambda ln: "belongs to trust domain other.org" in ln.get("msg", ""))
    assert other.cert.subject.rfc4514_string() in line["msg"]
