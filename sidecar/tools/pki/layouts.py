"""The on-disk SVID layouts (spiffe-helper, csi, k8s): their file names, and the writer.

`write_svid` reproduces the three layouts the proxy must accept, including the way each
one updates, because the proxy's reload code is tested against exactly those races.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509

from sidecar.tools.pki.ca import utcnow
from sidecar.tools.pki.errors import PkiError
from sidecar.tools.pki.keys import KeyFormat, certs_pem
from sidecar.tools.pki.svid import Svid
from sidecar.tools.pki.writes import write_atomic, write_in_place


class Layout(StrEnum):
    SPIFFE_HELPER = "spiffe-helper"
    CSI = "csi"
    K8S = "k8s"

    @property
    def files(self) -> LayoutFiles:
        if self is Layout.CSI:
            return LayoutFiles(cert="tls.crt", key="tls.key", bundle="ca.crt")
        return LayoutFiles(cert="svid.pem", key="svid_key.pem", bundle="bundle.pem")


@dataclass(frozen=True, slots=True)
class LayoutFiles:
    """The visible file names of a layout."""

    cert: str  # leaf followed by intermediates
    key: str
    bundle: str  # trust anchors


_K8S_DATA = "..data"
_K8S_DATA_TMP = "..data_tmp"


def _new_timestamped_dir(out: Path) -> Path:
    # kubelet's AtomicWriter names them `..2006_01_02_15_04_05.<random digits>`.
    for _ in range(100):
        stamp = utcnow().strftime("..%Y_%m_%d_%H_%M_%S.")
        path = out / f"{stamp}{secrets.randbelow(10**9):09d}"
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue
        path.chmod(0o755)
        return path
    raise PkiError(f"{out}: could not create a fresh timestamped directory")


def _write_k8s(out: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Update like kubelet: new dir, then one atomic rename of the `..data` symlink."""
    for name in files:  # check before touching anything
        visible = out / name
        if visible.exists(follow_symlinks=False) and not visible.is_symlink():
            raise PkiError(
                f"{visible} is a regular file; the k8s layout makes every name a symlink into "
                "..data/, so write it to a directory of its own"
            )
    data_link = out / _K8S_DATA
    old = os.readlink(data_link) if data_link.is_symlink() else None
    new_dir = _new_timestamped_dir(out)
    for name, (content, mode) in files.items():
        write_in_place(new_dir / name, content, mode)  # no reader can see this dir yet
    tmp_link = out / _K8S_DATA_TMP
    tmp_link.unlink(missing_ok=True)  # left over from an interrupted update
    tmp_link.symlink_to(new_dir.name)
    os.replace(tmp_link, data_link)  # the one atomic step: every name flips at once
    for name in files:
        visible = out / name
        if not visible.is_symlink():
            visible.symlink_to(f"{_K8S_DATA}/{name}")
    # Only ever delete a sibling `..` dir we could have made, never what a link points to.
    if old and old != new_dir.name and "/" not in old and old.startswith(".."):
        shutil.rmtree(out / old, ignore_errors=True)


def write_svid(
    out: Path,
    svid: Svid,
    bundle: Sequence[x509.Certificate],
    layout: Layout = Layout.SPIFFE_HELPER,
    *,
    key_format: KeyFormat | str = KeyFormat.PKCS8,
) -> LayoutFiles:
    """Write the SVID, its key (mode 0600) and the bundle into `out`, the layout's way.

    spiffe-helper: each file truncated and rewritten in place, cert, then key, then bundle.
    csi: each file atomically (temp + rename). k8s: a new timestamped dir and an atomic
    swap of the `..data` symlink, the old dir removed after.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = layout.files
    files = {
        names.cert: (svid.chain_pem(), 0o644),
        names.key: (svid.key_pem(key_format), 0o600),
        names.bundle: (certs_pem(bundle), 0o644),
    }
    if layout is Layout.K8S:
        _write_k8s(out, files)
    else:
        write = write_in_place if layout is Layout.SPIFFE_HELPER else write_atomic
        for name, (content, mode) in files.items():
            write(out / name, content, mode)
    return names
