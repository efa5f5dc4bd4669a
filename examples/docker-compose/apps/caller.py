"""The demo's client app: call payments through the local sidecar and say what happened.

The app speaks plain HTTP to its sidecar's outbound listener on loopback; the sidecar
does the mTLS. One line per call, so `docker compose logs -f frontend` shows the traffic,
and whether a rotation ever breaks a call (it must not). Standard library only.

    python caller.py --to 127.0.0.1:9001                  # forever, once a second
    python caller.py --to 127.0.0.1:9001 --count 1        # one call; exit 1 if it failed
    python caller.py --to 127.0.0.1:9001 --keep-alive     # reuse one connection
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, help="the sidecar's outbound listener, host:port")
    parser.add_argument("--name", default="caller", help="prefix of every line")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between calls")
    parser.add_argument("--count", type=int, default=None, help="stop after N calls")
    parser.add_argument("--keep-alive", action="store_true",
                        help="send every call on one long-lived connection")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    ok = failed = 0
    connection: http.client.HTTPConnection | None = None
    n = 0
    while args.count is None or n < args.count:
        n += 1
        if connection is None or not args.keep_alive:
            connection = http.client.HTTPConnection(host.strip("[]"), int(port),
                                                    timeout=args.timeout)
        try:
            connection.request("GET", f"/call/{n}")
            response = connection.getresponse()
            body = response.read().decode(errors="replace").strip()
            ok += 1
            outcome = f"ok {response.status} {body!r}"
        except http.client.RemoteDisconnected:
            failed += 1
            outcome = ("FAILED: the connection was closed before any answer "
                       "(a policy denial looks like this; see the server sidecar's log)")
            connection = None
        except (OSError, http.client.HTTPException) as exc:
            failed += 1
            outcome = f"FAILED: {type(exc).__name__}: {exc}"
            connection = None
        finally:
            if connection is not None and not args.keep_alive:
                connection.close()
        print(f"{args.name}: call {n}: {outcome} [ok={ok} failed={failed}]", flush=True)
        if args.count is None or n < args.count:
            time.sleep(args.every)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
