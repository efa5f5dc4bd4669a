"""`sidecar demo` with no arguments and no files: what a new user runs first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.timeout(90)


def test_the_demo_runs_on_built_in_defaults_and_says_what_happened(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = subprocess.run([sys.executable, "-m", "sidecar", "demo"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=80,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "answer: 'payments: received charge order 42'" in out
    assert "spiffe_id_mismatch" in out
    assert "decision deny" in out and "the app was never dialed" in out
    assert "calls during the rotation: 40 of 40 answered" in out
    assert "Demo finished: every call ended as expected." in out
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself
