"""The poller: one epoll set for the connections' sockets (sidecar/poller.py), on real
socket pairs and a real event loop (uvloop and asyncio both)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import uvloop

from sidecar import poller

pytestmark = pytest.mark.timeout(20)

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
WAIT = 5.0


class Counting(poller.Poller):
    """Counts how often the loop woke the poller: a socket that stays ready with nobody
    waiting would wake it on every turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wakeups = 0
        super().__init__(loop)

    def _dispatch(self) -> None:
        self.wakeups += 1
        super()._dispatch()


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = LOOPS[request.param]()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        yield held
    finally:
        for s in held:
            s.close()


def pair(held: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    held += [a, b]
    return a, b


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_reader_is_called_once_the_socket_is_readable(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    async def body() -> None:
        a, b = pair(pairs)
        fut = poller.ready(loop, a.fileno(), a)
        await turns(5)
        assert not fut.done()  # nothing to read yet
        b.send(b"x")
        await asyncio.wait_for(fut, WAIT)
        assert a.recv(1) == b"x"

    loop.run_until_complete(body())


def test_a_writer_is_called_once_the_socket_is_writable(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    async def body() -> None:
        a, _ = pair(pairs)
        await asyncio.wait_for(poller.ready(loop, a.fileno(), a, write=True), WAIT)

    loop.run_until_complete(body())


def test_a_socket_ready_with_nobody_waiting_does_not_wake_the_loop_every_turn(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    """Interest dropped lazily must still be dropped: the events are level-triggered."""
    async def body() -> None:
        p = Counting(loop)
        try:
            a, b = pair(pairs)
            got: list[int] = []
            p.add_reader(a.fileno(), a, lambda: got.append(1))
            b.send(b"x")
            while not got:
                await asyncio.sleep(0.01)
            p.remove_reader(a.fileno(), a)  # the byte stays unread
            await turns(50)
            before = p.wakeups
            await turns(50)
            assert p.wakeups == before
            p.add_reader(a.fileno(), a, lambda: got.append(2))  # and it can wait again
            while got[-1] != 2:
                await asyncio.sleep(0.01)
        finally:
            p.close()

    loop.run_until_complete(body())


def test_a_writer_that_went_away_leaves_the_kernel_at_once(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    async def body() -> None:
        p = Counting(loop)
        try:
            a, _ = pair(pairs)
            got: list[int] = []

            def once() -> None:
                got.append(1)
                p.remove_writer(a.fileno(), a)

            p.add_writer(a.fileno(), a, once)
            while not got:
                await asyncio.sleep(0.01)
            before = p.wakeups
            await turns(50)
            assert p.wakeups == before and got == [1]
        finally:
            p.close()

    loop.run_until_complete(body())


def test_a_released_socket_no_longer_wakes_the_poller(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    """release() (a pump takes the socket over onto the loop's own registrations) takes
    it out of the kernel's set too, whoever waited on it: its traffic must not cost the
    poller a wake-up, and the loop can watch the open socket itself."""
    async def body() -> None:
        p = Counting(loop)
        try:
            a, b = pair(pairs)
            called: list[int] = []
            p.add_reader(a.fileno(), a, lambda: called.append(1))
            p.release(a.fileno())
            b.send(b"r")
            await turns(50)
            assert p.wakeups == 0
            assert called == []
            got = loop.create_future()
            loop.add_reader(a.fileno(), lambda: got.done() or got.set_result(None))
            try:
                await asyncio.wait_for(got, WAIT)
            finally:
                loop.remove_reader(a.fileno())
            assert p.wakeups == 0
        finally:
            p.close()

    loop.run_until_complete(body())


def test_a_new_socket_under_a_closed_ones_number_is_watched_anew(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    """The kernel drops a closed socket from the set; its number comes back with the next
    socket, which must be added again, not taken for the one already there."""
    async def body() -> None:
        a, b = pair(pairs)
        fd = a.fileno()
        poller.of(loop).add_reader(fd, a, lambda: None)  # in the set now
        a.close()
        b.close()  # closed without forget(): the entry is stale
        c, d = socket.socketpair()
        pairs.extend([c, d])
        if c.fileno() != fd:
            c, d = d, c
        if c.fileno() != fd:
            pytest.skip("the kernel did not hand out the same number again")
        c.setblocking(False)
        fut = poller.ready(loop, c.fileno(), c)
        d.send(b"y")
        await asyncio.wait_for(fut, WAIT)

    loop.run_until_complete(body())


def test_a_cancelled_wait_stops_waiting(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    async def body() -> None:
        a, b = pair(pairs)
        fut = poller.ready(loop, a.fileno(), a)
        fut.cancel()
        called: list[int] = []
        p = poller.of(loop)
        b.send(b"z")
        await turns(20)
        p.add_reader(a.fileno(), a, lambda: called.append(1))  # a later wait still works
        while not called:
            await asyncio.sleep(0.01)

    loop.run_until_complete(body())


def test_a_callback_that_raises_is_reported_and_the_others_still_run(
    loop: asyncio.AbstractEventLoop, pairs: list[socket.socket]
) -> None:
    reported: list[BaseException | None] = []
    loop.set_exception_handler(lambda _l, ctx: reported.append(ctx.get("exception")))

    async def body() -> None:
        a, b = pair(pairs)
        c, d = pair(pairs)
        p = poller.of(loop)

        def boom() -> None:
            p.remove_reader(a.fileno(), a)
            raise RuntimeError("boom")

        p.add_reader(a.fileno(), a, boom)
        fut = poller.ready(loop, c.fileno(), c)
        b.send(b"1")
        d.send(b"2")
        await asyncio.wait_for(fut, WAIT)
        while not reported:
            await asyncio.sleep(0.01)

    loop.run_until_complete(body())
    assert isinstance(reported[0], RuntimeError)
