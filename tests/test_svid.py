"""X.509-SVID rules, against the X.509-SVID spec's own rules."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from sidecar.spiffe import SpiffeId
from sidecar.svid import SvidError, SvidRule, ca_problems, spiffe_id_of, svid_problems

NOW = datetime.datetime.now(datetime.UTC)
BOTH_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
OMIT = object()  # leave this extension out


def key_usage(**changes: bool) -> x509.KeyUsage:
    """A leaf's keyUsage (digitalSignature only) with `changes` applied."""
    fields = {
        "digital_signature": True,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "key_cert_sign": False,
        "crl_sign": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    fields.update(changes)
    return x509.KeyUsage(**fields)


LEAF_USAGE = key_usage()


class TinyCa:
    """A root CA made with cryptography directly, issuing leaves with chosen extensions."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
        self.cert = self.issue(
            uris=["spiffe://example.org"],
            ca=True,
            usage=key_usage(digital_signature=False, key_cert_sign=True, crl_sign=True),
            eku=OMIT,
            subject=self.name,
            key=self.key,
        )

    def issue(
        self,
        *,
        uris: Sequence[str] | object = ("spiffe://example.org/ns/default/sa/app",),
        ca: bool | object = False,
        usage: x509.KeyUsage | object = LEAF_USAGE,
        usage_critical: bool = True,
        eku: Sequence[x509.ObjectIdentifier] | object = BOTH_AUTH,
        dns: Sequence[str] = (),
        extra: Sequence[x509.ExtensionType] = (),
        subject: x509.Name | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        own_key = key or ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject or x509.Name([]))
            .issuer_name(self.name)
            .public_key(own_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=1))
            .not_valid_after(NOW + datetime.timedelta(hours=1))
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        if uris is not OMIT:
            assert isinstance(uris, Sequence)
            names += [x509.UniformResourceIdentifier(u) for u in uris]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
        if ca is not OMIT:
            assert isinstance(ca, bool)
            builder = builder.add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
        if usage is not OMIT:
            assert isinstance(usage, x509.KeyUsage)
            builder = builder.add_extension(usage, critical=usage_critical)
        if eku is not OMIT:
            assert isinstance(eku, Sequence)
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(self.key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca() -> TinyCa:
    return TinyCa()


def rules_of(cert: x509.Certificate) -> list[SvidRule]:
    return [problem.rule for problem in svid_problems(cert)]


def test_valid_leaf(ca: TinyCa) -> None:
    cert = ca.issue(dns=["app.default.svc"])  # other SAN types are allowed
    assert svid_problems(cert) == []
    assert spiffe_id_of(cert) == SpiffeId.parse("spiffe://example.org/ns/default/sa/app")


def test_leaf_without_eku_or_basic_constraints_is_valid(ca: TinyCa) -> None:
    # EKU is optional (SHOULD), and an absent basicConstraints means cA=false.
    cert = ca.issue(eku=OMIT, ca=OMIT)
    assert svid_problems(cert) == []


def test_leaf_may_have_key_encipherment_and_agreement(ca: TinyCa) -> None:
    cert = ca.issue(usage=key_usage(key_encipherment=True, key_agreement=True))
    assert svid_problems(cert) == []


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"uris": OMIT}, SvidRule.URI_SAN_COUNT),
        ({"uris": []}, SvidRule.URI_SAN_COUNT),
        ({"uris": ["spiffe://example.org/a", "spiffe://example.org/b"]}, SvidRule.URI_SAN_COUNT),
        ({"uris": ["https://example.org/a"]}, SvidRule.URI_SAN_SCHEME),
        ({"uris": ["urn:uuid:1234"]}, SvidRule.URI_SAN_SCHEME),
        ({"uris": ["spiffe://Example.org/a"]}, SvidRule.INVALID_SPIFFE_ID),
        ({"uris": ["spiffe://example.org/a/"]}, SvidRule.INVALID_SPIFFE_ID),
        ({"uris": ["spiffe://example.org:80/a"]}, SvidRule.INVALID_SPIFFE_ID),
        ({"uris": ["spiffe://example.org"]}, SvidRule.SPIFFE_ID_WITHOUT_PATH),
        ({"ca": True}, SvidRule.LEAF_IS_CA),
        ({"usage": OMIT}, SvidRule.KEY_USAGE_MISSING),
        ({"usage_critical": False}, SvidRule.KEY_USAGE_NOT_CRITICAL),
        (
            {"usage": key_usage(digital_signature=False, key_agreement=True)},
            SvidRule.NO_DIGITAL_SIGNATURE,
        ),
        ({"usage": key_usage(key_cert_sign=True)}, SvidRule.KEY_CERT_SIGN_ON_LEAF),
        ({"usage": key_usage(crl_sign=True)}, SvidRule.CRL_SIGN_ON_LEAF),
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, SvidRule.EKU_MISSING_SERVER_OR_CLIENT_AUTH),
        ({"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]}, SvidRule.EKU_MISSING_SERVER_OR_CLIENT_AUTH),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, SvidRule.EKU_MISSING_SERVER_OR_CLIENT_AUTH),
    ],
)
def test_each_leaf_rule(ca: TinyCa, changes: dict[str, object], rule: SvidRule) -> None:
    cert = ca.issue(**changes)  # type: ignore[arg-type]
    expected = [rule]
    assert rules_of(cert) == expected
    with pytest.raises(SvidError) as caught:
        spiffe_id_of(cert)
    assert [p.rule for p in caught.value.problems] == expected
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == caught.value.problems[0].message


def test_messages_say_what_is_wrong_and_what_to_do(ca: TinyCa) -> None:
    cert = ca.issue(uris=["spiffe://example.org/a", "spiffe://example.org/b"])
    (problem,) = svid_problems(cert)
    assert "2 URI SANs" in problem.message
    assert "'spiffe://example.org/b'" in problem.message
    assert "reissue" in problem.message
    (invalid,) = svid_problems(ca.issue(uris=["spiffe://Example.org/a"]))
    assert "lowercase" in invalid.message
    (eku,) = svid_problems(ca.issue(eku=[ExtendedKeyUsageOID.SERVER_AUTH]))
    assert "lacks clientAuth" in eku.message


def test_every_broken_rule_is_reported_at_once(ca: TinyCa) -> None:
    cert = ca.cert  # a CA certificate presented as a leaf
    assert rules_of(cert) == [
        SvidRule.SPIFFE_ID_WITHOUT_PATH,
        SvidRule.LEAF_IS_CA,
        SvidRule.NO_DIGITAL_SIGNATURE,
        SvidRule.KEY_CERT_SIGN_ON_LEAF,
        SvidRule.CRL_SIGN_ON_LEAF,
    ]
    with pytest.raises(SvidError) as caught:
        spiffe_id_of(cert)
    assert len(caught.value.problems) == 5


def test_unparsable_extensions_are_a_problem_not_a_crash(ca: TinyCa) -> None:
    garbage_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03")
    cert = ca.issue(uris=OMIT, extra=[garbage_san])
    assert rules_of(cert) == [SvidRule.MALFORMED_EXTENSIONS]
    assert [p.rule for p in ca_problems(cert)] == [SvidRule.MALFORMED_EXTENSIONS]
    with pytest.raises(SvidError):
        spiffe_id_of(cert)


def test_rule_names_are_stable() -> None:
    # Logs, `inspect --json` and dashboards key on these strings.
    assert {rule.value for rule in SvidRule} >= {
        "uri_san_count",
        "invalid_spiffe_id",
        "leaf_is_ca",
        "key_usage_missing",
        "key_usage_not_critical",
        "no_digital_signature",
        "key_cert_sign_on_leaf",
        "crl_sign_on_leaf",
        "eku_missing_server_or_client_auth",
    }


def test_ca_rules(ca: TinyCa) -> None:
    assert ca_problems(ca.cert) == []
    intermediate = ca.issue(
        uris=OMIT, ca=True, usage=key_usage(digital_signature=False, key_cert_sign=True), eku=OMIT
    )
    assert ca_problems(intermediate) == []
    leaf = ca.issue()
    assert [p.rule for p in ca_problems(leaf)] == [
        SvidRule.CA_FLAG_MISSING,
        SvidRule.CA_KEY_CERT_SIGN_MISSING,
    ]
    no_usage = ca.issue(ca=True, usage=OMIT)
    assert [p.rule for p in ca_problems(no_usage)] == [SvidRule.CA_KEY_CERT_SIGN_MISSING]
    no_constraints = ca.issue(ca=OMIT, usage=key_usage(key_cert_sign=True))
    assert [p.rule for p in ca_problems(no_constraints)] == [SvidRule.CA_FLAG_MISSING]
