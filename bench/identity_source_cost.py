"""What the Workload API identity source costs against the file source (issue 18):
start-up time to "ready" and RSS once ready, of `sidecar run` with the same listener.

Run (from the repo root; needs the `spire` extra):

    PYTHONPATH=. python bench/identity_source_cost.py [--repeats 5] [--json]

Each repetition starts, alternately, a sidecar reading SVID files and one streaming its
SVID from a `sidecar pki agent` that is already up (so the agent's own start is not
counted), both with one outbound listener, uvloop, and the same CA. Start-up is the wall
time from exec to the "ready" log line; RSS is VmRSS read from /proc right after it. The
medians are printed with the difference. On a shared machine the times move with the
load; the RSS does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memory_idle import rss_kib  # noqa: E402

from sidecar.tools import pki  # noqa: E402

SPIFFE_ID = "spiffe://example.org/ns/default/sa/payments"


def _start(config: Path) -> tuple[float, int]:
    """(seconds from exec to "ready", VmRSS KiB then) of one `sidecar run`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(config),
                             "--loop", "uvloop"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, env=env)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            if b'"msg":"ready"' in raw.replace(b" ", b""):
                elapsed = time.monotonic() - t0
                return elapsed, rss_kib(proc.pid)
        raise RuntimeError(f"{config.name}: exited {proc.wait()} before ready")
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="srccost") as tmp:
        d = Path(tmp)
        root, inter = pki.init_ca_dir(d / "ca", "example.org")
        pki.write_svid(d / "svid", pki.issue_svid(inter, SPIFFE_ID), [root.cert])
        common = {"outbound": [{"name": "out", "listen": "127.0.0.1:0",
                                "connect_to": "127.0.0.1:9", "expect_ids": [SPIFFE_ID]}],
                  "admin": {"listen": "127.0.0.1:0"}, "log": {"format": "json"}}
        files = d / "files.yaml"
        files.write_text(json.dumps({"identity": {
            "cert": str(d / "svid" / "svid.pem"), "key": str(d / "svid" / "svid_key.pem"),
            "bundle": str(d / "svid" / "bundle.pem")}, **common}))
        sock = d / "agent.sock"
        streamed = d / "workload_api.yaml"
        streamed.write_text(json.dumps({"identity": {"workload_api": f"unix://{sock}"},
                                        **common}))
        agent = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "pki", "agent", "--dir", str(d / "ca"),
             "--socket", str(sock), "--spiffe-id", SPIFFE_ID, "--every", "1h"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert agent.stdout is not None
            for line in agent.stdout:
                if line.startswith("serving the Workload API"):
                    break
            results: dict[str, list[tuple[float, int]]] = {"files": [], "workload_api": []}
            for _ in range(args.repeats):
                results["files"].append(_start(files))
                results["workload_api"].append(_start(streamed))
        finally:
            agent.terminate()
            agent.wait(15)
    table = {name: {"start_s": statistics.median(t for t, _ in runs),
                    "rss_mib": statistics.median(r for _, r in runs) / 1024}
             for name, runs in results.items()}
    if args.json:
        print(json.dumps(table, indent=2))
        return
    f, w = table["files"], table["workload_api"]
    print(f"{'source':<14}{'start to ready (s)':>20}{'RSS when ready (MiB)':>24}")
    for name, row in table.items():
        print(f"{name:<14}{row['start_s']:>20.3f}{row['rss_mib']:>24.1f}")
    print(f"{'added':<14}{w['start_s'] - f['start_s']:>+20.3f}"
          f"{w['rss_mib'] - f['rss_mib']:>+24.1f}")
    print(f"(median of {args.repeats} alternated starts each)")


if __name__ == "__main__":
    main()
