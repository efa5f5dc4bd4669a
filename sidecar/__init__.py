"""sidecar: an asyncio mTLS sidecar proxy for SPIFFE workloads."""

__version__ = "0.1.0"
