"""SPIFFE-ID parsing and X.509-SVID rules, against the SPIFFE specs' own rules."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from sidecar.spiffe import (
    MAX_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    SvidRule,
    TrustDomain,
    ca_problems,
    fold_trust_domain_case,
    spiffe_id_of,
    svid_problems,
)

# --- SPIFFE IDs ---------------------------------------------------------------------------

# A 2048-byte ID: "spiffe://" (9) + "td" (2) + "/" + 2036 path characters.
LONGEST_ID = "spiffe://td/" + "a" * (MAX_ID_BYTES - len("spiffe://td/"))
LONGEST_TD = "a" * MAX_TRUST_DOMAIN_BYTES

VALID_IDS = [
    "spiffe://example.org",  # the trust domain itself: a valid ID with an empty path
    "spiffe://example.org/ns/default/sa/app",
    "spiffe://a-b_c.d0/X.y-Z_9",
    "spiffe://td/.hidden",  # a segment may start with a dot; only "." and ".." are banned
    "spiffe://td/...",
    "spiffe://td/a./b..",
    "spiffe://1.2.3.4/x",
    "spiffe://td/9eebccd2-12bf-40a6-b262-65fe0487d453",
    LONGEST_ID,
    f"spiffe://{LONGEST_TD}/x",
]


@pytest.mark.parametrize("text", VALID_IDS)
def test_valid_ids_parse_and_round_trip(text: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert str(spiffe_id) == text
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


def test_parts() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/ns/web")
    assert spiffe_id.trust_domain == TrustDomain("example.org")
    assert spiffe_id.path == "/ns/web"
    assert spiffe_id.member_of(TrustDomain.parse("Example.org"))
    assert not spiffe_id.member_of(TrustDomain("example.com"))
    assert SpiffeId.parse("spiffe://example.org").path == ""
    assert TrustDomain("example.org").id == SpiffeId.parse("spiffe://example.org")


def test_path_is_case_sensitive() -> None:
    assert SpiffeId.parse("spiffe://td/App") != SpiffeId.parse("spiffe://td/app")


INVALID_IDS = [
    ("", "empty"),
    ("example.org/x", "must start with spiffe://"),
    ("http://example.org/x", "scheme must be spiffe, not 'http'"),
    ("SPIFFE://example.org/x", "lowercase"),
    ("Spiffe://example.org/x", "lowercase"),
    ("spiffe:/example.org/x", "must start with spiffe://"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///x", "trust domain is missing"),
    ("spiffe://Example.org/x", "trust domain must be lowercase"),
    ("spiffe://EXAMPLE.ORG", "trust domain must be lowercase"),
    ("spiffe://example.org:8443/x", "port"),
    ("spiffe://example.org:/x", "port"),
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://user:pw@example.org/x", "userinfo"),
    ("spiffe://exa mple.org/x", "' '"),
    ("spiffe://exa+mple.org/x", "'+'"),
    ("spiffe://\u212aelvin.org/x", "\\u212a"),  # KELVIN SIGN: lower() would make it 'k'
    ("spiffe://[::1]/x", "IP literal"),
    (f"spiffe://{LONGEST_TD}a/x", f"more than {MAX_TRUST_DOMAIN_BYTES}"),
    ("spiffe://example.org/", "must not end with '/'"),
    ("spiffe://example.org/x/", "must not end with '/'"),
    ("spiffe://example.org//x", "empty segment"),
    ("spiffe://example.org/x//y", "empty segment"),
    ("spiffe://example.org/./x", "'.' segment"),
    ("spiffe://example.org/x/..", "'..' segment"),
    ("spiffe://example.org/x/../y", "'..' segment"),
    ("spiffe://example.org/x%2Fy", "percent-encoding"),
    ("spiffe://example.org/%41", "percent-encoding"),
    ("spiffe://example.org/x?y=1", "query"),
    ("spiffe://example.org?x", "query"),
    ("spiffe://example.org/x#frag", "fragment"),
    ("spiffe://example.org#", "fragment"),
    ("spiffe://example.org/x y", "' '"),
    ("spiffe://example.org/x:y", "':'"),
    ("spiffe://example.org/x@y", "'@'"),
    ("spiffe://example.org/caf\u00e9", "\\xe9"),
    ("spiffe://example.org/x\n", "'\\n'"),
    ("spiffe://example.org/*", "'*'"),
    (LONGEST_ID + "a", f"more than {MAX_ID_BYTES}"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID_IDS)
def test_invalid_ids_name_the_rule(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse(text)
    assert reason in caught.value.reason
    assert caught.value.value == text
    assert str(caught.value).startswith(f"{text[:40]!r}"[:-1])
    assert "is not a SPIFFE ID" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_error_message_cuts_huge_input() -> None:
    with pytest.raises(SpiffeIdError) as caught:
        SpiffeId.parse("spiffe://td/" + "a" * 100_000)
    assert len(str(caught.value)) < 400
    assert "100012 chars" in str(caught.value)


def test_ids_are_frozen() -> None:
    spiffe_id = SpiffeId.parse("spiffe://td/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spiffe_id.path = "/y"  # type: ignore[misc]


# --- trust domains ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),  # config input folds to lowercase
        ("spiffe://example.org", "example.org"),
        ("spiffe://Example.org", "example.org"),
        ("a_b-c.0", "a_b-c.0"),
        (LONGEST_TD, LONGEST_TD),
    ],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    trust_domain = TrustDomain.parse(text)
    assert trust_domain.name == name
    assert str(trust_domain) == f"spiffe://{name}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "missing"),
        ("spiffe://", "missing"),
        ("example.org:443", "port"),
        ("me@example.org", "userinfo"),
        ("example.org/x", "no path"),
        ("spiffe://example.org/x", "no path"),
        ("\u212aelvin.org", "\\u212a"),  # non-ASCII is never folded into ASCII
        ("exa mple.org", "' '"),
        (LONGEST_TD + "a", "more than 255"),
    ],
)
def test_trust_domain_rejects(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        TrustDomain.parse(text)
    assert reason in caught.value.reason
    assert "is not a trust domain" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("spiffe://Example.ORG/Path/X", "spiffe://example.org/Path/X"),  # path keeps its case
        ("spiffe://EXAMPLE.org", "spiffe://example.org"),
        ("spiffe://\u212aelvin.org/x", "spiffe://\u212aelvin.org/x"),
        ("SPIFFE://Example.org/x", "SPIFFE://Example.org/x"),  # not ID-shaped: unchanged
        ("", ""),
    ],
)
def test_fold_trust_domain_case(text: str, folded: str) -> None:
    assert fold_trust_domain_case(text) == folded


# --- properties ---------------------------------------------------------------------------

TD_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")
PATH_CHARS = TD_CHARS | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def reference_is_valid(text: str) -> bool:
    """The SPIFFE-ID rules written out one by one, as plainly as possible."""
    if not text.startswith("spiffe://"):
        return False
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return False
    trust_domain, slash, path = text[len("spiffe://") :].partition("/")
    if not trust_domain or len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        return False
    if any(char not in TD_CHARS for char in trust_domain):
        return False
    if slash:
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                return False
            if any(char not in PATH_CHARS for char in segment):
                return False
    return True


ID_ALPHABET = "spiffe:/.-_aZ09%?#@ \u00e9\u212aAB"
id_like = st.one_of(
    st.text(),
    st.text(alphabet=ID_ALPHABET, max_size=40),
    st.builds("spiffe://".__add__, st.text(alphabet=ID_ALPHABET, max_size=40)),
    st.builds("spiffe://td/".__add__, st.text(alphabet="a./%A:", max_size=20)),
)


@given(id_like)
def test_parse_agrees_with_the_plain_rules_and_raises_only_spiffe_id_error(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError as error:
        assert not reference_is_valid(text)
        # The fast path rejected it and the explanation found the rule it broke.
        assert error.reason != "it breaks the SPIFFE ID grammar"
    else:
        assert reference_is_valid(text)
        assert str(spiffe_id) == text


segment = st.text(alphabet=sorted(PATH_CHARS), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
trust_domain_name = st.text(alphabet=sorted(TD_CHARS), min_size=1, max_size=30)


@given(trust_domain_name, st.lists(segment, max_size=6))
def test_every_id_built_from_the_grammar_parses(name: str, segments: Sequence[str]) -> None:
    text = "spiffe://" + name + "".join("/" + s for s in segments)
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.trust_domain.name == name
    assert str(spiffe_id) == text


@given(st.text())
def test_trust_domain_parse_raises_only_spiffe_id_error(text: str) -> None:
    try:
        trust_domain = TrustDomain.parse(text)
    except SpiffeIdError:
        return
    assert SpiffeId.parse(str(trust_domain)).trust_domain == trust_domain


# --- X.509-SVID rules ---------------------------------------------------------------------

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
