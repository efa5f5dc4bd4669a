"""What the tests that talk to the dev Workload API agent (sidecar/tools/pki/agent.py) share:
its CA, a foreign root to federate, the socket path in tmp_path, and the agents they run.
A test module imports the fixtures it uses (`*_fixture`, each registered under the name a
test asks for, so that the import and the test's argument do not clash); pytest finds them
there."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from sidecar.tools.pki import CA, new_intermediate, new_root
from sidecar.tools.pki.agent import Agent, Entry

TD = "example.org"
ID_WEB = f"spiffe://{TD}/ns/default/sa/web"
ID_DB = f"spiffe://{TD}/ns/default/sa/db"


@pytest.fixture(name="root", scope="module")
def root_fixture() -> CA:
    return new_root(TD)


@pytest.fixture(name="ca", scope="module")
def ca_fixture(root: CA) -> CA:
    return new_intermediate(root)


@pytest.fixture(name="other_root", scope="module")
def other_root_fixture() -> x509.Certificate:
    return new_root("other.org").cert


@pytest.fixture(name="sock")
def sock_fixture(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def web_agent(ca: CA, sock: Path) -> Agent:
    """An agent (not started) that hands out the web SVID alone."""
    return Agent(ca, sock, [Entry(ID_WEB)])


def two_agent(ca: CA, sock: Path) -> Agent:
    """An agent (not started) offering two SVIDs, web then db, each with SPIRE's hint."""
    return Agent(ca, sock, [Entry(ID_WEB, "web"), Entry(ID_DB, "db")])
