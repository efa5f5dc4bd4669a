"""Authorization policy: loading with every problem located, and decisions by rule kind."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy import (
    DENY_ALL,
    Action,
    Decision,
    DecisionKind,
    Mode,
    Policy,
    load_policy,
    parse_policy,
    policy_warnings,
)
from sidecar.problems import ProblemsError
from sidecar.spiffe import SpiffeId

SOURCE = "policy.yaml"
FRONTEND = "spiffe://example.org/ns/web/sa/frontend"


def policy(text: str, listeners: list[str] | None = None) -> Policy:
    return parse_policy(textwrap.dedent(text), SOURCE, listeners)


def problems(text: str, listeners: list[str] | None = None) -> list[str]:
    with pytest.raises(ProblemsError) as caught:
        policy(text, listeners)
    return [str(problem) for problem in caught.value.problems]


def sid(text: str) -> SpiffeId:
    """A peer's ID as authentication hands it to the policy: parsed once."""
    return SpiffeId.parse(text)


def allow(rule: str) -> Decision:
    return Decision(DecisionKind.ALLOW, rule)


def deny(rule: str) -> Decision:
    return Decision(DecisionKind.DENY, rule)


# --- decisions ----------------------------------------------------------------------------

SPEC_EXAMPLE = """
    mode: enforce
    default: deny
    rules:
      - name: frontend-reads
        action: allow
        from: ["spiffe://example.org/ns/web/sa/frontend", "spiffe://example.org/ns/batch/*"]
        to:
          listeners: [app]
"""


def test_exact_id() -> None:
    p = policy(SPEC_EXAMPLE)
    assert p.decide(sid(FRONTEND), "app") == allow("frontend-reads")
    assert p.decide(sid(FRONTEND + "x"), "app") == deny("default")
    assert p.decide(sid(FRONTEND + "/x"), "app") == deny("default")  # exact is not a prefix
    assert p.decide(sid("spiffe://example.org/ns/web/sa/Frontend"), "app") == deny("default")
    assert p.decide(sid("spiffe://example.com/ns/web/sa/frontend"), "app") == deny("default")


@pytest.mark.parametrize(
    ("peer", "matches"),
    [
        ("spiffe://example.org/ns/batch/x", True),
        ("spiffe://example.org/ns/batch/x/y", True),
        ("spiffe://example.org/ns/batch/.x", True),
        ("spiffe://example.org/ns/batch", False),  # strictly under, not the path itself
        ("spiffe://example.org/ns/batchy", False),  # segment boundary
        ("spiffe://example.org/ns/batchy/x", False),
        ("spiffe://example.org/ns/Batch/x", False),  # paths are case-sensitive
        ("spiffe://example.org/ns", False),
        ("spiffe://example.org/x/ns/batch/y", False),  # a prefix is anchored at the root
        ("spiffe://other.org/ns/batch/x", False),
    ],
)
def test_prefix_matches_on_segment_boundaries(peer: str, matches: bool) -> None:
    p = policy(SPEC_EXAMPLE)
    assert p.decide(sid(peer), "app") == (allow("frontend-reads") if matches else deny("default"))


def test_trust_domain_wildcard() -> None:
    p = policy("""
        default: deny
        rules:
          - {name: partners, action: allow, from: ["spiffe://partner.org/*"]}
    """)
    assert p.decide(sid("spiffe://partner.org/a"), "app") == allow("partners")
    assert p.decide(sid("spiffe://partner.org/a/b/c"), "app") == allow("partners")
    assert p.decide(sid("spiffe://partner.org.evil/a"), "app") == deny("default")
    assert p.decide(sid("spiffe://sub.partner.org/a"), "app") == deny("default")
    assert p.decide(sid("spiffe://partner.org"), "app") == deny("invalid_peer_id")


