"""What `sidecar run` refuses or warns about before it serves, one function per rule.

`run` (server.py, and the supervisor in workers.py) and `sidecar check` call these same
functions, as they load the identity and policy through snapshots.py: a rule with two homes
drifts (check once loaded the identity by its own copy and skipped the CRL that run loads,
so a garbage CRL passed check and stopped run). A new start-time refusal or warning goes
here, and both commands say it.

Refusals are `ProblemsError` or a message; warnings are `Problem`s, each saying what will go
wrong and what to do.
"""

from __future__ import annotations

import datetime as dt
import logging

from cryptography import x509

from sidecar import spiffe
from sidecar.config import Config, KtlsMode, SessionStore
from sidecar.identity import Identity
from sidecar.observe import logs
from sidecar.problems import Problem
from sidecar.tls import contexts as tls_contexts
from sidecar.tls import ktls


def ktls_refusal(mode: KtlsMode, support: ktls.Support) -> str | None:
    """Why `tls.ktls: on` cannot be honoured here, or None."""
    if mode == KtlsMode.ON and not support.available:
        return f"tls.ktls is on, but kTLS is not available here: {support.why}"
    return None


def ktls_support(mode: KtlsMode) -> tuple[ktls.Support, str | None]:
    """Settle the kTLS mode `run` serves with, said in the log, and the refusal when
    `tls.ktls: on` cannot be honoured."""
    if mode == KtlsMode.OFF:
        return ktls.Support(False, "tls.ktls: off"), None
    support = ktls.detect()
    refusal = ktls_refusal(mode, support)
    if support.available:
        logs.event(logging.INFO, "kTLS available", detail=support.why)
    elif refusal is None:
        logs.event(logging.INFO, "kTLS unavailable; using user-space TLS", detail=support.why)
    return support, refusal


def pin_refusal() -> str | None:
    """Why the key-exchange groups and signature algorithms cannot be pinned here, or None:
    serving OpenSSL's defaults would reopen the finite-field CPU DoS, so run refuses."""
    return tls_contexts.unpinnable()


def config_warnings(config: Config, workers: int) -> list[Problem]:
    """What in a valid config will not do what its author expects, with `workers`
    processes serving it (config.workers, `auto` resolved)."""
    out: list[Problem] = []
    if not config.inbound and not config.outbound:
        out.append(Problem("", "no listener: neither inbound nor outbound is configured, so "
                               "this sidecar proxies nothing; add a listener"))
    if workers > 1 and config.tls.session_store == SessionStore.MEMORY:
        out.append(Problem("tls.session_store", f"memory with {workers} workers: a session "
                           "kept by one worker does not resume on another, and the kernel "
                           f"spreads a peer's connections over all {workers}, so most "
                           "resumptions fail; use tickets (or auto, which picks them)"))
    return out


def identity_warnings(config: Config, identity: Identity, now: dt.datetime) -> list[Problem]:
    """What in a loadable identity will not do what its author expects."""
    return [*foreign_cas(config, identity), *_expiring(config, identity, now)]


def log_warnings(config: Config, identity: Identity, workers: int) -> None:
    """`run` says at start what `check` prints as warnings."""
    for w in (*config_warnings(config, workers),
              *identity_warnings(config, identity, dt.datetime.now(dt.UTC))):
        logs.event(logging.WARNING, f"warning: {w}", where=w.where or None)


def foreign_cas(config: Config, identity: Identity) -> list[Problem]:
    """CAs in our bundle file that name another trust domain (a merged federation bundle,
    as spiffe-helper writes one): bundles are never merged, so they vouch for nobody."""
    ours = identity.trust_domain
    out = []
    for ca in identity.own_bundle.cas:
        td = ca_trust_domain(ca)
        if td is not None and td != ours:
            out.append(Problem(str(config.identity.bundle), (
                f"the CA '{ca.subject.rfc4514_string()}' belongs to trust domain {td}, not "
                f"ours ({ours}): it is not used to verify {td} peers (bundles are never "
                f"merged); put it in its own file under identity.federated_bundles.{td}")))
    return out


def ca_trust_domain(ca: x509.Certificate) -> str | None:
    """The trust domain a CA names in its spiffe:// URI SAN (SPIRE writes one), or None."""
    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return None
    for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return spiffe.SpiffeId.parse(uri).trust_domain.name
        except spiffe.SpiffeIdError:
            continue
    return None


def _expiring(config: Config, identity: Identity, now: dt.datetime) -> list[Problem]:
    left = identity.not_after - now
    lifetime = identity.not_after - identity.leaf.not_valid_before_utc
    if left >= lifetime / 3:
        return []
    return [Problem(str(config.identity.cert), f"expires in {_human(left)}: less than a "
                    "third of its lifetime left; is the issuer rotating?")]


def _human(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s < 0:
        return f"{_human(-delta)} ago"
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60} min" if s >= 60 else f"{s}s"
