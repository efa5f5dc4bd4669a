"""The disk: the only place `sidecar inspect` opens files, bounded in size, errors in words."""

from __future__ import annotations

from sidecar import svid
from sidecar.tools.inspect.findings import FileProblem
from sidecar.tools.inspect.pem import read_pem
from sidecar.tools.inspect.report import BundleFile, no_certificate

# Mozilla's whole CA bundle is ~220 KB; a larger file is not a certificate file, and
# reading it whole would only let a wrong path (a log, a disk image) eat memory.
MAX_FILE_BYTES = 4 * 1024 * 1024


def read_file(path: str) -> bytes | tuple[FileProblem, str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return FileProblem.FILE_NOT_FOUND, "file not found: check the path (and the volume mount)"
    except IsADirectoryError:
        return FileProblem.FILE_UNREADABLE, "is a directory; name the certificate file in it"
    except OSError as exc:
        return FileProblem.FILE_UNREADABLE, f"cannot read: {exc.strerror}"
    if len(data) > MAX_FILE_BYTES:
        return FileProblem.FILE_UNREADABLE, (f"larger than {MAX_FILE_BYTES} bytes: not a "
                                             "certificate file")
    return data


def load_bundle(path: str) -> BundleFile | str:
    data = read_file(path)
    if isinstance(data, tuple):
        return data[1]
    contents = read_pem(data)
    if contents.damage:
        return "; ".join(contents.damage)
    if not contents.certs:
        return no_certificate(contents)
    for n, cert in enumerate(contents.certs, 1):
        for p in svid.ca_problems(cert):
            return f"certificate {n} is not a usable CA ({p.message}); sidecar refuses this bundle"
    return BundleFile(path, contents.certs)