def test_trust_domain_compares_case_insensitively() -> None:
    p = policy("""
        rules:
          - {name: one, action: allow, from: ["spiffe://Example.ORG/ns/web/sa/frontend"]}
          - {name: batch, action: allow, from: ["spiffe://EXAMPLE.org/ns/batch/*"]}
          - {name: k, action: allow, from: ["spiffe://K.org/*"]}
        default: deny
    """)
    assert p.decide(sid(FRONTEND), "app") == allow("one")
    assert p.decide(sid("spiffe://example.org/ns/batch/job"), "app") == allow("batch")
    assert p.decide(sid("spiffe://k.org/x"), "app") == allow("k")
    assert p.decide(sid("spiffe://example.org/ns/web/sa/Frontend"), "app") == deny("default")
    # Only ASCII folds: U+212A KELVIN SIGN must not become a 'k'.
    (message,) = problems('rules: [{name: k, action: allow, from: ["spiffe://\u212a.org/*"]}]')
    assert "the trust domain holds '\\u212a'" in message


def test_deny_wins_over_allow_wherever_it_is_in_the_file() -> None:
    p = policy("""
        default: allow
        rules:
          - {name: batch-ok, action: allow, from: ["spiffe://example.org/ns/batch/*"]}
          - {name: all-ok, action: allow, from: ["spiffe://example.org/*"]}
          - {name: no-evil, action: deny, from: ["spiffe://example.org/ns/batch/evil"]}
          - {name: no-ns, action: deny, from: ["spiffe://example.org/ns/*"]}
    """)
    # Both deny rules match: the first one in file order is reported.
    assert p.decide(sid("spiffe://example.org/ns/batch/evil"), "app") == deny("no-evil")
    assert p.decide(sid("spiffe://example.org/ns/batch/good"), "app") == deny("no-ns")
    # Two allows match: the first in file order.
    assert p.decide(sid("spiffe://example.org/other"), "app") == allow("all-ok")


def test_first_allow_in_file_order_is_reported() -> None:
    p = policy("""
        rules:
          - {name: broad, action: allow, from: ["spiffe://example.org/*"]}
          - {name: narrow, action: allow, from: ["spiffe://example.org/ns/web/sa/frontend"]}
    """)
    assert p.decide(sid(FRONTEND), "app") == allow("broad")


def test_default_deny_and_missing_default_is_deny() -> None:
    explicit = policy("default: deny\nrules: []")
    implicit = policy("rules: []")
    for p in (explicit, implicit):
        assert p.default is Action.DENY
        decision = p.decide(sid(FRONTEND), "app")
        assert decision == deny("default")
        assert not decision.allowed


def test_default_allow_written_out() -> None:
    p = policy("""
        default: allow
        rules:
          - {name: no-batch, action: deny, from: ["spiffe://example.org/ns/batch/*"]}
    """)
    assert p.decide(sid(FRONTEND), "app") == allow("default")
    assert p.decide(sid("spiffe://example.org/ns/batch/x"), "app") == deny("no-batch")


def test_audit_mode_allows_what_it_would_deny() -> None:
    p = policy("""
        mode: audit
        default: deny
        rules:
          - {name: web, action: allow, from: ["spiffe://example.org/ns/web/*"]}
          - {name: no-batch, action: deny, from: ["spiffe://example.org/ns/batch/*"]}
    """)
    assert p.mode is Mode.AUDIT
    assert p.decide(sid(FRONTEND), "app") == allow("web")
    audit_rule = p.decide(sid("spiffe://example.org/ns/batch/x"), "app")
    assert audit_rule == Decision(DecisionKind.AUDIT_DENY, "no-batch")
    assert audit_rule.allowed
    audit_default = p.decide(sid("spiffe://example.org/other"), "app")
    assert audit_default == Decision(DecisionKind.AUDIT_DENY, "default")
    assert audit_default.allowed
    # An ID naming no workload is a bug upstream, not a policy question: denied even in
    # audit mode.
    assert p.decide(sid("spiffe://example.org"), "app") == deny("invalid_peer_id")


