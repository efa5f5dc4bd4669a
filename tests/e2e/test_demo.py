"""`sidecar demo` with no arguments and no files: what a new user runs first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.timeout(90)

PAYMENTS = "spiffe://example.org/ns/default/sa/payments"
FRONTEND = "spiffe://example.org/ns/web/sa/frontend"


def _demo(cwd: Path, *python: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *python], cwd=cwd, capture_output=True, text=True,
                          timeout=80, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_demo_runs_on_built_in_defaults_and_says_what_happened(tmp_path: Path) -> None:
    run = _demo(tmp_path, "-m", "sidecar", "demo")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    # Each sidecar's identity came from its own agent, over the Workload API.
    for name, spiffe_id in (("payments", PAYMENTS), ("frontend", FRONTEND)):
        assert f"agent {name}.sock  hands out {spiffe_id} only" in out, out
        assert re.search(rf"   {name} +{spiffe_id}, serial [0-9a-f]+, from agent "
                         rf"{name}\.sock\n", out), out
    # payments' sidecar, started before its agent, said why it was not ready; then was.
    assert "/readyz of payments' sidecar: 503 Service Unavailable\n" in out, out
    assert re.search(r"not ready: waiting for the first SVID from the Workload API at "
                     r"unix://\S+/payments\.sock; socket_missing: ", out), out
    assert "/readyz of payments' sidecar: 200 OK (ready)" in out, out
    assert "answer: 'payments: received charge order 42'" in out
    assert "spiffe_id_mismatch" in out
    assert "decision deny" in out and "the app was never dialed" in out
    # A rotation of each end arrived over the stream while every call was answered.
    for owner in ("payments'", "frontend's"):
        assert re.search(rf"down the open stream; {owner} sidecar swapped it in \(serial "
                         r"[0-9a-f]+\): no restart, no file", out), out
    calls = re.search(r"calls during the rotation: (\d+) of (\d+) answered", out)
    assert calls and calls[1] == calls[2] and int(calls[1]) > 0, out
    for name in ("payments", "frontend"):
        counts = re.search(rf"\n     {name} +(\d+) / (\d+)\n", out)
        assert counts and 1 <= int(counts[2]) <= int(counts[1]), out
    assert 'sidecar_workload_api_stream_failures_total{reason="socket_missing"}' in out
    assert re.search(r'sidecar_workload_api_updates_total\{result="applied"\} ([5-9]|\d\d)',
                     out), out  # three first SVIDs, payments' and frontend's rotations
    assert "Demo finished: every call ended as expected." in out
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_demo_without_the_spire_extra_says_what_to_install(tmp_path: Path) -> None:
    # None in sys.modules makes `import grpc` fail as if grpcio were not installed.
    run = _demo(tmp_path, "-c", "import sys; sys.modules['grpc'] = None; "
                "from sidecar.cli import main; sys.exit(main(['demo']))")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "needs the optional `spire` extra" in run.stdout, run.stdout + run.stderr
    assert "pip install -e '.[spire]'" in run.stdout, run.stdout
    assert "1. A dev CA" not in run.stdout  # it stopped before starting anything
    assert list(tmp_path.iterdir()) == []
