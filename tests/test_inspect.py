"""`sidecar inspect`: real certificate files from sidecar.tools.pki, through `inspect.main`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.reasons import Reason
from sidecar.svid import SvidRule
from sidecar.tools import pki
from sidecar.tools.inspect import command as inspect
from sidecar.tools.pki import CA, KeyFormat, KeyType, Svid

TD = "example.org"
WEB = f"spiffe://{TD}/ns/default/sa/web"


@pytest.fixture
def root() -> CA:
    return pki.new_root(TD)


@pytest.fixture
def inter(root: CA) -> CA:
    return pki.new_intermediate(root)


@pytest.fixture
def bundle(tmp_path: Path, root: CA) -> Path:
    return write(tmp_path / "bundle.pem", pki.certs_pem([root.cert]))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def svid_file(tmp_path: Path, svid: Svid, name: str = "svid.pem") -> Path:
    return write(tmp_path / name, svid.chain_pem())


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = inspect.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def flat(text: str) -> str:
    """Text output with its line wrapping undone, to look for whole sentences."""
    return " ".join(text.split())


def run_json(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[Any]]:
    code, out, _ = run(capsys, *args, "--json")
    reports = json.loads(out)
    assert isinstance(reports, list)
    return code, reports


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- a good SVID -----------------------------------------------------------------------


def test_good_svid_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: CA, inter: CA, bundle: Path
) -> None:
    svid = pki.issue_svid(inter, WEB, dns=["web.default.svc"])
    path = svid_file(tmp_path, svid)
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert code == 0
    assert report["file"] == str(path)
    assert report["kind"] == "svid"
    assert report["spiffe_id"] == WEB
    assert report["not_after"] == iso(svid.not_after)
    assert report["problems"] == []
    assert 3500 < report["seconds_left"] <= 3600
    assert report["sans"] == {"uri": [WEB], "dns": ["web.default.svc"], "ip": [], "email": []}
    assert report["key"] == {"type": "EC", "bits": 256, "description": "EC P-256"}
    assert report["key_usage"] == ["digitalSignature"]
    assert report["extended_key_usage"] == ["serverAuth", "clientAuth"]
    assert report["basic_constraints"] == {"ca": False, "path_length": None}
    assert [(c["role"], c["serial"]) for c in report["chain"]] == [
        ("leaf", f"{svid.serial:#x}"), ("intermediate", f"{inter.cert.serial_number:#x}")]
    assert report["chain"][1]["not_after"] == iso(inter.not_after)
    assert report["bundle"] == {"file": str(bundle), "verified": True,
                                "anchor": root.cert.subject.rfc4514_string()}


def test_good_svid_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    path = svid_file(tmp_path, pki.issue_svid(inter, WEB, ttl=timedelta(minutes=41, seconds=20)))
    code, out, err = run(capsys, path, "--bundle", bundle)
    assert code == 0, out
    assert out.splitlines()[0] == f"{path}: OK"
    assert WEB in out
    assert "expires in 41 min" in out
    assert "EC P-256" in out
    assert "verifies" in out
    assert "problem" not in out
    assert err == ""


def test_ca_files_are_read_as_cas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: CA, inter: CA, bundle: Path
) -> None:
    intermediate = write(tmp_path / "intermediate.pem", pki.certs_pem([inter.cert]))
    code, reports = run_json(capsys, bundle, intermediate, "--bundle", bundle)
    assert code == 0
    assert [(r["kind"], r["problems"], r["bundle"]["verified"]) for r in reports] == [
        ("ca", [], True), ("ca", [], True)]
    assert reports[0]["spiffe_id"] == f"spiffe://{TD}"


# --- validity and the clock-skew hint --------------------------------------------------


def test_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    now = datetime.now(UTC)
    svid = pki.issue_svid(inter, WEB, not_before=now - timedelta(hours=5),
                          not_after=now - timedelta(hours=3))
    path = svid_file(tmp_path, svid)
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert code == 1
    assert report["problems"] == ["cert_expired"]
    assert report["seconds_left"] < -3 * 3600 + 60
    assert report["bundle"]["verified"] is True  # the chain is fine; only time is wrong
    code, out, _ = run(capsys, path)
    assert code == 1
    assert "expired 3 h ago (" in flat(out)
    assert "clocks may differ" not in out  # 3 h is not clock skew
    assert Reason.CERT_EXPIRED.explanation in flat(out)
    assert Reason.CERT_EXPIRED.fix in flat(out)


def test_just_expired_hints_at_the_clocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    now = datetime.now(UTC)
    svid = pki.issue_svid(inter, WEB, not_before=now - timedelta(hours=1),
                          not_after=now - timedelta(minutes=2))
    code, out, _ = run(capsys, svid_file(tmp_path, svid))
    assert code == 1
    assert "expired 2 min ago: check the clocks" in flat(out)


def test_not_yet_valid_by_two_minutes_says_check_the_clocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    svid = pki.issue_svid(inter, WEB, not_before=datetime.now(UTC) + timedelta(minutes=2))
    path = svid_file(tmp_path, svid)
    code, out, _ = run(capsys, path, "--bundle", bundle)
    assert code == 1
    assert "not yet valid for 2 min: check the clocks" in flat(out)
    assert "clock is probably about 2 min behind the issuer's" in flat(out)
    assert Reason.CERT_NOT_YET_VALID.fix in flat(out)
    code, [report] = run_json(capsys, path)
    assert (code, report["problems"], report["clock_skew_suspected"]) == (
        1, ["cert_not_yet_valid"], True)
    # Outside the hint it is still a problem, but no longer blamed on the clocks.
    code, out, _ = run(capsys, path, "--clock-skew-hint", "1m")
    assert code == 1
    assert "not yet valid for 2 min" in flat(out)
    assert "not yet valid for 2 min: check" not in flat(out)
    assert "behind the issuer's" not in flat(out)


def test_expired_intermediate_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: CA, bundle: Path
) -> None:
    now = datetime.now(UTC)
    old = pki.new_intermediate(root, now=now - timedelta(days=10), ttl=timedelta(days=1))
    svid = pki.issue_svid(old, WEB, not_after=now + timedelta(hours=1))
    code, [report] = run_json(capsys, svid_file(tmp_path, svid), "--bundle", bundle)
    assert code == 1
    assert report["problems"] == ["cert_expired"]
    assert "certificate 2" in report["details"][0]["message"]


def test_expired_bundle_ca_is_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    old_root = pki.new_root(TD, now=now - timedelta(days=10), ttl=timedelta(days=1))
    svid = pki.issue_svid(old_root, WEB, not_after=now + timedelta(hours=1))
    bundle = write(tmp_path / "bundle.pem", pki.certs_pem([old_root.cert]))
    code, [report] = run_json(capsys, svid_file(tmp_path, svid), "--bundle", bundle)
    assert (code, report["problems"], report["bundle"]["verified"]) == (
        1, ["cert_expired"], True)
    assert report["details"][0]["message"].startswith("the bundle CA ")


# --- X.509-SVID rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "rule", "spiffe_id"),
    [
        ({"uris": ()}, SvidRule.URI_SAN_COUNT, None),
        ({"extra_uris": [f"spiffe://{TD}/other"]}, SvidRule.URI_SAN_COUNT, None),
        ({"is_ca": True}, SvidRule.LEAF_IS_CA, WEB),
    ],
    ids=["no-uri-san", "two-uri-sans", "ca-leaf"],
)
def test_svid_rules(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    inter: CA,
    bundle: Path,
    overrides: dict[str, Any],
    rule: SvidRule,
    spiffe_id: str | None,
) -> None:
    path = svid_file(tmp_path, pki.issue_svid(inter, WEB, **overrides))
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert code == 1
    assert report["kind"] == "svid"
    assert report["problems"] == ["invalid_svid", str(rule)]
    assert report["spiffe_id"] == spiffe_id
    assert report["bundle"]["verified"] is True
    code, out, _ = run(capsys, path)
    assert code == 1
    assert f"- {rule}: " in out
    assert Reason.INVALID_SVID.explanation in flat(out)


def test_several_rules_are_all_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    svid = pki.issue_svid(inter, WEB, include_key_usage=False, eku=["server"])
    code, [report] = run_json(capsys, svid_file(tmp_path, svid))
    assert code == 1
    assert report["problems"] == ["invalid_svid", "key_usage_missing",
                                  "eku_missing_server_or_client_auth"]


# --- chain against a bundle ------------------------------------------------------------


def test_unknown_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    other = pki.new_intermediate(pki.new_root(TD))  # same trust domain, another CA
    path = svid_file(tmp_path, pki.issue_svid(other, WEB))
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert code == 1
    assert report["problems"] == ["unknown_ca"]
    assert report["bundle"]["verified"] is False
    code, out, _ = run(capsys, path, "--bundle", bundle)
    assert "does NOT verify" in out
    assert Reason.UNKNOWN_CA.explanation in flat(out)
    assert Reason.UNKNOWN_CA.fix in flat(out)


def test_unknown_ca_for_another_trust_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bundle: Path
) -> None:
    other = pki.new_intermediate(pki.new_root("other.org"))
    svid = pki.issue_svid(other, "spiffe://other.org/x", include_intermediates=False)
    code, [report] = run_json(capsys, svid_file(tmp_path, svid), "--bundle", bundle)
    assert (code, report["problems"]) == (1, ["unknown_ca"])
    assert "trust domain other.org" in report["details"][0]["message"]


def test_missing_intermediate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    path = svid_file(tmp_path, pki.issue_svid(inter, WEB, include_intermediates=False))
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert code == 1
    assert report["problems"] == ["missing_intermediate"]
    assert report["bundle"]["verified"] is False
    code, out, _ = run(capsys, path, "--bundle", bundle)
    assert Reason.MISSING_INTERMEDIATE.explanation in flat(out)
    assert Reason.MISSING_INTERMEDIATE.fix in flat(out)


def test_missing_intermediate_names_the_file_that_has_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path
) -> None:
    leaf = svid_file(tmp_path, pki.issue_svid(inter, WEB, include_intermediates=False))
    intermediate = write(tmp_path / "intermediate.pem", pki.certs_pem([inter.cert]))
    code, reports = run_json(capsys, leaf, intermediate, "--bundle", bundle)
    assert code == 1
    assert [r["problems"] for r in reports] == [["missing_intermediate"], []]
    assert f"found in {intermediate}" in reports[0]["details"][0]["message"]


@pytest.mark.parametrize("with_bundle", [True, False])
def test_bad_signature(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    inter: CA,
    bundle: Path,
    with_bundle: bool,
) -> None:
    forged = pki.issue_svid(inter, WEB, issuer_key=ec.generate_private_key(ec.SECP256R1()))
    args = ["--bundle", str(bundle)] if with_bundle else []
    code, [report] = run_json(capsys, svid_file(tmp_path, forged), *args)
    assert code == 1
    assert report["problems"] == ["bad_signature"]
    code, out, _ = run(capsys, svid_file(tmp_path, forged), *args)
    assert Reason.BAD_SIGNATURE.explanation in flat(out)


def test_intermediate_signed_by_an_impostor_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: CA, bundle: Path
) -> None:
    # The intermediate names our root as its issuer but another key signed it.
    impostor = CA(cert=root.cert, key=ec.generate_private_key(ec.SECP256R1()))
    inter = pki.new_intermediate(impostor)
    code, [report] = run_json(capsys, svid_file(tmp_path, pki.issue_svid(inter, WEB)),
                              "--bundle", bundle)
    assert (code, report["problems"]) == (1, ["bad_signature"])
    assert "the bundle" in report["details"][0]["message"]


def test_out_of_order_chain_still_verifies_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: CA, bundle: Path
) -> None:
    upper = pki.new_intermediate(root, path_length=1)
    lower = pki.new_intermediate(upper)
    svid = pki.issue_svid(lower, WEB, include_intermediates=False)
    path = write(tmp_path / "svid.pem", pki.certs_pem([svid.cert, upper.cert, lower.cert]))
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert (code, report["problems"], report["bundle"]["verified"]) == (0, [], True)
    assert any("out of order" in n for n in report["notes"])


def test_hostile_chain_walk_is_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bundle: Path
) -> None:
    # x509-limbo's pathological-chain-same-subject-same-key, in small: 60 CAs sharing one
    # subject and one key, each of which verifies every other one.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loop")])
    loop = [
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(
            key.public_key()).serial_number(pki.new_serial()).not_valid_before(
            datetime.now(UTC) - timedelta(minutes=5)).not_valid_after(
            datetime.now(UTC) + timedelta(days=1)).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            pki.make_key_usage(key_cert_sign=True, digital_signature=True), critical=True
        ).sign(key, hashes.SHA256())
        for _ in range(60)
    ]
    ca = CA(cert=loop[0], key=key)
    svid = pki.issue_svid(ca, WEB, include_intermediates=False)
    path = write(tmp_path / "svid.pem", pki.certs_pem([svid.cert, *loop]))
    start = time.monotonic()
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert time.monotonic() - start < 10
    assert (code, report["problems"]) == (1, ["unknown_ca"])
    assert f"only the first {inspect.MAX_CHAIN} certificates were walked" in report["notes"]


# --- files that are not what they should be -------------------------------------------


def test_truncated_pem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    pem = pki.issue_svid(inter, WEB).chain_pem()
    cut_in_second = write(tmp_path / "cut2.pem", pem[: len(pem) - 200])
    code, [report] = run_json(capsys, cut_in_second)
    assert code == 1
    assert report["problems"] == ["malformed_pem"]
    assert report["spiffe_id"] == WEB  # the complete leaf is still explained
    assert "truncated" in report["details"][0]["message"]
    cut_in_first = write(tmp_path / "cut1.pem", pem[:300])
    code, [report] = run_json(capsys, cut_in_first)
    assert (code, report["problems"], report["spiffe_id"]) == (
        1, ["malformed_pem", "no_certificate"], None)


def test_damaged_base64_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    pem = pki.issue_svid(inter, WEB, include_intermediates=False).chain_pem()
    lines = pem.splitlines(keepends=True)
    lines[3] = lines[3][:10] + b"!!" + lines[3][12:]
    code, [report] = run_json(capsys, write(tmp_path / "bad.pem", b"".join(lines)))
    assert (code, report["problems"]) == (1, ["malformed_pem", "no_certificate"])


def test_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "empty.pem", b"")
    code, [report] = run_json(capsys, path)
    assert (code, report["problems"], report["spiffe_id"], report["not_after"]) == (
        1, ["no_certificate"], None, None)
    code, out, _ = run(capsys, path)
    assert "empty" in out


def test_missing_file_is_a_problem_not_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    good = svid_file(tmp_path, pki.issue_svid(inter, WEB))
    missing = tmp_path / "nope.pem"
    code, out, _ = run(capsys, missing, good)
    assert code == 1
    assert f"{missing}: PROBLEM: file_not_found" in out
    assert "file not found" in out
    assert f"{good}: OK" in out  # the other file is still explained
    code, reports = run_json(capsys, missing, good)
    assert [r["problems"] for r in reports] == [["file_not_found"], []]


def test_missing_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA
) -> None:
    good = svid_file(tmp_path, pki.issue_svid(inter, WEB))
    code, out, err = run(capsys, good, "--bundle", tmp_path / "nope.pem")
    assert code == 1
    assert out == ""  # no verdict on the files without the bundle they were to be checked by
    assert "--bundle" in err
    assert "not found" in err


@pytest.mark.parametrize("fmt", list(KeyFormat))
def test_private_keys_are_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], inter: CA, bundle: Path, fmt: KeyFormat
) -> None:
    svid = pki.issue_svid(inter, WEB)
    key_pem = svid.key_pem(fmt)
    body = [line.decode() for line in key_pem.splitlines() if not line.startswith(b"-----")]
    assert body
    both = write(tmp_path / "both.pem", svid.chain_pem() + key_pem)
    key_only = write(tmp_path / "key.pem", key_pem)
    half_key = write(tmp_path / "half.pem", svid.chain_pem() + key_pem[: len(key_pem) // 2])
    for args in ([], ["--json"]):
        code, out, err = run(capsys, both, key_only, half_key, "--bundle", bundle, *args)
        assert code == 1  # key.pem holds no certificate; half.pem is truncated
        for line in body:
            assert line not in out
            assert line not in err
    code, reports = run_json(capsys, both, key_only)
    assert [r["problems"] for r in reports] == [[], ["no_certificate"]]
    assert reports[0]["spiffe_id"] == WEB
    assert "key file" in reports[1]["details"][0]["message"]


# --- key descriptions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (KeyType.RSA_2048, {"type": "RSA", "bits": 2048, "description": "RSA 2048"}),
        (KeyType.ED25519, {"type": "Ed25519", "bits": 256, "description": "Ed25519"}),
        (KeyType.EC_P384, {"type": "EC", "bits": 384, "description": "EC P-384"}),
    ],
)
def test_key_descriptions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: KeyType, expected: dict[str, Any]
) -> None:
    root = pki.new_root(TD, key_type=kind)  # the chain's signatures use that algorithm too
    inter = pki.new_intermediate(root, key_type=kind)
    path = svid_file(tmp_path, pki.issue_svid(inter, WEB, key_type=kind))
    bundle = write(tmp_path / "bundle.pem", pki.certs_pem([root.cert]))
    code, [report] = run_json(capsys, path, "--bundle", bundle)
    assert (code, report["problems"], report["bundle"]["verified"]) == (0, [], True)
    assert report["key"] == expected
    assert [c["key"] for c in report["chain"]] == [expected["description"]] * 2
    code, out, _ = run(capsys, path)
    assert f"key          {expected['description']}\n" in out


# --- usage -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["x.pem", "--clock-skew-hint", "5"], ["--frobnicate"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    assert inspect.main(args) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(30, "30 s"), (41 * 60 + 10, "41 min"), (3 * 3600 + 100, "3 h"), (12 * 86400, "12 days")],
)
def test_span(seconds: float, words: str) -> None:
    assert inspect.span(seconds) == words
    assert inspect.span(-seconds) == words
