"""Reading PEM (pure: bytes in): every certificate of a file, keys counted, damage named."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True, slots=True)
class PemContents:
    certs: tuple[x509.Certificate, ...]
    private_keys: int  # counted, never decoded
    damage: tuple[str, ...]  # truncated or unparsable blocks
    other_blocks: tuple[str, ...]  # labels of blocks that are neither (CRL, PUBLIC KEY...)
    size: int


_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")


def read_pem(data: bytes) -> PemContents:
    """Every certificate of a PEM file (or of one DER certificate), in file order."""
    certs: list[x509.Certificate] = []
    damage: list[str] = []
    others: list[str] = []
    keys = 0
    pos = 0
    count = 0
    while (begin := _BEGIN.search(data, pos)) is not None:
        count += 1
        label = begin.group(1).decode()
        end_line = b"-----END " + begin.group(1) + b"-----"
        # A body never holds five dashes, so a truncated block cannot swallow the next one.
        body_end = data.find(b"-----", begin.end())
        if body_end == -1 or not data.startswith(end_line, body_end):
            damage.append(f"block {count} ({label}) has no END line: the file is truncated "
                          "(half-written, or cut when copied)")
            pos = begin.end()
            continue
        pos = body_end + len(end_line)
        if "PRIVATE KEY" in label:
            keys += 1
        elif label != "CERTIFICATE":
            others.append(label)
        else:
            cert = _certificate_from_base64(data[begin.end() : body_end])
            if isinstance(cert, str):
                damage.append(f"block {count} (CERTIFICATE) {cert}")
            else:
                certs.append(cert)
    if count == 0 and data[:1] == b"\x30":  # no PEM at all: maybe one DER certificate
        try:
            certs.append(x509.load_der_x509_certificate(data))
        except ValueError:
            pass  # reported as "no certificate" by examine
    return PemContents(tuple(certs), keys, tuple(damage), tuple(others), len(data))


def _certificate_from_base64(body: bytes) -> x509.Certificate | str:
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        return "is not valid base64: the file is damaged"
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return f"is not a valid certificate ({str(exc)[:120]})"
