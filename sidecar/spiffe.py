"""SPIFFE IDs and trust domains, as pure functions over plain values (svid.py holds the
X.509-SVID rules).

Source: the SPIFFE-ID spec (spiffe/spiffe `standards/SPIFFE-ID.md`). Nothing here touches
a socket, a file or `ssl`.

Case: the spec only allows lowercase trust domains, so `SpiffeId.parse` rejects
`spiffe://Example.org/x` as a certificate's SPIFFE ID. A trust domain typed by a human
(the config's, or a `SpiffePattern`'s: a policy's `from`, a route's `expect_ids`) is a
different matter: `TrustDomain.parse` and `SpiffePattern.parse` fold ASCII letters to
lowercase, because the names compare case-insensitively and refusing `Example.org` there
only punishes a harmless spelling. Only ASCII is folded: `str.lower()` maps U+212A KELVIN SIGN
to a plain `k`, which would let a look-alike name fold into a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SCHEME_PREFIX = "spiffe://"

# SPIFFE-ID spec 2.3: implementations must support IDs up to 2048 bytes and RFC 3986 caps
# a host at 255, so these are the largest values every other SPIFFE implementation accepts.
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

# The whole grammar in one expression, compiled once: a valid ID is matched in one call and
# only an invalid one pays for the rule-by-rule explanation in `_id_problem`.
_ID_RE = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
# Folding goes through this table, never str.lower(): see the module docstring.
_ASCII_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SHOWN_CHARS = 120  # error messages quote at most this much of an input


def quoted(value: str) -> str:
    """The input as an error message quotes it: repr, cut so a 1 MB input stays readable."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return repr(value[:_SHOWN_CHARS]) + f"... ({len(value)} chars)"


def _utf8_len(value: str) -> int:
    # surrogatepass: an arbitrary Python str may hold lone surrogates, and a length check
    # must not be the thing that raises.
    return len(value.encode("utf-8", "surrogatepass"))


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID or trust domain; `reason` names the broken rule."""

    def __init__(self, value: str, reason: str, *, kind: str = "SPIFFE ID") -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"{quoted(value)} is not a {kind}: {reason}")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain. Build it with `parse`; the constructor trusts its input."""

    name: str  # lowercase, e.g. "example.org"

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """A trust domain as written in config: `example.org` or `spiffe://example.org`.

        ASCII letters are folded to lowercase (see the module docstring for why).
        """
        name = text.removeprefix(SCHEME_PREFIX) if text.startswith(SCHEME_PREFIX) else text
        name = name.translate(_ASCII_UPPER_TO_LOWER)
        reason = (
            "a trust domain has no path: write just the name, e.g. example.org"
            if "/" in name
            else _trust_domain_problem(name)
        )
        if reason is not None:
            raise SpiffeIdError(text, reason, kind="trust domain")
        return cls(name)

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.name

    @property
    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself (empty path)."""
        return SpiffeId(self, "")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID. Build it with `parse`; the constructor trusts its input."""

    trust_domain: TrustDomain
    path: str  # "" or "/seg/seg"; never a trailing "/"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse exactly per the SPIFFE-ID spec; raise `SpiffeIdError` naming the rule."""
        match = _ID_RE.fullmatch(text)
        # The regex is the grammar; what it cannot express (lengths, dot segments) is
        # checked here. "/." only occurs when some segment starts with a dot, which is rare.
        if match is not None and len(text) <= MAX_ID_BYTES:
            name, path = match.group(1, 2)
            if len(name) <= MAX_TRUST_DOMAIN_BYTES and ("/." not in path or _no_dot_segment(path)):
                return cls(TrustDomain(name), path)
        raise SpiffeIdError(text, _id_problem(text))

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain


WILDCARD = "/*"  # a pattern's last segment: every ID under what precedes it


class PatternKind(StrEnum):
    EXACT = "exact"  # spiffe://td/a/b: that ID alone
    PREFIX = "prefix"  # spiffe://td/a/b/*: every ID strictly under /a/b, on a segment boundary
    TRUST_DOMAIN = "trust_domain"  # spiffe://td/*: every workload ID of the trust domain


@dataclass(frozen=True, slots=True)
class SpiffePattern:
    """Which peers a rule names: the policy's `from`, a route's `expect_ids`, `--expect-id`.

    Build it with `parse`; the constructor trusts its input. Patterns are typed by humans,
    so their trust domain folds to lowercase as `TrustDomain.parse` does (see the module
    docstring); the IDs they are matched against come from certificates and are lowercase
    already, so matching compares trust domains case-insensitively at no cost.
    """

    kind: PatternKind
    trust_domain: TrustDomain
    path: str  # exact: the ID's path; prefix: the path IDs are strictly under; else ""

    @classmethod
    def parse(cls, text: str, *, prefixes: bool = True) -> SpiffePattern:
        """An exact ID, `spiffe://td/a/b/*` (only if `prefixes`) or `spiffe://td/*`; raise
        `SpiffeIdError` saying which rule broke. An entry no valid ID could ever match
        (`/a//b`, `/a/../b`, a trailing `/`, a trust domain alone) is refused here rather
        than failing every connection later."""
        folded = _fold_trust_domain_case(text)
        wildcard = folded.endswith(WILDCARD) and len(folded) > len(SCHEME_PREFIX + WILDCARD)
        base = folded[: -len(WILDCARD)] if wildcard else folded
        if "*" in base:
            raise SpiffeIdError(text, _star_problem(base, prefixes), kind="SPIFFE ID pattern")
        try:
            sid = SpiffeId.parse(base)
        except SpiffeIdError as error:
            if wildcard:
                raise SpiffeIdError(text, error.reason, kind="SPIFFE ID prefix") from None
            hint = "; to match IDs under a path, end it with /*" if base.endswith("/") else ""
            raise SpiffeIdError(text, error.reason + hint) from None
        if not wildcard:
            if not sid.path:
                raise SpiffeIdError(text, "it names a trust domain, which no workload presents; "
                                    f"write '{text}/*' to match every ID of the trust domain")
            return cls(PatternKind.EXACT, sid.trust_domain, sid.path)
        if not sid.path:
            return cls(PatternKind.TRUST_DOMAIN, sid.trust_domain, "")
        if not prefixes:
            raise SpiffeIdError(text, _star_problem(base, prefixes), kind="SPIFFE ID pattern")
        return cls(PatternKind.PREFIX, sid.trust_domain, sid.path)

    def matches(self, sid: SpiffeId) -> bool:
        """Does the workload `sid` fall under this pattern? (A trust domain's own ID, with
        no path, is no workload: only an exact pattern could name it, and none does.)"""
        if sid.trust_domain != self.trust_domain or not sid.path:
            return False
        if self.kind is PatternKind.EXACT:
            return sid.path == self.path
        if self.kind is PatternKind.PREFIX:  # under it on a segment boundary: /a/b/c, not /a/bc
            cut = len(self.path)
            return len(sid.path) > cut and sid.path[cut] == "/" and sid.path.startswith(self.path)
        return True

    @property
    def key(self) -> str:
        """`trust domain + path`: what the policy's index is keyed by."""
        return self.trust_domain.name + self.path

    def __str__(self) -> str:
        base = SCHEME_PREFIX + self.trust_domain.name + self.path
        return base if self.kind is PatternKind.EXACT else base + WILDCARD


