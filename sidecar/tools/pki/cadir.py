"""The on-disk dev CA: a directory holding a root and an intermediate with their keys, as
`sidecar pki init` writes it and `pki issue`/`pki rotate` load it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.tools.pki.ca import CA, new_intermediate, new_root, trust_domain_of
from sidecar.tools.pki.errors import PkiError
from sidecar.tools.pki.keys import KeyType, PrivateKey, certs_pem, key_pem
from sidecar.tools.pki.writes import write_atomic

ROOT_CERT = "root.pem"
ROOT_KEY = "root_key.pem"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate_key.pem"
_CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY)


def _init_hint(directory: Path) -> str:
    return f"run `sidecar pki init --dir {directory} --trust-domain TD` first"


def init_ca_dir(
    directory: Path,
    trust_domain: str,
    *,
    key_type: KeyType = KeyType.EC_P256,
    force: bool = False,
    now: datetime | None = None,
) -> tuple[CA, CA]:
    """Create a root and an intermediate in `directory`; returns (root, intermediate).

    A directory this creates gets mode 0700 (it holds CA keys); an existing one keeps its
    mode, since it may be the user's working directory.
    """
    present = [n for n in _CA_FILES if (directory / n).exists(follow_symlinks=False)]
    if present and not force:
        raise PkiError(
            f"{directory} already holds a CA ({', '.join(present)}); refusing to overwrite it, "
            "since every SVID it issued would stop verifying. Use --force to replace it."
        )
    root = new_root(trust_domain, key_type=key_type, now=now)
    intermediate = new_intermediate(root, key_type=key_type, now=now)
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened
    # Keys first: a crash in between leaves keys without certs, which load_ca_dir reports,
    # never a certificate whose key is lost.
    write_atomic(directory / ROOT_KEY, key_pem(root.key), 0o600)
    write_atomic(directory / INTERMEDIATE_KEY, key_pem(intermediate.key), 0o600)
    write_atomic(directory / ROOT_CERT, certs_pem([root.cert]), 0o644)
    write_atomic(directory / INTERMEDIATE_CERT, certs_pem([intermediate.cert]), 0o644)
    return root, intermediate


def _load_pair(
    directory: Path, cert_name: str, key_name: str
) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / cert_name).read_bytes())
    except ValueError as e:
        raise PkiError(f"{directory / cert_name}: not a PEM certificate ({e})") from e
    try:
        key = serialization.load_pem_private_key((directory / key_name).read_bytes(), None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{directory / key_name}: not an unencrypted PEM private key ({e})") from e
    supported = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    if not isinstance(key, supported):
        raise PkiError(f"{directory / key_name}: unsupported key type {type(key).__name__}")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise PkiError(f"{directory / key_name} is not the key of {directory / cert_name}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise PkiError(f"{directory / cert_name} is not a CA certificate (no cA=true)")
    return cert, key


def load_ca_dir(directory: Path) -> tuple[CA, CA]:
    """Load (root, intermediate) written by `init_ca_dir`, with errors that say what to do."""
    if not directory.is_dir():
        raise PkiError(f"{directory} is not a directory; {_init_hint(directory)}")
    missing = [n for n in _CA_FILES if not (directory / n).is_file()]
    if missing:
        raise PkiError(
            f"{directory} is not a CA directory (missing {', '.join(missing)}); "
            f"{_init_hint(directory)}"
        )
    root_cert, root_key = _load_pair(directory, ROOT_CERT, ROOT_KEY)
    int_cert, int_key = _load_pair(directory, INTERMEDIATE_CERT, INTERMEDIATE_KEY)
    if not trust_domain_of(root_cert):
        raise PkiError(
            f"{directory / ROOT_CERT} has no spiffe:// URI SAN, so its trust domain is "
            "unknown; re-create the CA with `sidecar pki init --force`"
        )
    try:
        int_cert.verify_directly_issued_by(root_cert)
    except Exception as e:  # ValueError, TypeError or InvalidSignature: all mean "not ours"
        raise PkiError(
            f"{directory / INTERMEDIATE_CERT} was not issued by {directory / ROOT_CERT}; "
            "the directory mixes two CAs: re-create it with `sidecar pki init --force`"
        ) from e
    root = CA(cert=root_cert, key=root_key)
    return root, CA(cert=int_cert, key=int_key, chain=(), root=root_cert)
