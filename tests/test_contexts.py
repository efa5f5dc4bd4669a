"""tls/contexts.py: the outbound, `sidecar diagnose` and `sidecar bench` offer the same
handshake, because all three build their client context in `contexts.client`."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from sidecar.identity import load_identity
from sidecar.tls import contexts
from sidecar.tools import diagnose, pki
from sidecar.tools.bench import arguments


def offer(ctx: ssl.SSLContext) -> tuple[object, ...]:
    """What a client context offers in its ClientHello, as far as Python can read it."""
    return ([c["name"] for c in ctx.get_ciphers()], ctx.minimum_version, ctx.maximum_version,
            ctx.options, ctx.check_hostname)


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ssl.SSLContext]:
    """The outbound's client context for each tls.min_version, from a real identity."""
    d = tmp_path_factory.mktemp("svid")
    root = pki.new_root("example.org")
    svid = pki.issue_svid(pki.new_intermediate(root), "spiffe://example.org/ns/a/sa/b")
    pki.write_svid(d, svid, [root.cert])
    identity = load_identity(d / "svid.pem", d / "svid_key.pem", d / "bundle.pem")
    return {v: contexts.build(identity, min_version=v).client for v in ("1.2", "1.3")}


@pytest.mark.parametrize("tls_min", ["1.2", "1.3"])
def test_outbound_diagnose_and_bench_offer_the_same(
    outbound: dict[str, ssl.SSLContext], tls_min: str
) -> None:
    diag = diagnose.client_context(diagnose.parser().parse_args(
        ["127.0.0.1:1", "--tls-min", tls_min]))
    bench = arguments.client_context(arguments.build_parser().parse_args(
        ["--target", "127.0.0.1:1", "--tls-min", tls_min]))
    assert offer(diag) == offer(outbound[tls_min]) == offer(bench)


def test_playing_an_old_peer_offers_the_sidecars_tls12_suites_only(
    outbound: dict[str, ssl.SSLContext],
) -> None:
    """diagnose --tls-max 1.2 once offered OpenSSL's default TLS 1.2 suites (CBC, RSA key
    exchange), so it could connect where the sidecar cannot."""
    diag = diagnose.client_context(diagnose.parser().parse_args(
        ["127.0.0.1:1", "--tls-max", "1.2"]))
    bench = arguments.client_context(arguments.build_parser().parse_args(
        ["--target", "127.0.0.1:1", "--tls-min", "1.2", "--tls-max", "1.2"]))
    assert diag.maximum_version == bench.maximum_version == ssl.TLSVersion.TLSv1_2
    tls12 = [c["name"] for c in outbound["1.2"].get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert [c["name"] for c in diag.get_ciphers() if c["protocol"] == "TLSv1.2"] == tls12
    assert offer(diag) == offer(bench)
    assert all("GCM" in name or "CHACHA20" in name for name in tls12)


def test_the_files_are_loaded_after_the_offer(tmp_path: Path) -> None:
    """A tool's own certificate and trust change nothing of what it offers."""
    root = pki.new_root("example.org")
    svid = pki.issue_svid(pki.new_intermediate(root), "spiffe://example.org/ns/a/sa/b")
    pki.write_svid(tmp_path, svid, [root.cert])
    files = ["--cert", str(tmp_path / "svid.pem"), "--key", str(tmp_path / "svid_key.pem"),
             "--bundle", str(tmp_path / "bundle.pem")]
    diag = diagnose.client_context(diagnose.parser().parse_args(["127.0.0.1:1", *files]))
    assert offer(diag) == offer(contexts.client())
    assert diag.verify_mode == ssl.CERT_REQUIRED