def test_listener_scoping() -> None:
    p = policy(
        """
        default: deny
        rules:
          - {name: app-only, action: allow, from: ["spiffe://example.org/*"],
             to: {listeners: [app]}}
          - {name: no-batch-on-grpc, action: deny, from: ["spiffe://example.org/ns/batch/*"],
             to: {listeners: [grpc]}}
          - {name: batch-anywhere, action: allow, from: ["spiffe://example.org/ns/batch/*"]}
        """,
        listeners=["app", "grpc", "metrics"],
    )
    assert p.decide(sid(FRONTEND), "app") == allow("app-only")
    assert p.decide(sid(FRONTEND), "grpc") == deny("default")
    assert p.decide(sid("spiffe://example.org/ns/batch/x"), "app") == allow("app-only")
    assert p.decide(sid("spiffe://example.org/ns/batch/x"), "grpc") == deny("no-batch-on-grpc")
    assert p.decide(sid("spiffe://example.org/ns/batch/x"), "metrics") == allow("batch-anywhere")
    # A listener no rule names gets only the unscoped rules.
    assert p.decide(sid("spiffe://example.org/ns/batch/x"), "unknown") == allow("batch-anywhere")


def test_rules_naming_methods_or_paths_never_match_a_connection() -> None:
    p = policy("""
        default: deny
        rules:
          - name: reads
            action: allow
            from: ["spiffe://example.org/*"]
            to: {methods: [GET, HEAD], paths: ["/api/orders", "/api/orders/*"]}
          - {name: no-posts, action: deny, from: ["spiffe://example.org/*"],
             to: {methods: [POST]}}
    """)
    assert p.decide(sid(FRONTEND), "app") == deny("default")
    assert p.rules[0].http_only
    assert p.rules[0].methods == ("GET", "HEAD")


def test_a_trust_domain_s_own_id_is_denied_even_by_an_allowing_default() -> None:
    p = policy("""
        default: allow
        rules: [{name: all, action: allow, from: ["spiffe://example.org/*"]}]
    """)
    assert p.decide(sid("spiffe://example.org"), "app") == deny("invalid_peer_id")


def test_deny_all() -> None:
    assert DENY_ALL.decide(sid(FRONTEND), "app") == deny("no_policy")
    assert DENY_ALL.rule_names == ()
    assert DENY_ALL.mode is Mode.ENFORCE


def test_policy_metadata_and_immutability() -> None:
    text = textwrap.dedent(SPEC_EXAMPLE)
    p = parse_policy(text, "config/policy.yaml")
    assert p.source == "config/policy.yaml"
    assert p.rule_names == ("frontend-reads",)
    assert len(p.version) == 12
    assert parse_policy(text, "elsewhere").version == p.version
    assert parse_policy(text + "\n# changed\n", SOURCE).version != p.version
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.mode = Mode.AUDIT  # type: ignore[misc]


def test_decision_kinds_are_the_metric_labels() -> None:
    assert [kind.value for kind in DecisionKind] == ["allow", "deny", "audit_deny"]


# --- loading: every problem, with its path ------------------------------------------------


def test_yaml_syntax_error_has_a_line() -> None:
    (message,) = problems("default: deny\nrules: [\n")
    # The words after the position are libyaml's (or PyYAML's without it).
    assert message.startswith("policy.yaml: not valid YAML (line 3, column 1): ")
    assert "node content" in message


def test_duplicate_yaml_keys_are_errors() -> None:
    (message,) = problems("default: deny\nmode: enforce\ndefault: allow\n")
    assert message.startswith("policy.yaml: not valid YAML (line 3, column 1)")
    assert "key 'default' is written twice (first on line 1); keep one" in message


