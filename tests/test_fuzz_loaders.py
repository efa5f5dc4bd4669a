"""Fuzzed inputs for every loader (issue 11, item 6): any input gives a valid object or our
own error type naming what is wrong, never another exception, never a hang, never a
partially applied reload.

- `identity.load_identity` on three files written from fuzzed bytes: random bytes,
  mutations of valid PEM (a flipped byte, a cut, a line dropped, duplicated or swapped),
  valid material that does not belong together (a cert with another key, a foreign
  bundle), and random mixes of the three: an Identity whose parts agree, or ProblemsError.
- `config.parse_config` and `policy.parse_policy` on mutated YAML (the shipped examples,
  line by line) and on random YAML documents built from their own keys: a Config / Policy,
  or ProblemsError. `Policy.decide` on any parsed peer and any listener: a Decision.
- `SpiffeId.parse` / `TrustDomain.parse`: a value or SpiffeIdError, nothing else.
- `peerchain.parse_certificate_message` on any bytes: a list of byte strings, no raise.
- reload: `Reloadable` around `load_identity`, with a swap that records what it gets, on
  fuzzed file sets: it swaps a whole valid Identity, or swaps nothing.
- YAML alias bombs ("billion laughs"): a few hundred bytes must not cost seconds.

Every example is bounded by hypothesis' `deadline`, the file by pytest-timeout; example
counts are kept small so that the file runs in about 20 s.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sidecar.config import Config, parse_config
from sidecar.identity import Identity, load_identity
from sidecar.policy import Decision, Policy, parse_policy
from sidecar.problems import ProblemsError
from sidecar.sources import watch as reload
from sidecar.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from sidecar.tls.peerchain import parse_certificate_message
from sidecar.tools import pki

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
TD = "example.org"
FUZZ = settings(
    max_examples=80,
    deadline=timedelta(seconds=3),  # generous: a loaded two-core CI box, not a hang
    suppress_health_check=[HealthCheck.too_slow],
)


def problems_named(exc: ProblemsError) -> None:
    """Our error type must say what is wrong: at least one problem, each with words."""
    assert exc.problems, "ProblemsError without a problem"
    for p in exc.problems:
        assert p.message.strip(), f"a problem without a message: {p!r}"


# --- identity material, made once --------------------------------------------------------

ROOT = pki.new_root(TD)
INTERMEDIATE = pki.new_intermediate(ROOT)
FOREIGN_ROOT = pki.new_root(TD)
SVID_A = pki.issue_svid(INTERMEDIATE, f"spiffe://{TD}/ns/default/sa/payments")
SVID_B = pki.issue_svid(INTERMEDIATE, f"spiffe://{TD}/ns/default/sa/payments")
FOREIGN = pki.issue_svid(pki.new_intermediate(FOREIGN_ROOT), f"spiffe://{TD}/ns/x/sa/y")
BAD_SVID = pki.issue_svid(INTERMEDIATE, f"spiffe://{TD}/ns/a", uris=[
    f"spiffe://{TD}/ns/a", f"spiffe://{TD}/ns/b"])  # two URI SANs

CERT_FILES = [
    SVID_A.chain_pem(),
    SVID_B.chain_pem(),
    FOREIGN.chain_pem(),
    BAD_SVID.chain_pem(),
    pki.certs_pem([SVID_A.cert]),  # without its intermediate
    pki.certs_pem([ROOT.cert]),  # a CA where the leaf should be
    pki.certs_pem([SVID_A.cert, ROOT.cert]),  # the wrong issuer next
]
KEY_FILES = [
    SVID_A.key_pem(),
    SVID_A.key_pem(pki.KeyFormat.SEC1),
    SVID_B.key_pem(),
    FOREIGN.key_pem(),
    SVID_A.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret")),
]
BUNDLE_FILES = [
    pki.certs_pem([ROOT.cert]),
    pki.certs_pem([FOREIGN_ROOT.cert]),
    pki.certs_pem([ROOT.cert, FOREIGN_ROOT.cert]),
    pki.certs_pem([SVID_A.cert]),  # a leaf is no CA
    pki.certs_pem([INTERMEDIATE.cert, ROOT.cert]),
]
ALL_PEM = CERT_FILES + KEY_FILES + BUNDLE_FILES


@st.composite
def mutated(draw: st.DrawFn, sources: list[bytes]) -> bytes:
    """A valid PEM file, damaged a few times the ways files get damaged."""
    data = draw(st.sampled_from(sources))
    for _ in range(draw(st.integers(1, 3))):
        lines = data.split(b"\n")
        op = draw(st.sampled_from(["flip", "cut", "drop", "dup", "swap", "insert", "splice"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
        elif op == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "drop" and lines:
            del lines[draw(st.integers(0, len(lines) - 1))]
            data = b"\n".join(lines)
        elif op == "dup" and lines:
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = b"\n".join(lines)
        elif op == "swap" and len(lines) > 1:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            data = b"\n".join(lines)
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.binary(max_size=40)) + data[i:]
        elif op == "splice":  # half of another file: a rotation caught mid-write
            other = draw(st.sampled_from(ALL_PEM))
            data = data[: len(data) // 2] + other[len(other) // 2 :]
    return data


def file_content(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(valid),
        mutated(valid),
        st.sampled_from(ALL_PEM),  # a file of the wrong kind
        st.binary(max_size=2048),
        st.just(b""),
    )


GOOD_SET = (SVID_A.chain_pem(), SVID_A.key_pem(), pki.certs_pem([ROOT.cert]))
KINDS = (CERT_FILES, KEY_FILES, BUNDLE_FILES)


@st.composite
def one_file_changed(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """The good set with one file replaced: a rotation caught halfway, one damaged file.
    These sit next to the line between valid and invalid, where a reload could go wrong."""
    files = list(GOOD_SET)
    i = draw(st.integers(0, 2))
    files[i] = draw(file_content(KINDS[i]))
    return files[0], files[1], files[2]


FILE_SETS = st.one_of(
    one_file_changed(),
    st.tuples(file_content(CERT_FILES), file_content(KEY_FILES), file_content(BUNDLE_FILES)),
)


def write_set(d: Path, files: tuple[bytes, bytes, bytes]) -> tuple[Path, Path, Path]:
    paths = (d / "svid.pem", d / "svid_key.pem", d / "bundle.pem")
    for path, data in zip(paths, files, strict=True):
        path.write_bytes(data)
    return paths


def load(paths: tuple[Path, Path, Path]) -> Identity | ProblemsError:
    try:
        identity = load_identity(*paths)
    except ProblemsError as exc:
        problems_named(exc)
        event("refused")
        return exc
    event("loaded")
    return identity


def assert_whole(identity: Identity, files: tuple[bytes, bytes, bytes]) -> None:
    """Every part of the snapshot agrees with the others and with the files."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key = serialization.load_pem_private_key(identity.key_pem, None)
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        identity.leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert str(identity.spiffe_id) == pki.Svid(identity.leaf, key).spiffe_id  # type: ignore[arg-type]
    # Compare certificates, not PEM text: a fuzzed file may wrap its base64 differently
    # (or not at all) and still hold the very same certificate.
    assert identity.leaf in x509.load_pem_x509_certificates(files[0])
    assert identity.own_bundle.cas, "an identity without trust anchors"
    in_bundle = x509.load_pem_x509_certificates(files[2])
    assert all(ca in in_bundle for ca in identity.own_bundle.cas)


