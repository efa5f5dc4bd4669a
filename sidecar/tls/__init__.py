"""TLS: contexts, the socket-owning engine, and error classification.

Nothing here knows whether it serves inbound or outbound traffic.
"""
