"""What `sidecar inspect` found wrong: one `Finding`, named by a rule, and the file problems."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sidecar.reasons import Reason


class FileProblem(StrEnum):
    """What can be wrong with a file before any certificate rule applies."""

    FILE_NOT_FOUND = "file_not_found"
    FILE_UNREADABLE = "file_unreadable"
    NO_CERTIFICATE = "no_certificate"
    MALFORMED_PEM = "malformed_pem"


@dataclass(frozen=True, slots=True)
class Finding:
    name: str  # a Reason, SvidRule or FileProblem value
    message: str  # about this file: what is wrong, concretely
    reason: Reason | None = None  # the SPEC reason it falls under, for its explanation and fix
