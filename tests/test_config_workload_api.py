"""`identity.workload_api`, `identity.spiffe_id` and SPIFFE_ENDPOINT_SOCKET in the config:
exactly one identity source, addresses as the SPIFFE Workload Endpoint spec writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Config, IdentitySource, parse_config
from sidecar.problems import Problem, ProblemsError
from sidecar.spiffe import SpiffeId
from sidecar.workload_endpoint import (
    ENDPOINT_ENV,
    MAX_SOCKET_PATH,
    AddressError,
    WorkloadAddress,
    parse_workload_address,
)

OUTBOUND_ONLY = """\
outbound:
  - name: payments
    listen: 127.0.0.1:9001
    connect_to: 127.0.0.1:8443
    expect_ids: [spiffe://example.org/payments]
"""


def parse(text: str, tmp_path: Path, *, check_files: bool = True) -> Config:
    return parse_config(text, tmp_path / "sidecar.yaml", check_files=check_files)


def problems(text: str, tmp_path: Path, *, check_files: bool = False) -> list[Problem]:
    with pytest.raises(ProblemsError) as caught:
        parse(text, tmp_path, check_files=check_files)
    return list(caught.value.problems)


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)


def test_workload_api_replaces_the_files_and_none_is_looked_for(tmp_path: Path) -> None:
    config = parse("identity:\n  workload_api: unix:///run/spire/agent.sock\n"
                   + OUTBOUND_ONLY, tmp_path)  # check_files: no svid.pem anywhere
    assert config.identity.source is IdentitySource.WORKLOAD_API
    assert config.identity.workload_api == WorkloadAddress(unix=Path("/run/spire/agent.sock"))
    assert not config.identity.workload_api_from_env
    assert config.identity.spiffe_id is None


def test_files_stay_the_default_source(tmp_path: Path) -> None:
    config = parse(OUTBOUND_ONLY, tmp_path, check_files=False)
    assert config.identity.source is IdentitySource.FILES


def test_relative_socket_is_taken_against_the_config_directory(tmp_path: Path) -> None:
    config = parse("identity: {workload_api: 'unix:agent.sock'}\n" + OUTBOUND_ONLY, tmp_path)
    assert config.identity.workload_api == WorkloadAddress(unix=tmp_path / "agent.sock")


def test_spiffe_id_chooses_among_the_svids(tmp_path: Path) -> None:
    config = parse("identity:\n  workload_api: unix:///a.sock\n"
                   "  spiffe_id: spiffe://example.org/ns/default/sa/payments\n"
                   + OUTBOUND_ONLY, tmp_path)
    assert config.identity.spiffe_id == SpiffeId.parse(
        "spiffe://example.org/ns/default/sa/payments")


def test_files_and_workload_api_together_are_refused(tmp_path: Path) -> None:
    found = problems("identity:\n  workload_api: unix:///a.sock\n  cert: svid.pem\n"
                     "  crl: [crl.pem]\n" + OUTBOUND_ONLY, tmp_path)
    assert [p.where for p in found] == ["identity"]
    assert "not both: remove cert, crl, or workload_api" in found[0].message


def test_reload_settings_of_files_are_refused_with_the_workload_api(tmp_path: Path) -> None:
    found = problems("identity:\n  workload_api: unix:///a.sock\n  watch: false\n"
                     + OUTBOUND_ONLY, tmp_path)
    assert [p.where for p in found] == ["identity"]
    assert "remove watch" in found[0].message


def test_spiffe_id_without_workload_api_is_refused(tmp_path: Path) -> None:
    found = problems("identity:\n  spiffe_id: spiffe://example.org/a\n" + OUTBOUND_ONLY,
                     tmp_path)
    assert "identity.spiffe_id" in [p.where for p in found]
    assert "needs identity.workload_api" in str(found)


def test_invalid_spiffe_id_is_refused(tmp_path: Path) -> None:
    found = problems("identity:\n  workload_api: unix:///a.sock\n"
                     "  spiffe_id: spiffe://Example.org/a/../b\n" + OUTBOUND_ONLY, tmp_path)
    assert [p.where for p in found] == ["identity.spiffe_id"]


def test_more_than_one_worker_with_the_workload_api_is_not_supported_yet(
        tmp_path: Path) -> None:
    found = problems("identity: {workload_api: 'unix:///a.sock'}\nworkers: 2\n"
                     + OUTBOUND_ONLY, tmp_path)
    assert [p.where for p in found] == ["workers"]
    assert "not supported yet" in found[0].message


def test_endpoint_env_is_the_source_when_no_files_are_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "unix:///run/spire/sockets/agent.sock")
    config = parse(OUTBOUND_ONLY, tmp_path)
    assert config.identity.workload_api == WorkloadAddress(
        unix=Path("/run/spire/sockets/agent.sock"))
    assert config.identity.workload_api_from_env


def test_endpoint_env_yields_to_files_the_config_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "unix:///run/spire/sockets/agent.sock")
    config = parse("identity: {cert: a.pem, key: b.pem, bundle: c.pem}\n" + OUTBOUND_ONLY,
                   tmp_path, check_files=False)
    assert config.identity.source is IdentitySource.FILES


def test_bad_endpoint_env_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENDPOINT_ENV, "/run/agent.sock")
    found = problems(OUTBOUND_ONLY, tmp_path)
    assert [p.where for p in found] == [ENDPOINT_ENV]
    assert "unix:///path/to/agent.sock" in found[0].message


@pytest.mark.parametrize(("text", "address"), [
    ("unix:///run/a.sock", WorkloadAddress(unix=Path("/run/a.sock"))),
    ("unix:/run/a.sock", WorkloadAddress(unix=Path("/run/a.sock"))),
    ("tcp://127.0.0.1:8081", WorkloadAddress(host="127.0.0.1", port=8081)),
    ("tcp://[::1]:8081", WorkloadAddress(host="::1", port=8081)),
])
def test_addresses_the_spec_allows(text: str, address: WorkloadAddress) -> None:
    assert parse_workload_address(text, Path("/")) == address


def test_grpc_targets() -> None:
    assert WorkloadAddress(unix=Path("/a.sock")).grpc_target == "unix:/a.sock"
    assert WorkloadAddress(host="::1", port=1).grpc_target == "[::1]:1"
    assert str(WorkloadAddress(host="::1", port=1)) == "tcp://[::1]:1"


@pytest.mark.parametrize(("text", "words"), [
    ("/run/a.sock", "write unix:///path/to/agent.sock"),
    ("http://127.0.0.1:1", "not a Workload API address"),
    ("unix://host/run/a.sock", "no authority"),
    ("unix:///run/a.sock?x=1", "no query"),
    ("unix:", "needs the socket's path"),
    ("tcp://localhost:8081", "forbids DNS names"),
    ("tcp://127.0.0.1", "needs a port"),
    ("tcp://127.0.0.1:99999", "needs a port"),
    ("tcp://127.0.0.1:1/path", "nothing else"),
    ("unix:///" + "a" * MAX_SOCKET_PATH, "at most 107"),
])
def test_addresses_the_spec_forbids_say_why(text: str, words: str) -> None:
    with pytest.raises(AddressError, match=None) as caught:
        parse_workload_address(text, Path("/"))
    assert words in str(caught.value)
