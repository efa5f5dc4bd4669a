"""`sidecar inspect FILE... [--bundle FILE] [--json]`: explain certificates on disk; with
`--workload-api ADDR [--spiffe-id ID]` (or `-c CONFIG` naming an agent), what a SPIFFE
Workload API agent hands out (workload.py); with `-c CONFIG` naming files, those files.

This module is the command: it parses the arguments, has the files read and prints the
reports. The analysis is pure and lives in sidecar/tools/inspect/: `read_pem` turns bytes into
certificates (pem.py), and `examine` turns certificates, an optional bundle and `now` into
a `FileReport` of findings (report.py), each named by a `Reason` (with its explanation and
fix from reasons.py), an `SvidRule`, or a `FileProblem`. How a file is read is told in
report.py, the chain walk in chain.py. Reading files lives in files.py and
printing in this module, and nowhere else. The names other code uses (`main`, `read_pem`,
`examine`, `BundleFile`, `span`, `MAX_CHAIN`, ...) are importable from here as before.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sidecar.problems import ProblemsError
from sidecar.tools import identity_source
from sidecar.tools.inspect.certview import CertView, KeyInfo, describe, key_info
from sidecar.tools.inspect.chain import MAX_CHAIN, Walk, walk_chain
from sidecar.tools.inspect.files import MAX_FILE_BYTES, load_bundle, read_file
from sidecar.tools.inspect.findings import FileProblem, Finding
from sidecar.tools.inspect.pem import PemContents, read_pem
from sidecar.tools.inspect.render import answer_json, answer_text, render_text, to_json
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
from sidecar.tools.inspect.workload import examine_answer

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
                                "SPIFFE ID, SANs, chain, validity, key, and every problem. "
                                "From files, from what a SPIFFE Workload API agent hands "
                                "out (--workload-api), or from a sidecar config's identity "
                                "(-c).")
    p.add_argument("files", nargs="*", metavar="FILE", help="PEM files (certs; keys ignored)")
    p.add_argument("--bundle", metavar="FILE", help="check each chain against these CAs")
    identity_source.add_arguments(p, "FILE and --bundle")
    p.add_argument("--json", action="store_true", help="one JSON object per file, in a list "
                   "(with --workload-api: one object for the agent's answer)")
    p.add_argument("--clock-skew-hint", type=duration, default=DEFAULT_CLOCK_SKEW_HINT,
                   metavar="DURATION", help="say 'check the clocks' within this gap (5m)")
    try:
        args = p.parse_args(list(argv))
        identity_source.check_exclusive(p, args, {"FILE": args.files, "--bundle": args.bundle})
        if not args.files and args.workload_api is None and args.config is None:
            p.error("nothing to inspect: give FILE..., --workload-api ADDR or -c FILE")
        return args
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    if isinstance(args, int):
        return args
    try:
        source = identity_source.from_args(args)
    except identity_source.SourceError as exc:
        return _failed(exc)
    if isinstance(source, identity_source.AgentSource):
        return _inspect_answer(source, args)
    if isinstance(source, identity_source.FileSource):
        # Our SVID against our bundle; each bundle on its own as a CA file: a federated
        # one is never checked against ours (they are never merged).
        plan: dict[str, str | None] = {str(source.cert): str(source.bundle),
                                       str(source.bundle): None}
        plan |= {str(path): None for path in source.federated.values()}
        return _inspect_files(plan, f"identity.bundle of {source.config}", args)
    return _inspect_files({path: args.bundle for path in args.files}, "--bundle", args)


def _failed(exc: identity_source.SourceError) -> int:
    print(f"sidecar inspect: {exc}", file=sys.stderr)
    return EXIT_USAGE if exc.usage else EXIT_PROBLEM


def _inspect_files(plan: dict[str, str | None], bundle_flag: str,
                   args: argparse.Namespace) -> int:
    """Each file of `plan`, checked against the bundle it maps to (None: on its own)."""
    bundles: dict[str, BundleFile] = {}
    for path in dict.fromkeys(b for b in plan.values() if b is not None):
        loaded = load_bundle(path)
        if isinstance(loaded, str):
            print(f"sidecar inspect: {bundle_flag} {path}: {loaded}", file=sys.stderr)
            return EXIT_PROBLEM
        bundles[path] = loaded
    now = datetime.now(UTC)
    read = {path: read_file(path) for path in plan}
    parsed = {path: read_pem(d) for path, d in read.items() if isinstance(d, bytes)}
    known = intermediates_seen(next(iter(bundles.values()), None), parsed)
    reports = [
        unreadable(path, *d) if isinstance(d, tuple) else
        examine(path, parsed[path], now=now, skew=args.clock_skew_hint,
                bundle=bundles.get(plan[path] or ""), known_intermediates=known)
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


def _inspect_answer(source: identity_source.AgentSource, args: argparse.Namespace) -> int:
    """What the agent hands out: every SVID (or the one asked for), every bundle, CRLs."""
    try:
        response = identity_source.fetch(source)
    except identity_source.SourceError as exc:
        return _failed(exc)
    try:
        answer = examine_answer(response, str(source.address), source.wanted,
                                source.asked_by, now=datetime.now(UTC),
                                skew=args.clock_skew_hint)
    except ProblemsError as exc:
        print(f"sidecar inspect: {source}: " + "; ".join(p.message for p in exc.problems),
              file=sys.stderr)
        return EXIT_PROBLEM
    print(json.dumps(answer_json(answer), indent=2) if args.json else answer_text(answer))
    return EXIT_PROBLEM if answer.problems else EXIT_OK
