"""The demo's payments app: a tiny HTTP server that answers every GET with one line.

It listens on loopback only, so nothing outside its network namespace reaches it except
through its sidecar, which admits a caller only after mTLS and the policy. Standard
library only: it runs from the sidecar image (`python /apps/echo_server.py`).

    python echo_server.py --listen 127.0.0.1:8080 --name payments
"""

from __future__ import annotations

import argparse
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port, e.g. 127.0.0.1:8080")
    parser.add_argument("--name", default="payments", help="what the answers say")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    name = args.name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so a long-lived connection is possible

        def do_GET(self) -> None:  # the name http.server calls
            body = f"{name}: hello from {name} (you asked for {self.path})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *values: object) -> None:
            sys.stdout.write(f"{name}: {self.address_string()} {format % values}\n")
            sys.stdout.flush()

    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{name}: listening on {args.listen}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