@settings(FUZZ, max_examples=200)
@given(files=FILE_SETS)
@example(files=GOOD_SET)
@example(files=(SVID_B.chain_pem(), SVID_A.key_pem(), GOOD_SET[2]))  # cert rotated, key not
def test_load_identity_gives_an_identity_or_problems(files: tuple[bytes, bytes, bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        got = load(write_set(Path(d), files))
    if isinstance(got, Identity):
        assert_whole(got, files)


def test_the_good_set_loads() -> None:
    """The fuzzing above is not vacuous: its base material is valid."""
    with tempfile.TemporaryDirectory() as d:
        assert_whole(load_identity(*write_set(Path(d), GOOD_SET)), GOOD_SET)


# --- reload: a whole identity or nothing ---------------------------------------------------


def test_reload_swaps_a_whole_valid_identity_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # One attempt per reload: its retries only wait (0.1-1 s each) for files still being
    # written, and these are not; the decision per attempt is the same.
    monkeypatch.setattr(reload, "RETRY_DELAYS", ())

    @settings(FUZZ, max_examples=150)
    @given(files=FILE_SETS)
    @example(files=GOOD_SET)
    def check(files: tuple[bytes, bytes, bytes]) -> None:
        swapped: list[object] = []

        def swap(snapshot: object) -> bool:
            swapped.append(snapshot)
            return True

        with tempfile.TemporaryDirectory() as d:
            paths = write_set(Path(d), files)

            async def run() -> bool:
                r = reload.Reloadable("svid", paths, lambda: load_identity(*paths), swap)
                return await r.reload("fuzz")

            ok = asyncio.run(run())
            direct = load(paths)
        if isinstance(direct, Identity):
            assert ok and len(swapped) == 1, (ok, swapped)
            [got] = swapped
            assert isinstance(got, Identity)
            assert got.version == direct.version
            assert_whole(got, files)
        else:
            assert not ok and swapped == [], f"a set that does not load was swapped in: {swapped}"

    check()


# --- config and policy ----------------------------------------------------------------------

CONFIG_EXAMPLE = (REPO / "config" / "sidecar.yaml").read_text()
POLICY_EXAMPLE = (REPO / "config" / "policy.yaml").read_text()
MINIMAL_CONFIG = json.dumps({
    "identity": {"cert": "svid.pem", "key": "key.pem", "bundle": "bundle.pem"},
    "inbound": [{"name": "app", "listen": "127.0.0.1:8443", "forward_to": "127.0.0.1:8080"}],
    "policy": "policy.yaml",
}, indent=2)

# Keys and values the loaders know, so that random documents reach deep into them.
CONFIG_KEYS = ["identity", "inbound", "outbound", "policy", "tls", "limits", "admin", "log",
               "drain_timeout", "workers", "cert", "key", "bundle", "federated_bundles", "crl",
               "watch", "reload_interval", "name", "listen", "forward_to", "protocol",
               "proxy_protocol", "connect_to", "server_name", "expect_ids", "min_version",
               "session_resumption", "ktls", "handshake_timeout", "idle_timeout",
               "connect_timeout", "max_connections", "max_pending_handshakes",
               "max_connection_lifetime", "level", "format"]
POLICY_KEYS = ["mode", "default", "rules", "name", "action", "from", "to", "listeners",
               "methods", "paths"]
WORDS = ["127.0.0.1:8443", "0.0.0.0:0", "[::1]:80", "unix:/run/app.sock", "10s", "500ms", "0",
         "1.2", "1.3", "auto", "on", "off", "tcp", "http", "json", "text", "debug", "allow",
         "deny", "enforce", "audit", "spiffe://example.org/ns/web/sa/frontend",
         "spiffe://example.org/*", "spiffe://Example.org/a/", "spiffe://", "GET", "/x/*",
         "svid.pem", "", "\x00", "é", "\ud800", "*"]


def yaml_documents(keys: list[str]) -> st.SearchStrategy[str]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.floats(),
                        st.sampled_from(WORDS), st.text(max_size=20))
    values = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), inner,
                            max_size=5)),
        max_leaves=25)
    top = st.dictionaries(st.sampled_from(keys), values, max_size=8)
    return st.one_of(top, values).map(
        lambda doc: yaml.safe_dump(doc, allow_unicode=True, default_flow_style=None))