def test_top_level_must_be_a_mapping() -> None:
    assert problems("- default: deny") == [
        "policy.yaml: the policy must be a mapping, not [{'default': 'deny'}]"
    ]
    assert problems("") == [
        "policy.yaml: the policy is empty: write at least `default: deny` and rules"
    ]


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems(
        """
        mode: enforcing
        default: yes
        defualt: deny
        rules:
          - name: a
            action: permit
            from: ["spiffe://exa mple.org/x", 7, "spiffe://example.org/*/x"]
            to: {listeners: [ap], methods: [get], paths: [orders], port: 1}
          - name: a
            action: allow
            from: []
          - action: allow
            from: ["spiffe://example.org/x"]
          - name: b
            from: ["spiffe://example.org/x/"]
          - name: c
            action: deny
          - just a string
          - name: default
            action: allow
            from: ["spiffe://example.org"]
          - {name: "has space", action: allow, from: ["*"]}
        """,
        listeners=["app"],
    )
    assert found == [
        "policy.yaml: defualt: unknown key 'defualt'; did you mean 'default'?",
        "policy.yaml: mode: 'enforcing' is not valid here: write enforce or audit",
        "policy.yaml: default: true is not valid here: write allow or deny "
        "(YAML reads unquoted yes/no/on/off as booleans)",
        "policy.yaml: rules[0].action: 'permit' is not valid here: write allow or deny",
        "policy.yaml: rules[0].from[0]: 'spiffe://exa mple.org/x' is not a SPIFFE ID: "
        "the trust domain holds ' '; only lowercase a-z 0-9 . - _ are allowed",
        "policy.yaml: rules[0].from[1]: must be a string (SPIFFE IDs or prefixes), not 7",
        "policy.yaml: rules[0].from[2]: 'spiffe://example.org/*/x' is not a SPIFFE ID "
        "pattern: '*' is allowed only as a final '/*', as in spiffe://example.org/ns/batch/* or spiffe://example.org/*",
        "policy.yaml: rules[0].to.port: unknown key 'port'; known keys: listeners, methods, paths",
        "policy.yaml: rules[0].to.listeners[0]: 'ap' is not an inbound listener of the "
        "config (app)",
        "policy.yaml: rules[0].to.methods[0]: 'get': HTTP methods are uppercase, like GET",
        "policy.yaml: rules[0].to.paths[0]: 'orders': a path starts with '/' and may end with '/*'",
        "policy.yaml: rules[1].name: 'a' is already the name of rules[0]; names must be "
        "unique, they label decisions in metrics and logs",
        "policy.yaml: rules[1].from: must be a non-empty list of SPIFFE IDs or prefixes, not []",
        "policy.yaml: rules[2].name: missing: every rule needs a name; it labels its decisions",
        "policy.yaml: rules[3].action: missing: write `action: allow` or `action: deny`",
        "policy.yaml: rules[3].from[0]: 'spiffe://example.org/x/' is not a SPIFFE ID: the "
        "path must not end with '/'; to match IDs under a path, end it with /*",
        "policy.yaml: rules[4].from: missing: every rule must say whose connections it "
        "applies to, e.g. from: [spiffe://example.org/ns/web/sa/frontend]",
        "policy.yaml: rules[5]: a rule must be a mapping, not 'just a string'",
        "policy.yaml: rules[6].name: 'default' is reserved: it labels decisions no rule made",
        "policy.yaml: rules[6].from[0]: 'spiffe://example.org' is not a SPIFFE ID: it names "
        "a trust domain, which no workload presents; write 'spiffe://example.org/*' to "
        "match every ID of the trust domain",
        "policy.yaml: rules[7].name: 'has space' is not a valid rule name: use 1-128 "
        "letters, digits, '.', '_', ':' or '-', starting with a letter or digit",
        "policy.yaml: rules[7].from[0]: '*' is not a SPIFFE ID pattern: '*' is allowed only "
        "as a final '/*', as in "
        "spiffe://example.org/ns/batch/* or spiffe://example.org/*",
    ]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("*", "'*' is allowed only as a final '/*'"),
        ("spiffe://*/x", "'*' is allowed only"),
        ("spiffe://*", "'*' is allowed only"),
        ("spiffe://example.org/ns/batch*", "'*' is allowed only"),
        ("spiffe://example.org/ns/*/sa/x", "'*' is allowed only"),
        ("spiffe://example.org/ns/**", "'*' is allowed only"),
        ("spiffe://example.org/ns/*/*", "'*' is allowed only"),
        ("spiffe://\u212a.org/*", "is not a SPIFFE ID prefix: the trust domain holds"),
        ("spiffe://example.org/ns//*", "is not a SPIFFE ID prefix: the path must not end"),
        ("spiffe://example.org/a b", "is not a SPIFFE ID: the path holds ' '"),
        ("example.org/x", "is not a SPIFFE ID: it must start with spiffe://"),
        ("spiffe://example.org", "names a trust domain"),
    ],
)
def test_bad_from_entries(entry: str, fragment: str) -> None:
    (message,) = problems(f"rules: [{{name: r, action: allow, from: [{entry!r}]}}]")
    assert message.startswith("policy.yaml: rules[0].from[0]: ")
    assert fragment in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:", "policy.yaml: rules: must be a list of rules (`rules: []` for none), not null"),
        ("rules: {a: 1}", "policy.yaml: rules: must be a list of rules"),
        (
            "rules: [{name: r, action: allow, from: spiffe://example.org/x}]",
            "policy.yaml: rules[0].from: must be a non-empty list",
        ),
        (
            "rules: [{name: r, action: allow, from: [spiffe://e.org/x], to: null}]",
            "policy.yaml: rules[0].to: `to` must be a mapping, not null",
        ),
        (
            "rules: [{name: r, action: allow, from: [spiffe://e.org/x], to: {listeners: []}}]",
            "policy.yaml: rules[0].to.listeners: must be a non-empty list",
        ),
        (
            "rules: [{name: 5, action: allow, from: [spiffe://e.org/x]}]",
            "policy.yaml: rules[0].name: 5 is not a valid rule name",
        ),
        ("mode: [audit]", "policy.yaml: mode: ['audit'] is not valid here"),
        ("{1: x}", "policy.yaml: 1: unknown key 1; known keys: mode, default, rules"),
    ],
)
def test_shapes(text: str, expected: str) -> None:
    (message,) = problems(text)
    assert message.startswith(expected)


