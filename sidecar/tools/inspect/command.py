"""`sidecar inspect FILE... [--bundle FILE] [--json]`: explain certificates on disk.

This module is the command: it parses the arguments, has the files read and prints the
reports. The analysis is pure and lives in sidecar/tools/inspect/: `read_pem` turns bytes into
certificates (pem.py), and `examine` turns certificates, an optional bundle and `now` into
a `FileReport` of findings (report.py), each named by a `Reason` (with its explanation and
fix from reasons.py), an `SvidRule`, or a `FileProblem`. How a file is read is told in
report.py, the chain walk in chain.py. Reading files lives in files.py and
printing in `main`, and nowhere else. The names other code uses (`main`, `read_pem`,
`examine`, `BundleFile`, `span`, `MAX_CHAIN`, ...) are importable from here as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sidecar.tools.inspect.certview import CertView, KeyInfo, describe, key_info
from sidecar.tools.inspect.chain import MAX_CHAIN, Walk, walk_chain
from sidecar.tools.inspect.files import MAX_FILE_BYTES, load_bundle, read_file
from sidecar.tools.inspect.findings import FileProblem, Finding
from sidecar.tools.inspect.pem import PemContents, read_pem
from sidecar.tools.inspect.render import render_text, to_json
from sidecar.tools.inspect.report import (
    DEFAULT_CLOCK_SKEW_HINT,
    BundleFile,
    ChainEntry,
    FileReport,
    examine,
    intermediates_seen,
    unreadable,
)
from sidecar.tools.inspect.validity import Validity, iso, span, validity

__all__ = [
    "DEFAULT_CLOCK_SKEW_HINT", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "MAX_CHAIN",
    "MAX_FILE_BYTES", "BundleFile", "CertView", "ChainEntry", "FileProblem", "FileReport",
    "Finding", "KeyInfo", "PemContents", "Validity", "Walk", "describe", "examine", "iso",
    "key_info", "main", "read_pem", "render_text", "span", "to_json", "unreadable", "validity",
    "walk_chain",
]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _parse_args(argv: Sequence[str]) -> argparse.Namespace | int:
    from sidecar.config import parse_duration

    def duration(text: str) -> timedelta:
        try:
            return timedelta(seconds=parse_duration(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    p = argparse.ArgumentParser(prog="sidecar inspect", description="Explain certificates: "
                                "SPIFFE ID, SANs, chain, validity, key, and every problem.")
    p.add_argument("files", nargs="+", metavar="FILE", help="PEM files (certs; keys ignored)")
    p.add_argument("--bundle", metavar="FILE", help="check each chain against these CAs")
    p.add_argument("--json", action="store_true", help="one JSON object per file, in a list")
    p.add_argument("--clock-skew-hint", type=duration, default=DEFAULT_CLOCK_SKEW_HINT,
                   metavar="DURATION", help="say 'check the clocks' within this gap (5m)")
    try:
        return p.parse_args(list(argv))
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    if isinstance(args, int):
        return args
    bundle: BundleFile | None = None
    if args.bundle is not None:
        loaded = load_bundle(args.bundle)
        if isinstance(loaded, str):
            print(f"sidecar inspect: --bundle {args.bundle}: {loaded}", file=sys.stderr)
            return EXIT_PROBLEM
        bundle = loaded
    now = datetime.now(UTC)
    read = {path: read_file(path) for path in dict.fromkeys(args.files)}
    parsed = {path: read_pem(d) for path, d in read.items() if isinstance(d, bytes)}
    known = intermediates_seen(bundle, parsed)
    reports = [
        unreadable(path, *d) if isinstance(d, tuple) else
        examine(path, parsed[path], now=now, skew=args.clock_skew_hint, bundle=bundle,
                known_intermediates=known)
        for path, d in read.items()
    ]
    if args.json:
        print(json.dumps([to_json(r) for r in reports], indent=2))
    else:
        print("\n\n".join(render_text(r) for r in reports))
        if len(reports) > 1:
            bad = sum(1 for r in reports if r.problems)
            print(f"\n{len(reports)} files, {bad} with problems")
    return EXIT_PROBLEM if any(r.problems for r in reports) else EXIT_OK
