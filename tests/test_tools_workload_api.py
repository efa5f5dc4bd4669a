"""`sidecar inspect` and `sidecar diagnose` with their identity from the SPIFFE Workload API
(`--workload-api`, `--spiffe-id`) or from a sidecar config (`-c`), against the real dev
agent on a unix socket in tmp_path (issue 18 point 7). Each agent is stopped by its test.
diagnose against a real inbound sidecar is in tests/e2e/test_diagnose_workload_api.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import (  # noqa: F401  (fixtures, found by pytest)
    ID_DB,
    ID_WEB,
    TD,
    ca_fixture,
    other_root_fixture,
    root_fixture,
    sock_fixture,
    two_agent,
    web_agent,
)
from cryptography import x509

from sidecar.tools import diagnose
from sidecar.tools.inspect import command as inspect
from sidecar.tools.pki import (
    CA,
    certs_pem,
    issue_svid,
    write_svid,
)
from sidecar.tools.pki.agent import Agent
from sidecar.workload_endpoint import ENDPOINT_ENV

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def agent(ca: CA, sock: Path) -> Iterator[Agent]:
    with web_agent(ca, sock) as a:
        yield a


@pytest.fixture
def two(ca: CA, sock: Path) -> Iterator[Agent]:
    with two_agent(ca, sock) as a:
        yield a


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)


def run_inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr), each with its whitespace runs (wrapping) made one space."""
    code = inspect.main(list(args))
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = inspect.main([*args, "--json"])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out)


def address(sock: Path) -> str:
    return f"unix://{sock}"


def write_config(path: Path, identity: str) -> Path:
    path.write_text(f"identity:\n{identity}" + """\
outbound:
  - name: payments
    listen: 127.0.0.1:9001
    connect_to: 127.0.0.1:8443
    expect_ids: [spiffe://example.org/ns/default/sa/payments]
""")
    return path


# --- inspect --workload-api ---------------------------------------------------------------


