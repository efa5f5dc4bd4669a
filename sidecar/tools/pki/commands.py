"""The `sidecar pki init|issue|rotate|agent` commands: `cli.py` parses the arguments and calls
these, which print what they did and return the exit status."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.tools.pki.broken import Broken, broken_overrides
from sidecar.tools.pki.ca import CA, new_intermediate, new_root, trust_domain_of
from sidecar.tools.pki.cadir import INTERMEDIATE_CERT, ROOT_CERT, init_ca_dir, load_ca_dir
from sidecar.tools.pki.errors import PkiError
from sidecar.tools.pki.layouts import Layout, write_svid
from sidecar.tools.pki.svid import Svid, issue_svid

if TYPE_CHECKING:  # the agent needs the optional `spire` extra: imported when run
    from sidecar.tools.pki.agent import Agent


def _fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _id_problem(spiffe_id: str, trust_domain: str) -> str | None:
    """A light check so the dev CA never issues another trust domain's ID.

    The full SPIFFE-ID grammar lives in spiffe.py; this only stops the mistakes a user of
    `pki issue` makes.
    """
    if not spiffe_id.lower().startswith("spiffe://"):
        return f"{spiffe_id!r} is not a SPIFFE ID: it must start with spiffe://"
    authority, _, path = spiffe_id[len("spiffe://") :].partition("/")
    if authority.lower() != trust_domain:
        return (
            f"{spiffe_id} belongs to trust domain {authority!r}, but this CA is for "
            f"{trust_domain!r}; issue spiffe://{trust_domain}/... or use that domain's CA"
        )
    if not path:
        return (
            f"{spiffe_id} names the trust domain, not a workload; add a path, e.g. "
            f"spiffe://{trust_domain}/ns/default/sa/web"
        )
    return None


def _error(command: str, message: str) -> int:
    print(f"sidecar pki {command}: error: {message}", file=sys.stderr)
    return 1


def cmd_init(dir: Path, trust_domain: str, *, force: bool = False) -> int:
    try:
        root, intermediate = init_ca_dir(dir, trust_domain, force=force)
    except (PkiError, ValueError, OSError) as e:
        return _error("init", str(e))
    print(f"created a dev CA for trust domain {trust_domain} in {dir}")
    print(f"  root:         {dir / ROOT_CERT} (not after {_fmt_time(root.not_after)})")
    print(
        f"  intermediate: {dir / INTERMEDIATE_CERT} (not after {_fmt_time(intermediate.not_after)})"
    )
    print(f"  give peers {dir / ROOT_CERT} as their bundle; keep the *_key.pem files private")
    return 0


def _prepare(command: str, dir: Path, spiffe_id: str) -> CA | int:
    try:
        _, intermediate = load_ca_dir(dir)
    except (PkiError, OSError) as e:
        return _error(command, str(e))
    problem = _id_problem(spiffe_id, intermediate.trust_domain)
    if problem:
        return _error(command, problem)
    return intermediate


def _issue_into(
    ca: CA, spiffe_id: str, out: Path, ttl: timedelta, dns: Sequence[str], layout: Layout,
    broken: Broken | None = None,
) -> Svid:
    bundle = [ca.trust_anchor]
    if broken is Broken.FOREIGN_CA:
        td = trust_domain_of(ca.trust_anchor)
        ca = new_intermediate(new_root(td))  # the bundle written stays the real one
    overrides = broken_overrides(broken, ca, spiffe_id) if broken else {}
    svid = issue_svid(ca, spiffe_id, ttl=ttl, dns=dns, **overrides)  # type: ignore[arg-type]
    write_svid(out, svid, bundle, layout)
    return svid


def cmd_issue(
    dir: Path,
    spiffe_id: str,
    out: Path,
    ttl: timedelta,
    dns: Sequence[str],
    layout: Layout = Layout.SPIFFE_HELPER,
    broken: Broken | None = None,
) -> int:
    ca = _prepare("issue", dir, spiffe_id)
    if isinstance(ca, int):
        return ca
    try:
        svid = _issue_into(ca, spiffe_id, out, ttl, dns, layout, broken)
    except (PkiError, ValueError, OSError) as e:
        return _error("issue", str(e))
    f = layout.files
    print(
        f"issued {spiffe_id} serial {svid.serial:#x} not after {_fmt_time(svid.not_after)} "
        f"into {out} ({f.cert}, {f.key}, {f.bundle})"
        + (f", broken on purpose: {broken}" if broken else "")
    )
    return 0


def cmd_rotate(
    dir: Path,
    spiffe_id: str,
    out: Path,
    every: float,
    ttl: timedelta,
    dns: Sequence[str],
    layout: Layout = Layout.SPIFFE_HELPER,
    count: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Issue now, then again every `every` seconds with a fresh key each time.

    Stops after `count` rotations, when `stop` is set, or on Ctrl-C (exit 0 in all three).
    """
    if every <= 0 or (count is not None and count < 1):
        return _error("rotate", "--every must be positive and the count at least 1")
    ca = _prepare("rotate", dir, spiffe_id)
    if isinstance(ca, int):
        return ca
    stop = stop or threading.Event()
    done = 0
    try:
        while True:
            svid = _issue_into(ca, spiffe_id, out, ttl, dns, layout)
            done += 1
            print(
                f"rotation {done}: {spiffe_id} serial {svid.serial:#x} "
                f"not after {_fmt_time(svid.not_after)}",
                flush=True,  # the demo and tests read this line as it happens
            )
            if (count is not None and done >= count) or stop.wait(every):
                break
    except KeyboardInterrupt:
        print(f"stopped after {done} rotations")
    except (PkiError, ValueError, OSError) as e:
        return _error("rotate", str(e))
    return 0


