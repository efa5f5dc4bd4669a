"""What happened to a connection, in words spelled here only: its direction, how it
closed, what authorization decided, and what kTLS did for it.

These are the values of access-log fields and metric labels (SPEC.md). They travel as
these types through the proxy, the pump and observation, and become strings only at the
edge: the log line and the label, where a StrEnum already reads as its value.
"""

from __future__ import annotations

from enum import StrEnum


class Direction(StrEnum):
    """The `direction` label and log field: who dialed whom through the sidecar."""

    INBOUND = "inbound"  # a remote workload -> mTLS -> the local app
    OUTBOUND = "outbound"  # the local app -> mTLS -> a remote workload


class Close(StrEnum):
    """How a connection ended: the access log's `close` field.

    Only CLOSED is a clean end (each side ended its stream: close_notify or FIN). Every
    other end reaches the app as a TCP reset and the TLS peer as a reset without
    close_notify, so that no side takes a cut stream for a complete one."""

    CLOSED = "closed"
    TRUNCATED = "truncated"  # the TLS peer's stream ended without close_notify
    PEER_RESET = "peer_reset"  # the TLS peer reset the connection
    APP_RESET = "app_reset"  # the local app reset the connection
    ERROR = "error"  # a socket or TLS error other than a reset
    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    DRAIN = "drain"
    POLICY_RECHECK = "policy_recheck"
    # Ends before the pump runs:
    HANDSHAKE_FAILED = "handshake_failed"
    DENIED = "denied"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"


class DecisionKind(StrEnum):
    """The `decision` label of `sidecar_authz_decisions_total` and the log field (SPEC.md)."""

    ALLOW = "allow"
    DENY = "deny"
    AUDIT_DENY = "audit_deny"


# The `decision` of a request on an http listener that was refused as malformed before
# the policy was asked (the log field and the sidecar_http_requests_total label).
NO_DECISION = "none"


class KtlsState(StrEnum):
    """The `state` label of `sidecar_ktls_connections_total`, per connection and path."""

    ENABLED = "enabled"  # the kernel took this path's record keys
    FAILED = "failed"  # asked, and OpenSSL or the kernel declined for this connection
    UNAVAILABLE = "unavailable"  # tls.ktls: auto on a host that cannot: never asked


class StreamState(StrEnum):
    """The `state` label of `sidecar_workload_api_stream_state`: where the Workload API
    stream stands."""

    CONNECTING = "connecting"  # dialing the agent, or waiting for its first response
    STREAMING = "streaming"  # the stream is open and has answered
    BACKOFF = "backoff"  # the last attempt failed; waiting to try again
    STOPPED = "stopped"  # the source was stopped (drain)


class StreamFailure(StrEnum):
    """The `reason` label of `sidecar_workload_api_stream_failures_total`: why a stream to
    the agent ended or could not begin."""

    SOCKET_MISSING = "socket_missing"  # no socket file: the agent is not (yet) running
    REFUSED = "refused"  # the socket is there but nobody accepts: the agent restarting
    PERMISSION_DENIED = "permission_denied"  # no registration entry matches us (yet)
    UNAVAILABLE = "unavailable"  # the agent aborted the stream or went away mid-stream
    ENDED = "ended"  # the agent closed the stream cleanly
    STALLED = "stalled"  # no answer in time: nothing at first, or nothing by rotation time
    INVALID_ARGUMENT = "invalid_argument"  # the agent refused the request itself
    OTHER = "other"


class UpdateResult(StrEnum):
    """The `result` label of `sidecar_workload_api_updates_total`: what became of one
    response of the agent."""

    APPLIED = "applied"  # a new identity (SVID, bundles or CRLs) is in force
    UNCHANGED = "unchanged"  # the same material again (a new stream starts with it)
    REJECTED = "rejected"  # it failed the checks; the previous identity stays
