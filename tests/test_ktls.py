"""tls/ktls.py: the loopback probe runs its handshake with a certificate made in tls/."""

from __future__ import annotations

import ssl

import pytest

from sidecar.tls import ktls

pytestmark = pytest.mark.timeout(20)


@pytest.mark.skipif(not hasattr(ssl, "OP_ENABLE_KTLS"), reason="no ssl.OP_ENABLE_KTLS")
def test_the_probe_handshake_completes() -> None:
    """Whether the kernel took TX over depends on the host; the handshake must not fail."""
    support = ktls._handshake_probe()
    assert "handshake failed" not in support.why, support.why


def test_the_probe_certificate_is_a_usable_server_certificate() -> None:
    from sidecar.tls.contexts import _in_memory_file

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _in_memory_file(ktls._probe_certificate()) as path:
        ctx.load_cert_chain(path)