def test_inspect_shows_the_svid_and_a_federated_bundle_apart(
        agent: Agent, sock: Path, other_root: x509.Certificate, root: CA,
        capsys: pytest.CaptureFixture[str]) -> None:
    agent.federate("other.org", [other_root])
    code, out = inspect_json(capsys, "--workload-api", address(sock))
    assert code == 0 and out["problems"] == [], out
    assert out["workload_api"] == address(sock)
    [svid] = out["svids"]
    leaf = agent.current[0].cert
    assert svid["spiffe_id"] == ID_WEB and svid["chosen"] and svid["run_takes_it"]
    report = svid["report"]
    assert report["chain"][0]["serial"] == f"{leaf.serial_number:#x}"
    assert report["not_after"].startswith(leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M"))
    assert [e["role"] for e in report["chain"]] == ["leaf", "intermediate"]
    assert report["bundle"]["verified"] is True
    # Each bundle under its own trust domain, never merged: ours holds only our root.
    bundles = {b["trust_domain"]: b for b in out["bundles"]}
    assert set(bundles) == {TD, "other.org"}
    assert not bundles[TD]["federated"] and bundles["other.org"]["federated"]
    assert [c["subject"] for c in bundles[TD]["report"]["chain"]] == \
        [root.cert.subject.rfc4514_string()]
    assert [c["subject"] for c in bundles["other.org"]["report"]["chain"]] == \
        [other_root.subject.rfc4514_string()]


def test_inspect_text_names_each_part(agent: Agent, sock: Path,
                                      other_root: x509.Certificate,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    agent.federate("other.org", [other_root])
    agent.revoke(4242)
    code, out, _ = run_inspect(capsys, "--workload-api", address(sock))
    assert code == 0, out
    assert out.startswith(f"Workload API {address(sock)}: OK")
    assert f"SVID 1 of 1: {ID_WEB} (the one `run` takes): OK" in out
    assert f"serial {agent.current[0].cert.serial_number:#x}" in out
    assert "the agent's bundle for example.org: verifies" in out
    assert "would take it" in out
    assert "bundle for example.org (ours): OK" in out
    assert "bundle for other.org (federated): OK" in out
    assert "CRLs: 1" in out and "1 revoked" in out


def test_inspect_shows_every_svid_with_its_hint(two: Agent, sock: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out = inspect_json(capsys, "--workload-api", address(sock))
    assert code == 0, out
    assert out["offered"] == [{"spiffe_id": ID_WEB, "hint": "web"},
                              {"spiffe_id": ID_DB, "hint": "db"}]
    assert [(s["spiffe_id"], s["hint"], s["chosen"]) for s in out["svids"]] == \
        [(ID_WEB, "web", True), (ID_DB, "db", False)]
    serials = [s["report"]["chain"][0]["serial"] for s in out["svids"]]
    assert serials == [f"{svid.cert.serial_number:#x}" for svid in two.current]
    code, text, _ = run_inspect(capsys, "--workload-api", address(sock))
    assert f"offers 2 SVID(s): {ID_WEB} (hint 'web'), {ID_DB} (hint 'db')" in text
    assert f"SVID 2 of 2: {ID_DB} (hint 'db'): OK" in text


def test_spiffe_id_picks_one_svid(two: Agent, sock: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out = inspect_json(capsys, "--workload-api", address(sock), "--spiffe-id", ID_DB)
    assert code == 0, out
    assert out["spiffe_id_wanted"] == ID_DB
    assert [(s["spiffe_id"], s["chosen"]) for s in out["svids"]] == [(ID_DB, True)]
    assert out["svids"][0]["report"]["chain"][0]["serial"] == \
        f"{two.current[1].cert.serial_number:#x}"
    code, text, _ = run_inspect(capsys, "--workload-api", address(sock), "--spiffe-id", ID_DB)
    assert f"{ID_DB} (hint 'db') (named by --spiffe-id)" in text


def test_a_spiffe_id_the_agent_lacks_names_what_it_offers(
        two: Agent, sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inspect(capsys, "--workload-api", address(sock), "--spiffe-id",
                                 f"spiffe://{TD}/nobody")
    assert code == 1 and out == ""
    assert f"no SVID for --spiffe-id spiffe://{TD}/nobody" in err
    assert f"{ID_WEB} (hint 'web'), {ID_DB} (hint 'db')" in err


def test_a_missing_socket_says_why_and_fails(sock: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_inspect(capsys, "--workload-api", address(sock))
    assert code == 1 and out == ""
    assert f"socket_missing: {sock} does not exist" in err
    assert "is the SPIRE agent running" in err


def test_an_agent_that_refuses_us_says_why_and_fails(
        agent: Agent, sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agent.refuse()
    code, _, err = run_inspect(capsys, "--workload-api", address(sock))
    assert code == 1
    assert "permission_denied: no identity issued" in err and "registration entry" in err


def test_a_federated_bundle_run_would_refuse_is_a_problem(
        agent: Agent, sock: Path, ca: CA, capsys: pytest.CaptureFixture[str]) -> None:
    """The same checks as for files: a bundle of a non-CA certificate, and `run` says no."""
    agent.federate("other.org", [issue_svid(ca, f"spiffe://{TD}/not-a-ca").cert])
    code, out = inspect_json(capsys, "--workload-api", address(sock))
    assert code == 1
    assert "run_refuses" in out["problems"]
    bundles = {b["trust_domain"]: b for b in out["bundles"]}
    assert bundles["other.org"]["report"]["problems"], bundles["other.org"]
    assert bundles[TD]["report"]["problems"] == []
    [svid] = out["svids"]
    assert not svid["run_takes_it"]
    assert any("federated bundle" in p and "not a CA" in p
               for p in svid["run_refuses_because"]), svid


# --- -c: the config's identity ------------------------------------------------------------


def test_inspect_takes_the_agent_a_config_names(two: Agent, sock: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "sidecar.yaml",
                          f"  workload_api: {address(sock)}\n  spiffe_id: {ID_DB}\n")
    code, out = inspect_json(capsys, "-c", str(config))
    assert code == 0, out
    assert [(s["spiffe_id"], s["chosen"]) for s in out["svids"]] == [(ID_DB, True)]
    code, text, _ = run_inspect(capsys, "-c", str(config))
    assert f"(named by identity.spiffe_id of {config})" in text


def test_inspect_takes_the_files_a_config_names(
        tmp_path: Path, ca: CA, root: CA, other_root: x509.Certificate,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Our SVID against our bundle; the federated bundle on its own, never against ours."""
    d = tmp_path / "svid"
    d.mkdir()
    files = write_svid(d, issue_svid(ca, ID_WEB), [root.cert])
    (d / "other.pem").write_bytes(certs_pem([other_root]))
    config = write_config(tmp_path / "sidecar.yaml", f"""\
  cert: {d / files.cert}
  key: {d / files.key}
  bundle: {d / files.bundle}
  federated_bundles:
    other.org: {d / "other.pem"}
""")
    code, out = inspect_json(capsys, "-c", str(config))
    assert code == 0, out
    by_file = {r["file"]: r for r in out}
    assert set(by_file) == {str(d / files.cert), str(d / files.bundle), str(d / "other.pem")}
    assert by_file[str(d / files.cert)]["spiffe_id"] == ID_WEB
    assert by_file[str(d / files.cert)]["bundle"]["verified"] is True
    assert by_file[str(d / "other.pem")]["bundle"] is None


def test_a_config_that_cannot_be_read_says_so(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_inspect(capsys, "-c", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert f"{tmp_path / 'nope.yaml'} is not a valid config" in err
    assert "cannot read the config file" in err


# --- one identity source --------------------------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["--workload-api", "unix:///run/a.sock", "svid.pem"], "--workload-api and FILE"),
    (["--workload-api", "unix:///run/a.sock", "--bundle", "b.pem"],
     "--workload-api and --bundle"),
    (["-c", "s.yaml", "--workload-api", "unix:///run/a.sock"], "--workload-api and -c"),
    (["-c", "s.yaml", "svid.pem"], "-c and FILE"),
    (["svid.pem", "--spiffe-id", ID_WEB], "--spiffe-id chooses among the SVIDs"),
    (["--workload-api", "agent.sock"], "is not a Workload API address"),
    (["--workload-api", "unix:///run/a.sock", "--spiffe-id", "web"], "spiffe://"),
    ([], "nothing to inspect"),
])
def test_inspect_usage_errors_exit_2(args: list[str], says: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_inspect(capsys, *args)
    assert code == 2
    assert says in err


@pytest.mark.parametrize(("args", "says"), [
    (["--workload-api", "unix:///run/a.sock", "--cert", "c.pem"],
     "--workload-api and --cert"),
    (["-c", "s.yaml", "--bundle", "b.pem"], "-c and --bundle"),
    (["-c", "s.yaml", "--spiffe-id", ID_WEB], "with -c, the config's identity.spiffe_id"),
])
def test_diagnose_usage_errors_exit_2(args: list[str], says: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        diagnose.main(["127.0.0.1:9", *args])
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


# --- diagnose without an agent ------------------------------------------------------------


def test_diagnose_says_why_there_is_no_identity_and_never_dials(
        sock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = diagnose.main(["127.0.0.1:9", "--workload-api", address(sock)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"socket_missing: {sock} does not exist" in err


def test_diagnose_names_the_svid_a_config_asks_for_and_lacks(
        agent: Agent, sock: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "sidecar.yaml",
                          f"  workload_api: {address(sock)}\n  spiffe_id: {ID_DB}\n")
    code = diagnose.main(["127.0.0.1:9", "-c", str(config)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"no SVID for identity.spiffe_id of {config} {ID_DB}" in err
    assert f"the agent offers {ID_WEB}" in err


# --- without the `spire` extra ------------------------------------------------------------


def _without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """What load_grpc raises where grpcio or py-spiffe is not installed."""
    from sidecar.sources import workload_api

    def missing() -> None:
        raise workload_api.MissingExtra("identity.workload_api needs the optional "
                                        "dependencies of the `spire` extra")

    monkeypatch.setattr(workload_api, "load_grpc", missing)


def test_inspect_without_the_extra_says_so_and_exits_2(
        agent: Agent, sock: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _without_the_extra(monkeypatch)
    code, out, err = run_inspect(capsys, "--workload-api", address(sock))
    assert code == 2 and out == ""
    assert "the `spire` extra" in err


def test_diagnose_without_the_extra_says_so_and_exits_2(
        agent: Agent, sock: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _without_the_extra(monkeypatch)
    code = diagnose.main(["127.0.0.1:9", "--workload-api", address(sock)])
    assert code == 2
    assert "the `spire` extra" in capsys.readouterr().err
