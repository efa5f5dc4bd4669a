"""How a listener and its TLS are set to run: the config's choices, spelled here once so
that tls/, proxy/ and observation can take them without importing the config schema
(which re-exports them). Each value is the word the YAML file and SPEC.md use."""

from __future__ import annotations

from enum import StrEnum


class ListenerProtocol(StrEnum):
    """What an inbound listener speaks to the app (`inbound[].protocol`)."""

    TCP = "tcp"
    HTTP = "http"


class TlsVersion(StrEnum):
    """The oldest TLS version offered or accepted (`tls.min_version`)."""

    TLS_1_2 = "1.2"
    TLS_1_3 = "1.3"


class KtlsMode(StrEnum):
    """Whether the kernel is asked to take the record layer (`tls.ktls`)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class SessionStore(StrEnum):
    """Where an inbound listener keeps what a resumption needs (`tls.session_store`)."""

    AUTO = "auto"  # memory with one worker, tickets with several
    MEMORY = "memory"  # this process keeps the session; the ticket is only its ID
    TICKETS = "tickets"  # the session travels encrypted in the ticket; any worker resumes
