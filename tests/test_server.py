"""What `sidecar run` says when it cannot start or serve (issue 16, item 7)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from test_check import run, write_config

pytestmark = pytest.mark.timeout(120)


def test_a_port_in_use_names_the_listener_and_the_address(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        def on_taken_port(c: dict[str, Any]) -> list[dict[str, Any]]:
            return [{**c["outbound"][0], "name": "payments", "listen": f"127.0.0.1:{port}"}]

        started, said = run(write_config(tmp_path, outbound=on_taken_port))
    assert not started, said
    assert (f"cannot listen: outbound listener 'payments' on 127.0.0.1:{port}: "
            "Address already in use") in said, said
