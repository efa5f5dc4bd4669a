"""The dev agent's control socket (`sidecar pki agent --control PATH`): one command a line.

For a test or a demo that runs the agent as its own process. Each line gets one line back,
`ok ...` or `error ...`; e.g. `echo rotate | socat - UNIX-CONNECT:ctl.sock`, or `send()`.

    rotate                 new SVIDs now            status        mode, generation, ...
    serve|refuse|stall     set the mode             stop|start    take the server down/up
    drop end|unavailable   end every open stream    revoke SERIAL put a serial in the CRL
    federate TD DIR        add TD's bundle          unfederate TD drop TD's bundle
"""

from __future__ import annotations

import socket
import socketserver
import threading
from pathlib import Path

from sidecar.tools.pki.agent import Agent, Drop, foreign_bundle
from sidecar.tools.pki.errors import PkiError

_MAX_LINE = 4096  # a command is a word or three and a path


def _status(agent: Agent) -> str:
    federated = ",".join(agent.federated) or "-"
    return (
        f"serving={'yes' if agent.serving else 'no'} mode={agent.mode} "
        f"generation={agent.generation} federated={federated} sent={agent.sent}"
    )


def apply(agent: Agent, line: str) -> str:
    """Run one command on `agent`; the reply line, without its newline."""
    words = line.split()
    match words:
        case ["rotate"]:
            return f"ok generation={agent.rotate()}"
        case ["serve"]:
            agent.serve()
        case ["refuse"]:
            agent.refuse()
        case ["stall"]:
            agent.stall()
        case ["drop", kind] if kind in tuple(Drop):
            agent.drop(Drop(kind))
        case ["federate", td, directory]:
            try:
                agent.federate(td.lower(), foreign_bundle(td, Path(directory)))
            except (PkiError, OSError) as e:
                return f"error {e}"
        case ["unfederate", td]:
            if not agent.unfederate(td.lower()):
                return f"error {td} is not federated (federated: {', '.join(agent.federated)})"
        case ["revoke", serial]:
            try:
                agent.revoke(int(serial, 0))
            except ValueError:
                return f"error {serial!r} is not a serial number (decimal or 0x...)"
        case ["stop"]:
            agent.stop()
        case ["start"]:
            try:
                agent.start()
            except OSError as e:
                return f"error {e}"
        case ["status"]:
            pass
        case _:
            return f"error unknown command {line.strip()!r}; see `sidecar pki agent --help`"
    return f"ok {_status(agent)}"


class _Handler(socketserver.StreamRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        while line := self.rfile.readline(_MAX_LINE):
            reply = apply(self.server.agent, line.decode("utf-8", "replace"))
            self.wfile.write(reply.encode() + b"\n")


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, agent: Agent) -> None:
        self.agent = agent
        self.path = path
        if path.is_socket():
            path.unlink()  # left by an agent that did not stop cleanly
        super().__init__(str(path), _Handler)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="pki-agent-control",
                                  daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


def send(path: Path, command: str, timeout: float = 10.0) -> str:
    """Send one command to a control socket; its reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(_MAX_LINE)
            if not chunk:
                break
            reply += chunk
    return reply.decode().rstrip("\n")
