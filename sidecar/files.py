"""Reading the files an identity and a policy come from: regular files only.

A FIFO at a certificate path blocks `open()` until some writer appears, and the thread
that opened it holds the reload that asked (issue 15, item 6). So a file is opened
non-blocking (an open never waits on a FIFO that way), and anything that is not a
regular file once symlinks are followed is refused before a byte is read. Symlinks
themselves are fine: Kubernetes projects every file as `name -> ..data/name`.

What this cannot stop is a regular file on a hung network file system: its read blocks
in the kernel. sources/watch.py bounds every load in time for that case.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegularFileError(OSError):
    """The path resolves to something other than a regular file."""


def read_regular(path: Path) -> bytes:
    """The whole content of the regular file at `path` (symlinks followed).

    Raises FileNotFoundError and other OSErrors as open and read do, and
    NotRegularFileError, whose `strerror` says what the path is and what to do.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode  # of what was opened: no race with a swap after a stat
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFileError(
                0, f"is {kind}, not a regular file; point the setting at the file itself "
                   "(a symlink to a regular file is fine)", str(path))
        return f.read()