def test_listener_names_are_checked_only_when_known() -> None:
    text = "rules: [{name: r, action: allow, from: [spiffe://e.org/x], to: {listeners: [x]}}]"
    assert policy(text).rules[0].listeners == ("x",)
    assert problems(text, listeners=[]) == [
        "policy.yaml: rules[0].to.listeners[0]: 'x' is not an inbound listener of the config "
        "(there are none)"
    ]


def test_load_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(SPEC_EXAMPLE))
    p = load_policy(path, ["app"])
    assert p.source == str(path)
    assert p.decide(sid(FRONTEND), "app").allowed


def test_load_policy_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ProblemsError) as caught:
        load_policy(missing)
    assert str(caught.value) == f"{missing}: cannot read the policy: No such file or directory"

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"default: deny\n\xff\xfe")
    with pytest.raises(ProblemsError) as caught:
        load_policy(binary)
    assert str(caught.value) == f"{binary}: not UTF-8 text (byte 14)"

    bad = tmp_path / "bad.yaml"
    bad.write_text("default: maybe\n")
    with pytest.raises(ProblemsError) as caught:
        load_policy(bad)
    assert str(caught.value) == f"{bad}: default: 'maybe' is not valid here: write allow or deny"


def test_policy_warnings_for_http_only_rules() -> None:
    p = policy("""
        rules:
          - {name: plain, action: allow, from: ["spiffe://e.org/*"]}
          - {name: reads, action: allow, from: ["spiffe://e.org/*"], to: {methods: [GET]}}
          - {name: on-api, action: allow, from: ["spiffe://e.org/*"],
             to: {listeners: [api], paths: ["/x"]}}
    """)
    warnings = [str(w) for w in policy_warnings(p, ["app", "api"])]
    assert warnings == [
        "policy.yaml: rules[1].to: rule 'reads' names methods or paths, which only http "
        "listeners check; it never matches tcp listener(s) api, app",
        "policy.yaml: rules[2].to: rule 'on-api' names methods or paths, which only http "
        "listeners check; it never matches tcp listener(s) api",
    ]
    assert [str(w) for w in policy_warnings(p, ["app"])] == [warnings[0].replace("api, ", "")]
    assert policy_warnings(p, []) == []


