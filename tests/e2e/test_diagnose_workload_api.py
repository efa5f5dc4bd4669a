"""`sidecar diagnose` dials a real inbound sidecar (a `sidecar run` process) with the
identity the dev Workload API agent hands out: `--workload-api`, `--spiffe-id` to choose
among its SVIDs, and `-c` with a config naming the agent or files (issue 18 point 7).

The agent runs in this process on a unix socket, from the same CA the sidecar trusts; the
sidecar's policy lets FRONTEND in and not BATCH, so which SVID diagnose presented shows in
the outcome and in the sidecar's access log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.tools import diagnose
from sidecar.tools.pki.agent import Agent, Entry
from sidecar.workload_endpoint import ENDPOINT_ENV

from .conftest import (
    BATCH,
    FRONTEND,
    PAYMENTS,
    Pki,
    Sidecar,
    SidecarFactory,
    echo_app,  # noqa: F401  (fixture)
    short_dir,  # noqa: F401  (fixture)
    write_svid_dir,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(sidecar: SidecarFactory, echo_app) -> Sidecar:  # type: ignore[no-untyped-def]  # noqa: F811
    return sidecar("b", inbound=[{"name": "in", "forward_to": echo_app().address}])


@pytest.fixture
def agent(ca: Pki, short_dir: Path) -> Iterator[Agent]:  # noqa: F811
    """BATCH first (what diagnose takes by default), FRONTEND second, each with a hint."""
    with Agent(ca.intermediate, short_dir / "agent.sock",
               [Entry(BATCH, "batch"), Entry(FRONTEND, "frontend")]) as a:
        yield a


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)


def diagnose_json(capsys: pytest.CaptureFixture[str], server: Sidecar,
                  *args: str) -> tuple[int, dict[str, Any]]:
    code = diagnose.main([f"127.0.0.1:{server.port('in')}", "--expect-id", PAYMENTS,
                          "--json", *args])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out)


def write_config(path: Path, identity: str) -> Path:
    path.write_text(f"identity:\n{identity}" + f"""\
outbound:
  - name: payments
    listen: 127.0.0.1:0
    connect_to: 127.0.0.1:8443
    expect_ids: [{PAYMENTS}]
""")
    return path


def test_diagnose_presents_the_agents_svid(server: Sidecar, agent: Agent,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out = diagnose_json(capsys, server, "--workload-api", f"unix://{agent.socket}",
                              "--spiffe-id", FRONTEND)
    assert code == 0 and out["ok"], out
    assert out["our_spiffe_id"] == FRONTEND
    assert str(agent.socket) in out["identity_source"]
    assert out["server_verified"] and out["peer_spiffe_id"] == PAYMENTS
    ours = next(s for s in out["steps"] if s["step"] == "our identity")
    assert f"serial {agent.current[1].cert.serial_number:#x}" in ours["detail"]
    assert "verified against the bundles from the Workload API" in json.dumps(out["steps"])
    line = server.connection(peer_id=FRONTEND)
    assert line["decision"] == "allow" and line["reason"] is None, line


def test_diagnose_text_names_our_spiffe_id(server: Sidecar, agent: Agent,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = diagnose.main([f"127.0.0.1:{server.port('in')}", "--workload-api",
                          f"unix://{agent.socket}", "--spiffe-id", FRONTEND])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"ok  our identity: {FRONTEND} from the Workload API at unix://{agent.socket}" \
        in text
    assert text.rstrip().splitlines()[-1] == f"OK: mutual TLS works with {PAYMENTS} (TLSv1.3)."


def test_without_spiffe_id_the_first_svid_is_presented(
        server: Sidecar, agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's first SVID is BATCH, which the sidecar authenticates and its policy
    denies: the choice of SVID shows on both sides."""
    code, out = diagnose_json(capsys, server, "--workload-api", f"unix://{agent.socket}")
    assert code == 1 and out["reason"] == "peer_closed", out
    assert out["our_spiffe_id"] == BATCH
    line = server.connection(peer_id=BATCH)
    assert line["decision"] == "deny", line


def test_a_config_naming_the_agent_is_followed(
        server: Sidecar, agent: Agent, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "sidecar.yaml",
                          f"  workload_api: unix://{agent.socket}\n  spiffe_id: {FRONTEND}\n")
    code, out = diagnose_json(capsys, server, "-c", str(config))
    assert code == 0 and out["ok"], out
    assert out["our_spiffe_id"] == FRONTEND
    assert f"identity.workload_api of {config}" in out["identity_source"]
    assert server.connection(peer_id=FRONTEND)["decision"] == "allow"


def test_a_config_naming_files_is_followed(
        server: Sidecar, ca: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_svid_dir(tmp_path / "svid", ca.svid(FRONTEND), ca.bundle)
    config = write_config(tmp_path / "sidecar.yaml",
                          "".join(f"  {k}: {v}\n" for k, v in files.items()))
    code, out = diagnose_json(capsys, server, "-c", str(config))
    assert code == 0 and out["ok"] and out["server_verified"], out
    assert out["our_spiffe_id"] == FRONTEND
    assert out["identity_source"].startswith(f"the files of {config}")
