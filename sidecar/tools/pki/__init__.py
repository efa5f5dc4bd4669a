"""A development PKI: root and intermediate CAs, X.509-SVIDs, CRLs, and the on-disk layouts.

Three users share it. The CLI (`sidecar pki init|issue|rotate`) and the demo need good
certificates. The test suite needs deliberately bad ones, so `issue_svid` has a keyword for
every X.509-SVID rule a test may want to break (expired, not yet valid, no URI SAN, two URI
SANs, a CA leaf, no digitalSignature, a forged signature, a missing intermediate). Nothing
here checks the SVID rules: that is `spiffe.py`'s job, and this package must be able to
build what that one rejects.

The modules, each importing only those above it:
- `errors.py`: `PkiError`. `keys.py`: key types, generation, PEM forms.
  `writes.py`: replacing a file in place or atomically.
- `ca.py`: root and intermediate CAs (and how chains are carried).
- `svid.py`: issuing X.509-SVIDs. `crl.py`: issuing and writing CRLs.
- `layouts.py`: the spiffe-helper, csi and k8s layouts and `write_svid`.
  `cadir.py`: the on-disk dev CA. `broken.py`: the `--broken` SVIDs.
- `commands.py`: `sidecar pki init|issue|rotate`.
"""

from __future__ import annotations

from sidecar.tools.pki.broken import Broken
from sidecar.tools.pki.ca import (
    CA,
    CLOCK_SKEW_BACKDATE,
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_ROOT_TTL,
    make_key_usage,
    new_intermediate,
    new_root,
    new_serial,
    trust_domain_of,
)
from sidecar.tools.pki.cadir import (
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    ROOT_KEY,
    init_ca_dir,
    load_ca_dir,
)
from sidecar.tools.pki.commands import cmd_init, cmd_issue, cmd_rotate
from sidecar.tools.pki.crl import crl_pem, issue_crl, write_crl
from sidecar.tools.pki.errors import PkiError
from sidecar.tools.pki.keys import KeyFormat, KeyType, PrivateKey, certs_pem, key_pem, new_key
from sidecar.tools.pki.layouts import Layout, LayoutFiles, write_svid
from sidecar.tools.pki.svid import DEFAULT_SVID_TTL, SVID_SUBJECT, Svid, issue_svid

__all__ = [
    "CA",
    "CLOCK_SKEW_BACKDATE",
    "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SVID_TTL",
    "INTERMEDIATE_CERT",
    "INTERMEDIATE_KEY",
    "ROOT_CERT",
    "ROOT_KEY",
    "SVID_SUBJECT",
    "Broken",
    "KeyFormat",
    "KeyType",
    "Layout",
    "LayoutFiles",
    "PkiError",
    "PrivateKey",
    "Svid",
    "certs_pem",
    "cmd_init",
    "cmd_issue",
    "cmd_rotate",
    "crl_pem",
    "init_ca_dir",
    "issue_crl",
    "issue_svid",
    "key_pem",
    "load_ca_dir",
    "make_key_usage",
    "new_intermediate",
    "new_key",
    "new_root",
    "new_serial",
    "trust_domain_of",
    "write_crl",
    "write_svid",
]
