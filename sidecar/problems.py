"""The one error type for bad input files: every problem names where it is.

Config, policy and identity loaders collect every problem they find (a user fixing a file
wants the whole list, not one error per run) and raise them together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input, located by a YAML path or a file name."""

    where: str  # "inbound[0].listen", "policy.yaml: rules[2].from[0]", "svid.pem"
    message: str  # what is wrong, why, and what to do

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ProblemsError(ValueError):
    """Raised with every problem found in one input; str() lists them one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
