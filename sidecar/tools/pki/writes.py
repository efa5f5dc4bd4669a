"""The two ways the dev PKI replaces a file: rewritten in place (readers may see the gap) or
atomically (readers see the old or the new file, whole)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_in_place(path: Path, data: bytes, mode: int) -> None:
    """Truncate and rewrite the same inode, as spiffe-helper does (readers see the gap)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed a new file; an old one kept its mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a temp file beside `path` and rename it over: readers see old or new, whole."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)  # a crash after the rename must not leave an empty file behind it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
