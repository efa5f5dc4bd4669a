"""SPIFFE-ID parsing, against the SPIFFE-ID spec's own rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.spiffe import (
    MAX_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    PatternKind,
    SpiffeId,
    SpiffeIdError,
    SpiffePattern,
    TrustDomain,
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


# --- patterns: the policy's `from`, a route's `expect_ids`, --expect-id ---------------------


def pattern(text: str) -> SpiffePattern:
    return SpiffePattern.parse(text)


def ids(*texts: str) -> list[SpiffeId]:
    return [SpiffeId.parse(t) for t in texts]


def test_each_kind_of_pattern_is_parsed_to_its_kind() -> None:
    assert pattern("spiffe://example.org/a/b") == SpiffePattern(
        PatternKind.EXACT, TrustDomain("example.org"), "/a/b")
    assert pattern("spiffe://example.org/a/b/*") == SpiffePattern(
        PatternKind.PREFIX, TrustDomain("example.org"), "/a/b")
    assert pattern("spiffe://example.org/*") == SpiffePattern(
        PatternKind.TRUST_DOMAIN, TrustDomain("example.org"), "")


@pytest.mark.parametrize("text", ["spiffe://example.org/a/b", "spiffe://example.org/a/b/*",
                                  "spiffe://example.org/*"])
def test_a_pattern_prints_as_it_is_written(text: str) -> None:
    assert str(pattern(text)) == text


def test_an_exact_pattern_matches_that_id_alone() -> None:
    p = pattern("spiffe://example.org/ns/default/sa/payments")
    assert [p.matches(i) for i in ids(
        "spiffe://example.org/ns/default/sa/payments",
        "spiffe://example.org/ns/default/sa/paymentsx",  # not a prefix inside a segment
        "spiffe://example.org/ns/default/sa/payments/x",  # nor at a segment boundary
        "spiffe://example.org/ns/default/sa/pay",
        "spiffe://example.org/ns/default/sa/Payments",  # paths are case-sensitive
        "spiffe://example.org",
        "spiffe://example.com/ns/default/sa/payments",
        "spiffe://example.orgx/ns/default/sa/payments",
    )] == [True, False, False, False, False, False, False, False]


def test_a_prefix_pattern_matches_ids_strictly_under_it_on_a_segment_boundary() -> None:
    p = pattern("spiffe://example.org/ns/batch/*")
    assert [p.matches(i) for i in ids(
        "spiffe://example.org/ns/batch/job",
        "spiffe://example.org/ns/batch/job/replica-1",
        "spiffe://example.org/ns/batch",  # the prefix itself is not under it
        "spiffe://example.org/ns/batchx/job",
        "spiffe://example.org/ns/Batch/job",
        "spiffe://example.org/ns",
        "spiffe://other.org/ns/batch/job",
    )] == [True, True, False, False, False, False, False]


def test_a_trust_domain_pattern_matches_every_workload_of_that_domain_only() -> None:
    p = pattern("spiffe://example.org/*")
    assert [p.matches(i) for i in ids(
        "spiffe://example.org/x",
        "spiffe://example.org/ns/default/sa/payments",
        "spiffe://example.org",  # the trust domain's own ID is no workload
        "spiffe://example.org.evil.com/x",
        "spiffe://evil-example.org/x",
        "spiffe://sub.example.org/x",
        "spiffe://example.o/x",
    )] == [True, True, False, False, False, False, False]


@pytest.mark.parametrize(
    ("text", "matching"),
    [
        ("spiffe://Example.ORG/ns/a", "spiffe://example.org/ns/a"),
        ("spiffe://EXAMPLE.org/ns/*", "spiffe://example.org/ns/b"),
        ("spiffe://EXAMPLE.ORG/*", "spiffe://example.org/x"),
    ],
)
def test_a_pattern_s_trust_domain_compares_case_insensitively(text: str, matching: str) -> None:
    p = pattern(text)
    assert p.trust_domain == TrustDomain("example.org")
    assert p.matches(SpiffeId.parse(matching))


def test_a_pattern_s_path_keeps_its_case() -> None:
    p = pattern("spiffe://Example.org/NS/A")
    assert str(p) == "spiffe://example.org/NS/A"
    assert not p.matches(SpiffeId.parse("spiffe://example.org/ns/a"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("spiffe://example.org/a/*/b", "'*' is allowed only as a final '/*'"),
        ("spiffe://example.org/a*", "'*' is allowed only as a final '/*'"),
        ("spiffe://example.org/a/**", "'*' is allowed only as a final '/*'"),
        ("spiffe://example.org/*/*", "'*' is allowed only as a final '/*'"),
        ("/*", "'*' is allowed only as a final '/*'"),
        ("*", "'*' is allowed only as a final '/*'"),
        ("spiffe://*", "'*' is allowed only as a final '/*'"),
        ("spiffe:///*", "'*' is allowed only as a final '/*'"),
        ("spiffe://*/x", "'*' is allowed only as a final '/*'"),
        ("spiffe://example.org/a/", "the path must not end with '/'; to match IDs under a "
                                    "path, end it with /*"),
        ("spiffe://example.org/a//*", "is not a SPIFFE ID prefix: the path must not end"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/a/../b", "'..' segment; dot segments are not allowed"),
        ("spiffe://example.org/./*", "'.' segment; dot segments are not allowed"),
        ("spiffe://example.org", "names a trust domain, which no workload presents; write "
                                 "'spiffe://example.org/*'"),
        ("spiffe://\u212aelvin.org/*", "the trust domain holds '\\u212a'"),  # no Unicode fold
        ("example.org/x", "is not a SPIFFE ID: it must start with spiffe://"),
        ("", "is not a SPIFFE ID: it is empty"),
    ],
)
def test_an_invalid_pattern_is_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(SpiffeIdError) as caught:
        pattern(text)
    assert says in str(caught.value)
    assert caught.value.value == text  # the message quotes what was written, unfolded


def test_where_prefixes_are_not_taken_a_prefix_is_refused_pointing_at_the_whole_domain() -> None:
    assert SpiffePattern.parse("spiffe://example.org/*", prefixes=False).kind is \
        PatternKind.TRUST_DOMAIN
    for text in ("spiffe://example.org/ns/*", "spiffe://example.org/*/x"):
        with pytest.raises(SpiffeIdError, match="a wildcard must be the whole path, "
                           r"spiffe://example.org/\*"):
            SpiffePattern.parse(text, prefixes=False)


@given(st.text())
def test_pattern_parse_raises_only_spiffe_id_error(text: str) -> None:
    try:
        p = SpiffePattern.parse(text)
    except SpiffeIdError:
        return
    assert SpiffePattern.parse(str(p)) == p