# --- properties ---------------------------------------------------------------------------

KEYS = ["mode", "default", "rules", "name", "action", "from", "to", "listeners", "methods"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["enforce", "audit", "allow", "deny", "spiffe://e.org/x", "spiffe://e.org/*"]),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=20,
)


@given(yaml_values)
@settings(max_examples=300)
def test_any_yaml_document_loads_or_raises_problems(doc: object) -> None:
    text = yaml.safe_dump(doc)
    try:
        parse_policy(text, SOURCE, ["l1"])
    except ProblemsError as error:
        assert error.problems
        assert all(str(problem).startswith(SOURCE) for problem in error.problems)


@given(st.text(alphabet="-:[]{}&*!|>'\"%@`#,? \n\tabcdeflnorsuw\x00\ufeff", max_size=60))
@settings(max_examples=300)
def test_any_text_loads_or_raises_problems(text: str) -> None:
    try:
        parse_policy(text, SOURCE)
    except ProblemsError as error:
        assert error.problems


TRUST_DOMAINS = ["a.org", "b.org"]
SEGMENTS = ["x", "xy", "y"]  # "x" and "xy" catch prefix matches that ignore boundaries
LISTENERS = ["l1", "l2"]
paths = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3).map(
    lambda segments: "".join("/" + s for s in segments)
)
patterns = st.one_of(
    st.builds(lambda td, p: f"spiffe://{td}{p or '/x'}", st.sampled_from(TRUST_DOMAINS), paths),
    st.builds(lambda td, p: f"spiffe://{td}{p}/*", st.sampled_from(TRUST_DOMAINS), paths),
    st.builds(lambda p: f"spiffe://A.ORG{p or '/x'}", paths),  # trust domains fold their case
)


@st.composite
def rule_docs(draw: st.DrawFn, index: int) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": f"r{index}",
        "action": draw(st.sampled_from(["allow", "deny"])),
        "from": draw(st.lists(patterns, min_size=1, max_size=3)),
    }
    to: dict[str, Any] = {}
    if draw(st.booleans()):
        to["listeners"] = draw(st.lists(st.sampled_from(LISTENERS), min_size=1, max_size=2))
    if draw(st.integers(0, 5)) == 0:
        to["methods"] = ["GET"]
    if to:
        rule["to"] = to
    return rule


@st.composite
def policy_docs(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(0, 8))
    return {
        "mode": draw(st.sampled_from(["enforce", "audit"])),
        "default": draw(st.sampled_from(["allow", "deny"])),
        "rules": [draw(rule_docs(i)) for i in range(count)],
    }


peers = st.one_of(
    st.builds(lambda td, p: f"spiffe://{td}{p}", st.sampled_from(TRUST_DOMAINS), paths),
    st.sampled_from(["spiffe://a.org", "spiffe://c.org/x"]),
)


def reference_decide(doc: dict[str, Any], peer: str, listener: str) -> tuple[str, str]:
    """The policy semantics read straight off SPEC.md: loop over every rule, no index."""
    workload = peer.startswith("spiffe://") and peer.count("/") >= 3
    if not workload or "//" in peer[9:] or peer.endswith("/") or not peer[9:].split("/")[0]:
        return "deny", "invalid_peer_id"
    first_deny = first_allow = None
    for rule in doc["rules"]:
        to = rule.get("to", {})
        if "methods" in to or "paths" in to:
            continue
        if "listeners" in to and listener not in to["listeners"]:
            continue
        entries = [e.replace("spiffe://A.ORG", "spiffe://a.org") for e in rule["from"]]
        hit = any(
            peer.startswith(entry[:-1]) if entry.endswith("/*") else peer == entry
            for entry in entries
        )
        if hit and rule["action"] == "deny" and first_deny is None:
            first_deny = rule["name"]
        if hit and rule["action"] == "allow" and first_allow is None:
            first_allow = rule["name"]
    denied = "audit_deny" if doc["mode"] == "audit" else "deny"
    if first_deny is not None:
        return denied, first_deny
    if first_allow is not None:
        return "allow", first_allow
    return ("allow" if doc["default"] == "allow" else denied), "default"


