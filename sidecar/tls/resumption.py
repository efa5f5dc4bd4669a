"""Inbound session resumption: where sessions are kept, the ticket keys, and what happens
at each rotation boundary.

Two stores (`tls.session_store`): `memory` keeps sessions in OpenSSL's server cache (a
resumption decodes nothing; openssl.py says what that saves), `tickets` puts the session,
encrypted, in the ticket itself, under keys every worker derives alike (contexts.py's
`ticket_keys`). Either way a session resumes only until the next boundary of
`tls.session_ticket_rotation`, the same instant in every worker: then the cache is
flushed, or the next period's keys replace the current ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar import logs
from sidecar.config import SessionStore, TlsConfig
from sidecar.identity import Identity
from sidecar.tls import contexts as tls_contexts
from sidecar.tls import openssl


@dataclass(frozen=True, slots=True)
class Resumption:
    tls: TlsConfig
    secret: bytes  # shared by the workers, so any worker resumes any worker's tickets
    workers: bool  # several processes share the port

    def store(self) -> SessionStore:
        """`auto`: memory in a single process; tickets when workers share the port, since
        the kernel spreads a peer's connections over the workers and a session kept by
        one worker would not resume on another."""
        if self.tls.session_store == SessionStore.AUTO:
            return SessionStore.TICKETS if self.workers else SessionStore.MEMORY
        return self.tls.session_store

    def cache_size(self) -> int | None:
        """For contexts.build: the cache size when sessions are kept in memory."""
        return self.tls.session_cache_size if self.store() == SessionStore.MEMORY else None

    def epoch(self) -> int:
        rotation = self.tls.session_ticket_rotation
        return int(time.time() // rotation) if rotation > 0 else 0

    def ticket_keys(self, identity: Identity) -> bytes:
        return tls_contexts.ticket_keys(self.secret, self.epoch(), identity.trust_version)

    def rotate(self, contexts: tls_contexts.Contexts) -> None:
        """A boundary: sessions of the period before fall back to a full handshake."""
        every = self.tls.session_ticket_rotation
        if contexts.session_store == "memory":
            openssl.flush_sessions(contexts.server)
            logs.event(logging.INFO, "session cache flushed", next_in_s=every)
        else:
            openssl.set_ticket_keys(contexts.server, self.ticket_keys(contexts.identity))
            logs.event(logging.INFO, "session ticket keys rotated", next_in_s=every)

    async def rotate_at_boundaries(
        self, current: Callable[[], tls_contexts.Contexts], stop: asyncio.Event
    ) -> None:
        """Until `stop`: rotate the contexts in force at each boundary."""
        every = self.tls.session_ticket_rotation
        while not stop.is_set():
            try:
                async with asyncio.timeout(every - time.time() % every):
                    await stop.wait()
            except TimeoutError:
                self.rotate(current())

    def status(self, contexts: tls_contexts.Contexts) -> dict[str, Any]:
        """For /status: the store, and for memory how full it is and how it serves."""
        out: dict[str, Any] = {"store": contexts.session_store,
                               "configured": str(self.tls.session_store)}
        if contexts.session_store == "memory":
            stats = contexts.server.session_stats()
            out.update(cached=stats["number"], capacity=self.tls.session_cache_size,
                       hits=stats["hits"], misses=stats["misses"],
                       evicted=stats["cache_full"])
        return out
