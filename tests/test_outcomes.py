"""The connection vocabularies (sidecar/outcomes.py) have one home: the modules that record
and count connections use the types, never a free string of their values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sidecar.outcomes import Close, DecisionKind, Direction, KtlsState

SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"
# The modules a connection's outcome is written or counted in.
USERS = sorted([*SIDECAR.glob("proxy/*.py"), SIDECAR / "server.py", SIDECAR / "metrics.py",
                SIDECAR / "tls" / "resumption.py"])
# "error" is also the `result` of a handshake or a reload, a vocabulary of its own.
WORDS = {m.value for e in (Close, DecisionKind, Direction, KtlsState) for m in e} - {"error"}


def _free_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    slots = {id(c) for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
             for c in ast.walk(node.value)}
    return [f"{path.relative_to(SIDECAR)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in WORDS and id(node) not in slots]


@pytest.mark.parametrize("path", USERS, ids=lambda p: str(p.relative_to(SIDECAR)))
def test_no_free_string_of_a_connection_vocabulary(path: Path) -> None:
    assert _free_strings(path) == []


def test_a_member_reads_as_its_value_at_the_edge() -> None:
    # The log line and the metric label take the enum itself: it must read as the word.
    assert f"{Close.POLICY_RECHECK}" == "policy_recheck"
    assert str(Direction.INBOUND) == "inbound"