@given(policy_docs(), st.lists(peers, min_size=1, max_size=10), st.sampled_from(["l1", "l2", "l3"]))
@settings(max_examples=400)
def test_compiled_decide_agrees_with_looping_over_every_rule(
    doc: dict[str, Any], peer_ids: list[str], listener: str
) -> None:
    compiled = parse_policy(yaml.safe_dump(doc), SOURCE, LISTENERS)
    for peer in peer_ids:
        decision = compiled.decide(sid(peer), listener)
        assert (decision.kind.value, decision.rule) == reference_decide(doc, peer, listener)


# --- per request, on http listeners (Policy.for_peer) -------------------------------------

HTTP_POLICY = """
    default: deny
    rules:
      - name: no-admin
        action: deny
        from: ["spiffe://example.org/*"]
        to: {paths: ["/admin", "/admin/*"]}
      - name: reads
        action: allow
        from: ["spiffe://example.org/ns/web/*"]
        to: {methods: [GET, HEAD]}
      - name: orders
        action: allow
        from: ["spiffe://example.org/ns/web/sa/frontend"]
        to: {listeners: [api], methods: [POST], paths: ["/orders", "/orders/*"]}
      - name: batch
        action: allow
        from: ["spiffe://example.org/ns/batch/*"]
      - name: batch-no-delete
        action: deny
        from: ["spiffe://example.org/ns/batch/*"]
        to: {methods: [DELETE]}
"""


@pytest.mark.parametrize(("peer", "listener", "method", "path", "expected"), [
    (FRONTEND, "api", "GET", "/x", allow("reads")),
    (FRONTEND, "api", "HEAD", "/x", allow("reads")),
    (FRONTEND, "api", "POST", "/orders", allow("orders")),
    (FRONTEND, "api", "POST", "/orders/7", allow("orders")),
    (FRONTEND, "api", "POST", "/ordersx", deny("default")),  # /orders/* is on a segment
    (FRONTEND, "api", "POST", "/x", deny("default")),
    (FRONTEND, "other", "POST", "/orders", deny("default")),  # orders is for api only
    (FRONTEND, "api", "GET", "/admin", deny("no-admin")),  # deny wins over an allow
    (FRONTEND, "api", "GET", "/admin/users", deny("no-admin")),
    (FRONTEND, "api", "GET", "/administrator", allow("reads")),
    ("spiffe://example.org/ns/web/sa/other", "api", "POST", "/orders", deny("default")),
    ("spiffe://example.org/ns/batch/sa/j", "api", "POST", "/x", allow("batch")),
    ("spiffe://example.org/ns/batch/sa/j", "api", "DELETE", "/x", deny("batch-no-delete")),
    ("spiffe://example.org/ns/batch/sa/j", "api", "GET", "/admin/x", deny("no-admin")),
    ("spiffe://other.org/ns/web/sa/frontend", "api", "GET", "/x", deny("default")),
])
def test_requests_are_decided_on_method_and_path(peer: str, listener: str, method: str,
                                                 path: str, expected: Decision) -> None:
    p = policy(HTTP_POLICY)
    assert p.for_peer(sid(peer), listener).decide(method, path) == expected


def test_the_first_matching_deny_is_reported_whatever_came_before() -> None:
    p = policy("""
        default: allow
        rules:
          - {name: a, action: allow, from: ["spiffe://example.org/*"], to: {paths: ["/x"]}}
          - {name: d1, action: deny, from: ["spiffe://example.org/*"], to: {methods: [GET]}}
          - {name: d2, action: deny, from: ["spiffe://example.org/*"]}
    """)
    rules = p.for_peer(sid(FRONTEND), "api")
    assert rules.decide("GET", "/x") == deny("d1")
    assert rules.decide("POST", "/x") == deny("d2")


