"""Session resumption: inbound, where sessions are kept, the ticket keys, and what happens
at each rotation boundary; outbound, which session a route offers.

Two stores (`tls.session_store`): `memory` keeps sessions in OpenSSL's server cache (a
resumption decodes nothing; openssl.py says what that saves), `tickets` puts the session,
encrypted, in the ticket itself, under keys every worker derives alike (contexts.py's
`ticket_keys`). Either way a session resumes only until the next boundary of
`tls.session_ticket_rotation`, the same instant in every worker: then the cache is
flushed, or the next period's keys replace the current ones.

Outbound, a route offers the session of its last full handshake, and only while both
chains that handshake proved are valid: a session holds the server's certificate and ours
as they were then, a resumption brings no new ticket, and neither side re-verifies it, so
past the first notAfter of either chain every resumption would be refused (the server's
certificate by our own re-check, ours by the server's). Then the route makes a full
handshake, which brings a ticket for the certificates in force. Under SVID rotation that is
one full handshake per SVID lifetime (minus the overlap), not one per rotation.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.identity import Identity
from sidecar.modes import SessionStore
from sidecar.observe import logs
from sidecar.tls import contexts as tls_contexts
from sidecar.tls import openssl


@dataclass(frozen=True, slots=True)
class Resumption:
    store: SessionStore  # where the server keeps sessions: MEMORY or TICKETS (auto resolved)
    period: float  # seconds between rotation boundaries (tls.session_ticket_rotation); 0: never
    cache_size: int  # sessions the memory store holds (tls.session_cache_size)
    secret: bytes  # shared by the workers, so any worker resumes any worker's tickets
    configured: SessionStore | None = None  # the store as configured, for /status

    def memory_cache(self) -> int | None:
        """For contexts.build: the cache size when sessions are kept in memory."""
        return self.cache_size if self.store is SessionStore.MEMORY else None

    def epoch(self) -> int:
        return int(time.time() // self.period) if self.period > 0 else 0

    def ticket_keys(self, identity: Identity) -> bytes:
        return tls_contexts.ticket_keys(self.secret, self.epoch(), identity.trust_version)

    def rotate(self, contexts: tls_contexts.Contexts) -> None:
        """A boundary: sessions of the period before fall back to a full handshake."""
        every = self.period
        if contexts.session_store is SessionStore.MEMORY:
            openssl.flush_sessions(contexts.server)
            logs.event(logging.INFO, "session cache flushed", next_in_s=every)
        else:
            openssl.set_ticket_keys(contexts.server, self.ticket_keys(contexts.identity))
            logs.event(logging.INFO, "session ticket keys rotated", next_in_s=every)

    async def rotate_at_boundaries(
        self, current: Callable[[], tls_contexts.Contexts], stop: asyncio.Event
    ) -> None:
        """Until `stop`: rotate the contexts in force at each boundary, once."""
        every = self.period
        while not stop.is_set():
            target = self.epoch() + 1
            # A timer may fire a little before the wall clock reaches the boundary (uvloop
            # counts in whole milliseconds, and the loop's clock is not the wall clock):
            # rotating then would turn to the ending period's own keys, log it, and spin
            # until the boundary. Wait until the epoch the keys derive from has moved.
            while self.epoch() < target:
                try:
                    async with asyncio.timeout(max(target * every - time.time(), 0.001)):
                        await stop.wait()
                    return
                except TimeoutError:
                    continue
            self.rotate(current())

    def status(self, contexts: tls_contexts.Contexts) -> dict[str, Any]:
        """For /status: the store, and for memory how full it is and how it serves."""
        out: dict[str, Any] = {"store": contexts.session_store or "off",
                               "configured": self.configured}
        if contexts.session_store is SessionStore.MEMORY:
            stats = contexts.server.session_stats()
            out.update(cached=stats["number"], capacity=self.cache_size,
                       hits=stats["hits"], misses=stats["misses"],
                       evicted=stats["cache_full"])
        return out


# Seconds before a kept session's first notAfter that a route stops offering it: the
# handshake takes some time, and the server's clock may run a little ahead of ours.
OFFER_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class ClientSession:
    """The session an outbound route offers next."""

    context: ssl.SSLContext  # made under it: another context (a new trust) never offers it
    session: ssl.SSLSession
    valid_until: float  # Unix time: the first notAfter of the two chains it proved


def to_offer(kept: ClientSession | None, context: ssl.SSLContext,
             now: float) -> ssl.SSLSession | None:
    """The session to offer from `context` at `now`, or None for a full handshake."""
    if kept is None or kept.context is not context or now >= kept.valid_until - OFFER_MARGIN:
        return None
    return kept.session
