"""SPIFFE IDs, trust domains and the X.509-SVID rules, as pure functions over plain values.

Sources: the SPIFFE-ID spec (spiffe/spiffe `standards/SPIFFE-ID.md`) and the X.509-SVID
spec (`standards/X509-SVID.md`). Nothing here touches a socket, a file or `ssl`: chain
validation belongs to OpenSSL in the handshake; this module answers "is this verified
leaf a well-formed SVID, and whose is it?".

Case: the spec only allows lowercase trust domains, so `SpiffeId.parse` rejects
`spiffe://Example.org/x` as a certificate's SPIFFE ID. A trust domain typed by a human into
the config is a different matter: `TrustDomain.parse` folds ASCII letters to lowercase,
because the names compare case-insensitively and refusing `Example.org` there only
punishes a harmless spelling. Only ASCII is folded: `str.lower()` maps U+212A KELVIN SIGN
to a plain `k`, which would let a look-alike name fold into a real one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

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


def _shown(value: str) -> str:
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
        super().__init__(f"{_shown(value)} is not a {kind}: {reason}")


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


def fold_trust_domain_case(text: str) -> str:
    """`text` with the trust domain part of an ID-shaped string lowercased (ASCII only).

    For comparing an ID that was already authenticated against configured ones, where the
    trust domain compares case-insensitively; the result still has to pass `SpiffeId.parse`.
    """
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
            return f"the scheme must be spiffe, not {_shown(scheme)}"
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


# --- X.509-SVID rules -------------------------------------------------------------------


class SvidRule(StrEnum):
    """One X.509-SVID rule; the values are stable names for logs, `inspect --json` and tests."""

    MALFORMED_EXTENSIONS = "malformed_extensions"
    URI_SAN_COUNT = "uri_san_count"
    URI_SAN_SCHEME = "uri_san_scheme"
    INVALID_SPIFFE_ID = "invalid_spiffe_id"
    SPIFFE_ID_WITHOUT_PATH = "spiffe_id_without_path"
    LEAF_IS_CA = "leaf_is_ca"
    KEY_USAGE_MISSING = "key_usage_missing"
    KEY_USAGE_NOT_CRITICAL = "key_usage_not_critical"
    NO_DIGITAL_SIGNATURE = "no_digital_signature"
    KEY_CERT_SIGN_ON_LEAF = "key_cert_sign_on_leaf"
    CRL_SIGN_ON_LEAF = "crl_sign_on_leaf"
    EKU_MISSING_SERVER_OR_CLIENT_AUTH = "eku_missing_server_or_client_auth"
    CA_FLAG_MISSING = "ca_flag_missing"
    CA_KEY_CERT_SIGN_MISSING = "ca_key_cert_sign_missing"


@dataclass(frozen=True, slots=True)
class SvidProblem:
    rule: SvidRule
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return self.message


class SvidError(ValueError):
    """A certificate breaks X.509-SVID rules; `problems` lists every one."""

    def __init__(self, problems: list[SvidProblem]) -> None:
        self.problems: tuple[SvidProblem, ...] = tuple(problems)
        super().__init__("; ".join(p.message for p in self.problems))


@dataclass(frozen=True, slots=True)
class _Extensions:
    """The extensions the SVID rules look at, gathered in one pass."""

    uris: tuple[str, ...]
    is_ca: bool  # basicConstraints cA; absent means False (RFC 5280 4.2.1.9)
    key_usage: x509.KeyUsage | None
    key_usage_critical: bool
    eku: x509.ExtendedKeyUsage | None


def _gather(cert: x509.Certificate) -> _Extensions | SvidProblem:
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        return SvidProblem(
            SvidRule.MALFORMED_EXTENSIONS,
            f"the certificate's extensions cannot be parsed ({error}); reissue it",
        )
    uris: tuple[str, ...] = ()
    is_ca = False
    key_usage: x509.KeyUsage | None = None
    key_usage_critical = False
    eku: x509.ExtendedKeyUsage | None = None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            uris = tuple(value.get_values_for_type(x509.UniformResourceIdentifier))
        elif isinstance(value, x509.BasicConstraints):
            is_ca = value.ca
        elif isinstance(value, x509.KeyUsage):
            key_usage, key_usage_critical = value, ext.critical
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = value
    return _Extensions(uris, is_ca, key_usage, key_usage_critical, eku)


def _leaf_id(uris: tuple[str, ...]) -> SpiffeId | SvidProblem:
    if len(uris) != 1:
        listed = f" ({', '.join(_shown(u) for u in uris)})" if uris else ""
        return SvidProblem(
            SvidRule.URI_SAN_COUNT,
            f"the certificate has {len(uris)} URI SANs{listed}; an X.509-SVID carries exactly "
            "one, its SPIFFE ID: reissue it with a single spiffe:// URI SAN",
        )
    uri = uris[0]
    scheme = uri.partition(":")[0]
    if scheme.lower() != "spiffe":
        return SvidProblem(
            SvidRule.URI_SAN_SCHEME,
            f"the URI SAN {_shown(uri)} is not a spiffe:// URI; an X.509-SVID's only URI SAN "
            "is its SPIFFE ID: reissue it with one",
        )
    try:
        spiffe_id = SpiffeId.parse(uri)
    except SpiffeIdError as error:
        return SvidProblem(
            SvidRule.INVALID_SPIFFE_ID,
            f"the URI SAN {error}; reissue the certificate with a valid SPIFFE ID",
        )
    if not spiffe_id.path:
        return SvidProblem(
            SvidRule.SPIFFE_ID_WITHOUT_PATH,
            f"the SPIFFE ID {_shown(uri)} names the trust domain itself; a leaf SVID's ID "
            "must have a path (X.509-SVID 5.2), e.g. spiffe://example.org/ns/default/sa/app",
        )
    return spiffe_id


def _leaf_usage_problems(ext: _Extensions) -> list[SvidProblem]:
    problems: list[SvidProblem] = []
    if ext.is_ca:
        problems.append(
            SvidProblem(
                SvidRule.LEAF_IS_CA,
                "the certificate is a CA (basicConstraints cA=true); a CA certificate must not "
                "be used to authenticate: present a leaf SVID (cA=false) issued by that CA",
            )
        )
    usage = ext.key_usage
    if usage is None:
        problems.append(
            SvidProblem(
                SvidRule.KEY_USAGE_MISSING,
                "the certificate has no keyUsage extension; an X.509-SVID must have one, "
                "critical, with digitalSignature: reissue it",
            )
        )
        return problems
    if not ext.key_usage_critical:
        problems.append(
            SvidProblem(
                SvidRule.KEY_USAGE_NOT_CRITICAL,
                "the keyUsage extension is not marked critical; the X.509-SVID spec requires "
                "it: reissue the certificate",
            )
        )
    if not usage.digital_signature:
        problems.append(
            SvidProblem(
                SvidRule.NO_DIGITAL_SIGNATURE,
                "keyUsage lacks digitalSignature, which a TLS leaf needs to sign the handshake: "
                "reissue the certificate with it",
            )
        )
    if usage.key_cert_sign:
        problems.append(
            SvidProblem(
                SvidRule.KEY_CERT_SIGN_ON_LEAF,
                "keyUsage has keyCertSign, which only CA certificates may have: reissue the "
                "leaf without it",
            )
        )
    if usage.crl_sign:
        problems.append(
            SvidProblem(
                SvidRule.CRL_SIGN_ON_LEAF,
                "keyUsage has cRLSign, which only CA certificates may have: reissue the leaf "
                "without it",
            )
        )
    return problems


def _eku_problem(eku: x509.ExtendedKeyUsage | None) -> SvidProblem | None:
    # The spec makes the extension optional but, when present, requires both purposes:
    # a sidecar's SVID is a server certificate inbound and a client certificate outbound.
    if eku is None:
        return None
    missing = [
        name
        for oid, name in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        )
        if oid not in eku
    ]
    if not missing:
        return None
    return SvidProblem(
        SvidRule.EKU_MISSING_SERVER_OR_CLIENT_AUTH,
        f"extendedKeyUsage lacks {' and '.join(missing)}; an X.509-SVID with this extension "
        "must have both serverAuth and clientAuth: reissue it with both (or without the "
        "extension)",
    )


def _examine_leaf(cert: x509.Certificate) -> tuple[SpiffeId | None, list[SvidProblem]]:
    ext = _gather(cert)
    if isinstance(ext, SvidProblem):
        return None, [ext]
    found = _leaf_id(ext.uris)
    problems = [found] if isinstance(found, SvidProblem) else []
    problems += _leaf_usage_problems(ext)
    eku_problem = _eku_problem(ext.eku)
    if eku_problem is not None:
        problems.append(eku_problem)
    return (found if isinstance(found, SpiffeId) else None), problems


def svid_problems(cert: x509.Certificate) -> list[SvidProblem]:
    """Every X.509-SVID leaf rule `cert` breaks; empty when it is a valid leaf SVID."""
    return _examine_leaf(cert)[1]


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a verified peer leaf; raise `SvidError` if it breaks any SVID rule.

    Authentication calls this on every full handshake, so it reads the extensions once.
    """
    spiffe_id, problems = _examine_leaf(cert)
    if problems or spiffe_id is None:
        raise SvidError(problems)
    return spiffe_id


def ca_problems(cert: x509.Certificate) -> list[SvidProblem]:
    """Every rule a trust-bundle or intermediate CA certificate breaks (cA, keyCertSign)."""
    ext = _gather(cert)
    if isinstance(ext, SvidProblem):
        return [ext]
    problems: list[SvidProblem] = []
    if not ext.is_ca:
        problems.append(
            SvidProblem(
                SvidRule.CA_FLAG_MISSING,
                "the certificate is not a CA (basicConstraints cA is not true), so it cannot "
                "anchor or sign SVIDs: put only CA certificates in a bundle",
            )
        )
    if ext.key_usage is None or not ext.key_usage.key_cert_sign:
        problems.append(
            SvidProblem(
                SvidRule.CA_KEY_CERT_SIGN_MISSING,
                "the CA certificate's keyUsage lacks keyCertSign, so it may not sign "
                "certificates: reissue the CA with keyCertSign",
            )
        )
    return problems
