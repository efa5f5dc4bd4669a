"""`x-forwarded-client-cert`, as Envoy writes it: `By=<our SPIFFE ID>;Hash=<hex SHA-256
of the caller's leaf certificate, DER>;URI=<the caller's SPIFFE ID>`.

Envoy's keys, in Envoy's order (By, Hash, ... URI), so an app written for an Envoy mesh
reads it unchanged. The values need no quoting: a SPIFFE ID holds only letters, digits
and `.-_/:`, never `,;="`. Built once per connection: every request on it carries the
same field, and every such field the caller sent is removed (request.py), so a caller
cannot forge an identity.
"""

from __future__ import annotations

import hashlib

NAME = "x-forwarded-client-cert"


def field(by: str, leaf_der: bytes, uri: str) -> bytes:
    """The whole field line, CRLF-terminated."""
    digest = hashlib.sha256(leaf_der).hexdigest()
    return f"{NAME}: By={by};Hash={digest};URI={uri}\r\n".encode("ascii")


def parse(value: str) -> dict[str, str]:
    """One element of the field as a mapping (for tests and tools): `By`, `Hash`, `URI`."""
    out = {}
    for pair in value.split(";"):
        key, _, val = pair.partition("=")
        out[key] = val
    return out