def test_audit_mode_reports_what_a_request_rule_would_deny() -> None:
    p = policy(HTTP_POLICY.replace("default: deny", "mode: audit\n    default: deny"))
    rules = p.for_peer(sid(FRONTEND), "api")
    assert rules.decide("GET", "/admin/x") == Decision(DecisionKind.AUDIT_DENY, "no-admin")
    assert rules.decide("GET", "/admin/x").allowed
    assert rules.decide("PUT", "/x") == Decision(DecisionKind.AUDIT_DENY, "default")


def test_a_peer_no_http_rule_names_is_decided_once_per_connection() -> None:
    p = policy("""
        default: deny
        rules:
          - {name: web, action: allow, from: ["spiffe://example.org/ns/web/*"]}
          - {name: admin, action: deny, from: ["spiffe://example.org/ns/ops/*"],
             to: {paths: ["/admin/*"]}}
    """)
    rules = p.for_peer(sid(FRONTEND), "api")
    assert rules.fixed == allow("web")
    assert rules.decide("DELETE", "/admin/x") == allow("web")
    assert p.for_peer(sid("spiffe://example.org/ns/ops/sa/x"), "api").fixed is None


def test_a_peer_without_a_path_is_denied_per_request_too() -> None:
    p = policy(HTTP_POLICY.replace("default: deny", "mode: audit\n    default: allow"))
    rules = p.for_peer(sid("spiffe://example.org"), "api")
    assert rules.decide("GET", "/") == deny("invalid_peer_id")


def test_until_a_policy_loads_every_request_is_denied() -> None:
    assert DENY_ALL.for_peer(sid(FRONTEND), "api").decide("GET", "/") == deny("no_policy")


def test_the_connection_decision_ignores_request_rules_as_before() -> None:
    p = policy(HTTP_POLICY)
    assert p.decide(sid(FRONTEND), "api") == deny("default")
    assert p.decide(sid("spiffe://example.org/ns/batch/sa/j"), "api") == allow("batch")


@pytest.mark.parametrize(("path", "message"), [
    ("/api/../admin", "so write '/admin'"),
    ("/a/%7e", "so write '/a/~'"),
    ("//admin/*", "so write '/admin/*'"),
    ("/a%2Fb", "never matches: the path holds an encoded slash (%2F)"),
    # (not "must be percent-encoded": %3F would match a literal ? in the path)
    ("/search?admin=1", "the query is not judged by the policy, only the path: write "
                        "'/search'"),
])
def test_rule_paths_must_be_written_normalized(path: str, message: str) -> None:
    found = problems(f"""
        rules:
          - {{name: a, action: allow, from: ["spiffe://example.org/*"], to: {{paths: ["{path}"]}}}}
    """)
    assert len(found) == 1 and message in found[0], found


METHODS = st.sampled_from(["GET", "POST", "DELETE", "HEAD"])
REQUEST_PATHS = st.sampled_from(["/", "/admin", "/admin/x", "/orders", "/orders/1", "/x"])


@given(METHODS, REQUEST_PATHS, st.sampled_from([FRONTEND, "spiffe://example.org/ns/web/sa/b",
                                                 "spiffe://example.org/ns/batch/sa/j"]))
def test_per_request_decisions_agree_with_reading_the_rules_in_order(
        method: str, path: str, peer: str) -> None:
    """The compiled walk gives what a plain reading of the rules gives."""
    p = policy(HTTP_POLICY)
    peer_id = sid(peer)
    matching = [r for r in p.rules
                if any(pattern.matches(peer_id) for pattern in r.peers)
                and (r.listeners is None or "api" in r.listeners)
                and (not r.methods or method in r.methods)
                and (not r.paths or any(path == q or (q.endswith("/*") and path.startswith(q[:-1]))
                                        for q in r.paths))]
    denies = [r for r in matching if r.action is Action.DENY]
    allows = [r for r in matching if r.action is Action.ALLOW]
    expected = deny(denies[0].name) if denies else allow(allows[0].name) if allows else \
        deny("default")
    assert p.for_peer(peer_id, "api").decide(method, path) == expected