SPIRE_EXTRA_MISSING = (
    "the Workload API agent needs grpcio and py-spiffe, which are not installed: "
    "pip install 'sidecar[spire]' (from a checkout: pip install -e '.[spire]')"
)


def _entries(specs: Sequence[str], trust_domain: str) -> list[tuple[str, str]] | str:
    """`ID` or `ID=HINT` (a SPIFFE ID path never holds '='), checked against our domain."""
    entries = []
    for spec in specs:
        spiffe_id, _, hint = spec.partition("=")
        problem = _id_problem(spiffe_id, trust_domain)
        if problem:
            return problem
        entries.append((spiffe_id, hint))
    return entries


def _federations(specs: Sequence[str], ours: str) -> list[tuple[str, Path]] | str:
    pairs = []
    for spec in specs:
        td, sep, directory = spec.partition("=")
        if not sep or not td or not directory:
            return f"--federate {spec!r}: write it TD=CA_DIR, e.g. other.org=ca-other"
        if td.lower() == ours:
            return f"--federate {spec!r}: {td} is this agent's own trust domain"
        pairs.append((td.lower(), Path(directory)))
    return pairs


def cmd_agent(
    dir: Path,
    socket: Path,
    spiffe_ids: Sequence[str],
    federate: Sequence[str] = (),
    every: float = 30.0,
    ttl: timedelta = timedelta(hours=1),
    control: Path | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve the Workload API on `socket` until Ctrl-C, SIGTERM or `stop` (exit 0)."""
    try:
        from sidecar.tools.pki import agent as agent_module
    except ImportError as e:
        return _error("agent", f"{SPIRE_EXTRA_MISSING} ({e})")
    if every <= 0:
        return _error("agent", "--every must be positive, e.g. 30s")
    try:
        _, ca = load_ca_dir(dir)
    except (PkiError, OSError) as e:
        return _error("agent", str(e))
    entries = _entries(spiffe_ids, ca.trust_domain)
    federations = _federations(federate, ca.trust_domain)
    if isinstance(entries, str) or isinstance(federations, str):
        return _error("agent", entries if isinstance(entries, str) else str(federations))
    try:
        bundles = {td: agent_module.foreign_bundle(td, d) for td, d in federations}
    except (PkiError, OSError) as e:
        return _error("agent", str(e))

    def announce(generation: int, svids: tuple[Svid, ...]) -> None:
        for svid in svids:
            print(
                f"rotation {generation}: {svid.spiffe_id} serial {svid.serial:#x} "
                f"not after {_fmt_time(svid.not_after)}",
                flush=True,  # demos and tests read these lines as they happen
            )

    agent = agent_module.Agent(
        ca, socket, [agent_module.Entry(i, h) for i, h in entries], every=every, ttl=ttl,
        federated=bundles, on_rotate=announce,  # announces the first issue too
    )
    return _serve_agent(agent, control, stop or threading.Event())


def _serve_agent(agent: Agent, control: Path | None, stop: threading.Event) -> int:
    import signal

    from sidecar.tools.pki.agent_control import ControlServer

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    controller = None
    try:
        agent.start()
        if control is not None:
            controller = ControlServer(control, agent)
            controller.serve_in_thread()
        federated = ", ".join(agent.federated) or "none"
        print(
            f"serving the Workload API on unix://{agent.socket.absolute()} "
            f"(federated: {federated}; control: {control or 'none'}); Ctrl-C stops",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except OSError as e:
        return _error("agent", str(e))
    finally:
        if controller is not None:
            controller.close()
        agent.close()
    print("stopped", flush=True)
    return 0