YAML_BITS = st.one_of(st.sampled_from([
    *WORDS, ":", "- ", "{", "[", "&a", "*a", "!!python/object:os.system", "\t", "#", "'", '"',
    "<<: *a"]), st.text(max_size=10))


@st.composite
def mutated_text(draw: st.DrawFn, sources: list[str]) -> str:
    lines = draw(st.sampled_from(sources)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap", "indent", "dedent", "edit", "cut"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i].lstrip()
        elif op == "edit":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(YAML_BITS) + lines[i][at:]
        else:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    return "\n".join(lines)


def texts(sources: list[str], keys: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(mutated_text(sources), yaml_documents(keys), st.text(max_size=300))


# Deeper than Python's recursion limit. (The config's pure-Python YAML loader takes ~0.3 s
# to give up on this; on 5,000 levels, 1-4 s.)
DEEP = "[" * 1000 + "]" * 1000


@FUZZ
@given(text=texts([CONFIG_EXAMPLE, MINIMAL_CONFIG], CONFIG_KEYS))
@example(text=CONFIG_EXAMPLE)
@example(text=MINIMAL_CONFIG)
@example(text=DEEP)
@example(text="a: !!python/object/apply:os.system ['true']")
@example(text="workers: 99999999999999999999999999999")
@example(text="inbound: [{listen: 127.0.0.1:99999}]")
@example(text="\ufeffidentity: {}\x00")
def test_parse_config_gives_a_config_or_problems(text: str) -> None:
    try:
        config = parse_config(text, Path("/etc/sidecar/fuzz.yaml"), check_files=False)
    except ProblemsError as exc:
        problems_named(exc)
        return
    assert isinstance(config, Config)


@FUZZ
@given(text=texts([POLICY_EXAMPLE], POLICY_KEYS))
@example(text=POLICY_EXAMPLE)
@example(text=DEEP)
@example(text="rules: [{name: a, action: allow, from: ['spiffe://example.org/*']}]\n"
              "default: allow\nmode: audit")
def test_parse_policy_gives_a_policy_or_problems(text: str) -> None:
    try:
        policy = parse_policy(text, "fuzz-policy.yaml", listeners=["app", "in"])
    except ProblemsError as exc:
        problems_named(exc)
        return
    assert isinstance(policy, Policy)


EXAMPLE_POLICY = parse_policy(
    "default: deny\nrules:\n"
    "  - {name: web, action: allow, from: ['spiffe://example.org/ns/web/*']}\n"
    "  - {name: batch, action: deny, from: ['spiffe://example.org/ns/batch/*'],"
    " to: {listeners: [app]}}\n"
    "  - {name: one, action: allow, from: [spiffe://other.org/ns/a/sa/b]}\n"
    "  - {name: td, action: allow, from: ['spiffe://partner.org/*']}\n",
    "decide.yaml", listeners=["app", "in"])
PEER_IDS = st.one_of(
    st.text(max_size=80),
    st.builds(lambda td, path: f"spiffe://{td}{path}",
              st.sampled_from(["example.org", "Example.ORG", "other.org", "partner.org", "",
                               "exa mple.org", "example.org:443"]),
              st.sampled_from(["", "/", "/ns/web", "/ns/web/", "/ns/web/sa/x", "/ns/webx",
                               "/ns/batch/sa/j", "/ns/a/sa/b", "/./x", "/%41", "//x"])),
)


@FUZZ
@given(peer=PEER_IDS, listener=st.one_of(st.sampled_from(["app", "in", ""]), st.text()))
def test_decide_always_answers(peer: str, listener: str) -> None:
    try:
        peer_id = SpiffeId.parse(peer)  # as authentication does, once per handshake
    except SpiffeIdError:
        return
    decision = EXAMPLE_POLICY.decide(peer_id, listener)
    assert isinstance(decision, Decision)
    assert decision.rule in {*EXAMPLE_POLICY.rule_names, "default", "invalid_peer_id"}


# --- YAML alias bombs -----------------------------------------------------------------------

BOMB_LEVELS = 7  # 9**7 = 4.8 million "lol"s behind a ~500-byte file
# Seconds of this thread's CPU, not of the wall clock: a walk of 4.8 million strings is
# CPU on this thread, and a loaded machine's waits for a core are not the parser's.
BOMB_BUDGET = 0.1  # a linear walk of this file takes a few milliseconds


def alias_bomb(document: dict[str, Any], where: tuple[str | int, ...]) -> str:
    """`document` as flow YAML with a billion-laughs list at `where`: each anchor is a
    list of nine aliases of the one before, so the value is tiny as text and as a parsed
    object graph (PyYAML shares aliased nodes) but 9**levels strings when walked."""
    anchors = ['"x0": &x0 [' + ",".join(['"lol"'] * 9) + "]"]
    anchors += [f'"x{i}": &x{i} [' + ",".join([f"*x{i - 1}"] * 9) + "]"
                for i in range(1, BOMB_LEVELS)]
    node: Any = document
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = "BOMB"
    body = json.dumps(document).replace('"BOMB"', f"*x{BOMB_LEVELS - 1}")
    return "{" + ", ".join(anchors) + ", " + body[1:]


def _config(where: tuple[str | int, ...]) -> str:
    return alias_bomb(json.loads(MINIMAL_CONFIG), where)


def _policy(where: tuple[str | int, ...]) -> str:
    return alias_bomb({"default": "deny", "rules": [
        {"name": "r", "action": "allow", "from": ["spiffe://example.org/x"]}]}, where)


@pytest.mark.parametrize(("load", "where"), [
    pytest.param(_config, ("policy",), id="config.policy"),
    pytest.param(_config, ("identity", "cert"), id="config.identity.cert"),
    pytest.param(_config, ("workers",), id="config.workers"),
    pytest.param(_config, ("inbound", 0, "name"), id="config.inbound.name"),
    pytest.param(_policy, ("mode",), id="policy.mode"),
    pytest.param(_policy, ("rules", 0, "from"), id="policy.rules.from"),
])
def test_an_alias_bomb_is_refused_at_once(
    load: Callable[[tuple[str | int, ...]], str], where: tuple[str | int, ...],
) -> None:
    text = load(where)
    assert len(text) < 1024
    parse: Callable[[str], object] = (
        (lambda t: parse_policy(t, "bomb.yaml")) if load is _policy
        else (lambda t: parse_config(t, Path("/etc/sidecar/bomb.yaml"), check_files=False)))
    start = time.thread_time()
    with pytest.raises(ProblemsError) as refused:
        parse(text)
    elapsed = time.thread_time() - start
    problems_named(refused.value)
    assert elapsed < BOMB_BUDGET, \
        f"{len(text)} bytes of YAML took {elapsed:.2f} s of CPU to refuse"


# --- SPIFFE IDs and the peer's Certificate message -------------------------------------------

SPIFFE_LIKE = st.one_of(
    st.text(max_size=300),
    st.builds(lambda a, b: f"spiffe://{a}{b}", st.text(max_size=40), st.text(max_size=60)),
    st.builds(lambda n: "spiffe://example.org/" + "a/" * n, st.integers(0, 1100)),
    st.builds(lambda n: "spiffe://" + "a" * n + "/x", st.integers(250, 260)),
)


@FUZZ
@given(text=SPIFFE_LIKE)
@example(text="spiffe://example.org/\ud800")
@example(text="spiffe://example.org/" + "a" * 2030)
def test_spiffe_id_parse_raises_only_spiffe_id_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        assert exc.reason
    else:
        assert str(sid) == text
    try:
        TrustDomain.parse(text)
    except SpiffeIdError as exc:
        assert exc.reason


@st.composite
def certificate_messages(draw: st.DrawFn) -> bytes:
    """Certificate handshake messages, well-formed at first and then damaged."""
    certs = draw(st.lists(st.sampled_from([SVID_A.cert, INTERMEDIATE.cert, ROOT.cert]),
                          max_size=12))
    tls13 = draw(st.booleans())
    entries = b""
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        entries += len(der).to_bytes(3) + der
        if tls13:
            ext = draw(st.binary(max_size=8))
            entries += len(ext).to_bytes(2) + ext
    body = (b"\x00" if tls13 else b"") + len(entries).to_bytes(3) + entries
    message = b"\x0b" + len(body).to_bytes(3) + body
    if draw(st.booleans()):
        message = draw(mutated([message]))
    return message


@FUZZ
@given(data=st.one_of(certificate_messages(), st.binary(max_size=600)), tls13=st.booleans())
@example(data=b"\x0b\x00\x00\x04\x00\xff\xff\xff", tls13=True)
@example(data=b"\x0b\x00\x00\x03\x00\x00\x00", tls13=False)
def test_parse_certificate_message_never_raises(data: bytes, tls13: bool) -> None:
    certs = parse_certificate_message(data, tls13=tls13)
    assert isinstance(certs, list)
    assert all(isinstance(c, bytes) and c for c in certs)
    assert len(certs) <= 10  # MAX_KEPT: a long chain must not cost a copy per certificate
    assert sum(map(len, certs)) <= len(data)
