"""workers.py: a worker's end of the pipe to its supervisor, over a real pipe."""

from __future__ import annotations

import json
import os
import select

import pytest

from sidecar.config import Address
from sidecar.run.workers import WorkerRole

pytestmark = pytest.mark.timeout(10)


def test_lines_to_the_supervisor_are_whole_and_a_too_long_report_is_skipped() -> None:
    r, w = os.pipe()
    try:
        role = WorkerRole(0, {"app": 4433}, w, b"s" * 32)
        role.notify("ready")
        role.report({"connections": {"active": 1}})
        role.report({"big": "x" * select.PIPE_BUF})  # would be torn: not sent
        role.notify("draining")
        os.close(w)
        w = -1
        lines = os.read(r, 1 << 16).decode().splitlines()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert lines[0] == "ready" and lines[2] == "draining" and len(lines) == 3
    word, _, rest = lines[1].partition(" ")
    assert word == "status" and json.loads(rest) == {"connections": {"active": 1}}


def test_a_worker_binds_the_port_its_supervisor_fixed() -> None:
    role = WorkerRole(0, {"app": 4433}, -1, b"")
    assert role.address("app", Address("127.0.0.1", 0)) == Address("127.0.0.1", 4433)
    assert role.address("other", Address("::1", 9)) == Address("::1", 9)


def test_a_gone_supervisor_does_not_stop_the_worker() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        WorkerRole(0, {}, w, b"").notify("ready")  # EPIPE, said nowhere: carry on
    finally:
        os.close(w)
