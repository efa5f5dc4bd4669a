"""The `sidecar` command line: argument parsing and dispatch only.

Exit codes (SPEC.md): 0 ok, 1 a check failed or the proxy stopped on error, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sidecar import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a command ended by SIGPIPE


def _duration(text: str) -> float:
    from sidecar.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _config_path(args: argparse.Namespace) -> Path | None:
    from sidecar.config import DEFAULT_CONFIG_ENV

    value = args.config or os.environ.get(DEFAULT_CONFIG_ENV)
    return Path(value) if value else None


def _broken_kinds() -> list[Any]:
    from sidecar.tools.pki import Broken

    return list(Broken)


# The commands whose parsers are built here (the others parse their own arguments).
_OWN = ("run", "check", "pki", "demo")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `only`, that command's alone, the same: `sidecar run`
    must not import what the tools' options need (the dev CA, for pki's --broken)."""
    p = argparse.ArgumentParser(
        prog="sidecar", description="An mTLS sidecar proxy for SPIFFE workloads.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if only in (None, "run"):
        run = sub.add_parser("run", help="run the proxy")
        run.add_argument("-c", "--config", help="config file (default: $SIDECAR_CONFIG)")
        run.add_argument("--loop", choices=["uvloop", "asyncio"], default=None,
                         help="event loop (default: uvloop; env SIDECAR_LOOP)")
    if only in (None, "check"):
        check = sub.add_parser("check", help="validate config, policy and SVID files")
        check.add_argument("-c", "--config", help="config file (default: $SIDECAR_CONFIG)")
    if only in (None, "pki"):
        _add_pki(sub)
    if only in (None, "demo"):
        sub.add_parser("demo", help="a local zero-trust demo on loopback: each sidecar takes "
                       "its SVID from its own dev Workload API agent (needs .[spire])")
    if only is None:
        # These parse their own arguments (each module's main), so their --help is theirs.
        for name, text in (("inspect", "explain certificates"),
                           ("diagnose", "connect as a client and explain the outcome"),
                           ("bench", "handshake and resumption load generator")):
            sp = sub.add_parser(name, help=text, add_help=False)
            sp.add_argument("rest", nargs=argparse.REMAINDER,
                            help=f"the arguments of `sidecar {name}` (see sidecar {name} "
                            "--help)")
    return p


def _add_pki(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = sub.add_parser("pki", help="a development CA: init, issue, rotate, agent")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True, metavar="PKI_COMMAND")
    init = pki_sub.add_parser("init", help="make a dev root + intermediate CA in DIR")
    init.add_argument("--dir", required=True, type=Path,
                      help="where to write the CA (created if missing)")
    init.add_argument("--trust-domain", required=True,
                      help="the trust domain its SVIDs name, like example.org")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    for name, text in (("issue", "issue an SVID into OUT"),
                       ("rotate", "keep re-issuing an SVID into OUT")):
        sp = pki_sub.add_parser(name, help=text)
        sp.add_argument("--dir", required=True, type=Path, help="the CA directory")
        sp.add_argument("--spiffe-id", required=True,
                        help="the SVID's ID, like spiffe://example.org/ns/default/sa/payments")
        sp.add_argument("--out", required=True, type=Path,
                        help="the directory to write the SVID, its key and the bundle into")
        sp.add_argument("--ttl", type=_duration, default=3600.0, help="lifetime (default 1h)")
        sp.add_argument("--dns", action="append", default=[], help="a DNS SAN (repeatable)")
        sp.add_argument("--layout", choices=["spiffe-helper", "csi", "k8s"],
                        default="spiffe-helper", help="file names and write pattern")
        if name == "issue":
            sp.add_argument("--broken", choices=[b.value for b in _broken_kinds()],
                            help="issue a deliberately broken SVID to see a failure reason")
        if name == "rotate":
            sp.add_argument("--every", type=_duration, required=True, help="e.g. 30s")
            sp.add_argument("--count", type=int, default=None, help="stop after N rotations")
    agent = pki_sub.add_parser(
        "agent", help="a dev SPIFFE Workload API server on a unix socket (needs .[spire])")
    agent.add_argument("--dir", required=True, type=Path, help="the CA directory")
    agent.add_argument("--socket", required=True, type=Path, help="the unix socket to serve")
    agent.add_argument("--spiffe-id", required=True, action="append", dest="spiffe_ids",
                       metavar="ID[=HINT]", help="an SVID to hand out (repeatable; the "
                       "first is the default; =HINT sets SPIRE's hint field)")
    agent.add_argument("--federate", action="append", default=[], metavar="TD=CA_DIR",
                       help="also hand out that dev CA's bundle for trust domain TD")
    agent.add_argument("--every", type=_duration, default=30.0, help="rotation (default 30s)")
    agent.add_argument("--ttl", type=_duration, default=3600.0, help="lifetime (default 1h)")
    agent.add_argument("--control", type=Path, default=None, metavar="PATH",
                       help="a unix socket taking commands: rotate, refuse, stall, serve, "
                       "drop end|unavailable, federate TD DIR, unfederate TD, stop, start")


# Commands that parse their own arguments (their module's main), so that `sidecar
# diagnose --help` is theirs and their options may come before their positionals.
_DELEGATED = ("inspect", "diagnose", "bench")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit where it cannot be caught
    except BrokenPipeError:
        # `sidecar check | head -1`: the reader has all it wanted. Quiet, as `cat` would be,
        # and stdout pointed at /dev/null so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser(argv[0] if argv and argv[0] in _OWN else None).parse_args(argv)
    match args.command:
        case "run":
            return _run(args)
        case "check":
            return _check(args)
        case "pki":
            return _pki(args)
        case "demo":
            from sidecar.tools.demo import main as demo_main

            return demo_main()
        case _:
            return _delegate(args.command, args.rest)


def _delegate(command: str, rest: list[str]) -> int:
    import importlib

    module = {"inspect": "sidecar.tools.inspect.command", "diagnose": "sidecar.tools.diagnose",
              "bench": "sidecar.tools.bench.command"}[command]
    try:
        entry = importlib.import_module(module).main
    except (ImportError, AttributeError):
        print(f"sidecar {command}: not supported yet in this version", file=sys.stderr)
        return EXIT_USAGE
    code: int = entry(rest)
    return code


def _run(args: argparse.Namespace) -> int:
    from sidecar.config import load_config
    from sidecar.observe import logs
    from sidecar.problems import ProblemsError

    path = _config_path(args)
    if path is None:
        print("sidecar run: no config: pass -c FILE or set SIDECAR_CONFIG", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(path)
    except ProblemsError as exc:
        print(f"sidecar run: {path} is not valid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILED
    logs.setup(str(config.log.level), str(config.log.format))
    loop_name = args.loop or os.environ.get("SIDECAR_LOOP", "uvloop")
    from sidecar.run import workers

    role = workers.role_from_env()
    count = config.workers or workers.usable_cpus()
    if role is None and count > 1:
        workers.prepare_metrics_dir()  # before anything imports prometheus_client
        supervisor = workers.Supervisor(config, path, count, loop_name)
        try:
            return asyncio.run(supervisor.run())
        finally:
            _ignore_stop_signals()
    from sidecar.run.server import Server

    if role is not None:
        logs.static["worker"] = role.index
    return _run_loop(Server(config, role).run(), loop_name)


def _run_loop(main: Coroutine[Any, Any, int], loop_name: str) -> int:
    try:
        if loop_name == "uvloop":
            import uvloop

            return asyncio.run(main, loop_factory=uvloop.new_event_loop)
        return asyncio.run(main)
    finally:
        # The loop's handlers are gone: one more SIGTERM (a supervisor repeating itself)
        # must not turn a clean exit into death by signal.
        _ignore_stop_signals()


def _ignore_stop_signals() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _check(args: argparse.Namespace) -> int:
    from sidecar.tools.check import check

    path = _config_path(args)
    if path is None:
        print("sidecar check: no config: pass -c FILE or set SIDECAR_CONFIG", file=sys.stderr)
        return EXIT_USAGE
    return check(path)


def _pki(args: argparse.Namespace) -> int:
    from sidecar.tools import pki

    if args.pki_command == "init":
        return pki.cmd_init(args.dir, args.trust_domain, force=args.force)
    ttl = timedelta(seconds=args.ttl)
    if args.pki_command == "agent":
        from sidecar.tools.pki.commands import cmd_agent

        return cmd_agent(args.dir, args.socket, args.spiffe_ids, args.federate, args.every,
                             ttl, args.control)
    layout = pki.Layout(args.layout)
    if args.pki_command == "issue":
        broken = pki.Broken(args.broken) if args.broken else None
        return pki.cmd_issue(args.dir, args.spiffe_id, args.out, ttl, args.dns, layout, broken)
    return pki.cmd_rotate(args.dir, args.spiffe_id, args.out, args.every, ttl, args.dns,
                          layout, count=args.count)
