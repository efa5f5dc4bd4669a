"""The one error type of the dev PKI."""

from __future__ import annotations


class PkiError(Exception):
    """A dev-PKI operation failed; the message says what to do next."""
