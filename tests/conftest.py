"""Suite-wide settings.

On CI, hypothesis draws the same examples every run (derandomize): a property test that
finds a new counterexample should do so on a developer's run and become a fix and an
`@example`, not turn a submission red at random.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from hypothesis import settings
from orchestrators import CLIENT_ID, SERVER_ID, Trust, identity

from sidecar.identity import Identity
from sidecar.tools import pki

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


RUN_TIMEOUT = 20.0  # per test body, on top of pytest-timeout: a hang fails, never stalls
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind, bounded:
    the engine and the pump must work on the stdlib loop and on uvloop alike."""
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:

        def run_(coro: Awaitable[Any], timeout: float = RUN_TIMEOUT) -> Any:
            async def bounded() -> Any:
                loop = asyncio.get_running_loop()
                assert isinstance(loop, uvloop.Loop) == (request.param == "uvloop")
                async with asyncio.timeout(timeout):
                    return await coro

            return runner.run(bounded())

        yield run_


# The in-process orchestrator tests (test_connection, test_handshake, test_inbound) share
# one trust root and two identities per module; a test file may define its own instead.
@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.new()


@pytest.fixture(scope="module")
def ours(trust: Trust, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return identity(tmp_path_factory.mktemp("ours"), pki.issue_svid(trust.issuer, SERVER_ID),
                    trust.root)


@pytest.fixture(scope="module")
def caller(trust: Trust, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return identity(tmp_path_factory.mktemp("caller"), pki.issue_svid(trust.issuer, CLIENT_ID),
                    trust.root)
