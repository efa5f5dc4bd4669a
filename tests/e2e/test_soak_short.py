"""The rotation soak of bench/soak_rotation.py, a few seconds per scenario (issue 15).

The script starts its own echo app and sidecar pair per scenario (port 0, loopback),
rotates the SVIDs while short connections and long streams run, and reports what the
clients saw and what both sidecars counted. Here every figure that must be zero is zero.

Only the layout scenarios run: `bundle` and `short-ttl` fail on main until issue 15
items 1-2 are fixed (a resumption refused across intermediates, a session outliving its
certificate); add them to SCENARIOS then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO

SCENARIOS = ("helper", "csi", "k8s")
SECONDS = 3  # about three rotations a side per layout; ~20 s in all with the start-ups

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def _soak(tmp_path: Path) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak_rotation.py"), "--seconds", str(SECONDS),
         "--scenarios", ",".join(SCENARIOS), "--keep", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert run.stdout.startswith("["), f"no results (exit {run.returncode}):\n{run.stderr}"
    results: list[dict[str, Any]] = json.loads(run.stdout)
    return results, run


def test_rotation_soak_short_loses_nothing(tmp_path: Path) -> None:
    results, run = _soak(tmp_path)
    assert [r["scenario"] for r in results] == list(SCENARIOS)
    for r in results:
        where = f"{r['scenario']}:\n{run.stderr}"
        assert r["connections"] >= SECONDS * 10, where
        assert r["client_failures"] == {}, where
        assert r["handshake_errors"] == {"outbound": {}, "inbound": {}}, where
        assert r["logged_reasons"] == {"outbound": {}, "inbound": {}}, where
        assert r["streams_broken"] == [] and r["streams_opened"] == 3, where
        assert r["corrupted_bytes"] == 0, where
        assert r["rotation"]["problems"] == [], where
        # The rotators take a second or more to start on a loaded machine: at least one
        # rotation a side, and both sidecars must have reloaded it.
        assert all(n >= 1 for n in r["rotation"]["rotations"].values()), where
        assert all(r["reloads"][side].get("svid/ok", 0) >= 1 for side in r["reloads"]), where
        assert r["resumed"]["outbound"] > 0 and r["resumed"]["inbound"] > 0, where
    assert run.returncode == 0, run.stderr