def _star_problem(base: str, prefixes: bool) -> str:
    if prefixes:
        return ("'*' is allowed only as a final '/*', as in spiffe://example.org/ns/batch/* "
                "or spiffe://example.org/*")
    domain = base.removeprefix(SCHEME_PREFIX).partition("/")[0]
    return (f"a wildcard must be the whole path, spiffe://{domain}/*, which accepts any "
            "workload of that trust domain")


def _fold_trust_domain_case(text: str) -> str:
    """`text` with the trust domain part of an ID-shaped string lowercased (ASCII only)."""
    if not text.startswith(SCHEME_PREFIX):
        return text
    end = text.find("/", len(SCHEME_PREFIX))
    if end == -1:
        end = len(text)
    authority = text[len(SCHEME_PREFIX) : end]
    return SCHEME_PREFIX + authority.translate(_ASCII_UPPER_TO_LOWER) + text[end:]


def _no_dot_segment(path: str) -> bool:
    return all(segment not in (".", "..") for segment in path.split("/"))


def _bad_char(text: str, pattern: re.Pattern[str]) -> str:
    """The first character of `text` that `pattern` (one class, repeated) rejects."""
    for char in text:
        if pattern.fullmatch(char) is None:
            return ascii(char)  # a look-alike such as U+212A shows as its escape, not as K
    return "?"  # unreachable when called on text the pattern rejected


def _trust_domain_problem(name: str) -> str | None:
    if not name:
        return "the trust domain is missing (write spiffe://example.org/...)"
    if name.startswith("["):
        return "the trust domain must be a name, not a bracketed IP literal"
    if "@" in name:
        return "the trust domain must not carry userinfo (the part before '@')"
    if ":" in name:
        return "the trust domain must not carry a port (no ':' allowed)"
    if _TRUST_DOMAIN_RE.fullmatch(name) is None:
        if any("A" <= char <= "Z" for char in name) and _TRUST_DOMAIN_RE.fullmatch(name.lower()):
            return "the trust domain must be lowercase (the SPIFFE spec allows a-z 0-9 . - _)"
        return (
            f"the trust domain holds {_bad_char(name, _TRUST_DOMAIN_RE)}; only lowercase "
            "a-z 0-9 . - _ are allowed"
        )
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        return f"the trust domain is {len(name)} bytes, more than {MAX_TRUST_DOMAIN_BYTES}"
    return None


def _path_problem(path: str) -> str | None:
    if path.endswith("/"):
        return "the path must not end with '/'"
    for segment in path[1:].split("/"):
        if not segment:
            return "the path has an empty segment ('//')"
        if segment in (".", ".."):
            return f"the path has a {segment!r} segment; dot segments are not allowed"
        if _SEGMENT_RE.fullmatch(segment) is None:
            return (
                f"the path holds {_bad_char(segment, _SEGMENT_RE)}; path segments allow only "
                "a-z A-Z 0-9 . - _"
            )
    return None


def _id_problem(text: str) -> str:
    """Why `text` is not a SPIFFE ID, checking the rules in the order a reader would."""
    if not text:
        return "it is empty"
    if not text.startswith(SCHEME_PREFIX):
        scheme, sep, _ = text.partition("://")
        if sep and scheme.lower() == "spiffe":
            return "the scheme must be written in lowercase: spiffe://"
        if sep:
            return f"the scheme must be spiffe, not {quoted(scheme)}"
        return "it must start with spiffe://"
    rest = text[len(SCHEME_PREFIX) :]
    if "?" in rest:
        return "it must not have a query ('?')"
    if "#" in rest:
        return "it must not have a fragment ('#')"
    if "%" in rest:
        return "it must not hold percent-encoding ('%'); SPIFFE IDs are plain ASCII"
    name, slash, path = rest.partition("/")
    reason = _trust_domain_problem(name) or (_path_problem(slash + path) if slash else None)
    if reason is not None:
        return reason
    size = _utf8_len(text)
    if size > MAX_ID_BYTES:
        return f"it is {size} bytes, more than {MAX_ID_BYTES}"
    return "it breaks the SPIFFE ID grammar"  # unreachable: every rule is named above
