"""The connection vocabularies (sidecar/outcomes.py) and the run modes (sidecar/modes.py)
have one home: the modules that act on them use the types, never a free string of their
values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sidecar.modes import KtlsMode, SessionStore, TlsVersion
from sidecar.outcomes import Close, DecisionKind, Direction, KtlsState

SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"
# The modules a connection's outcome is written or counted in.
USERS = sorted([*SIDECAR.glob("proxy/*.py"), SIDECAR / "run" / "server.py",
                SIDECAR / "observe" / "metrics.py", SIDECAR / "tls" / "resumption.py"])
# "error" is also the `result` of a handshake or a reload, a vocabulary of its own.
WORDS = {m.value for e in (Close, DecisionKind, Direction, KtlsState) for m in e} - {"error"}


# The modules that act on the run modes (the config parses them; these never re-spell them).
MODE_USERS = sorted([*SIDECAR.glob("tls/*.py"), *SIDECAR.glob("proxy/*.py"),
                     SIDECAR / "run" / "server.py", SIDECAR / "run" / "workers.py",
                     SIDECAR / "tools" / "check.py"])
MODE_WORDS = {m.value for e in (KtlsMode, SessionStore, TlsVersion) for m in e}
# /status's word for "no store": resumption is off (contexts.session_store is None).
EDGES = {"tls/resumption.py": {"off"}}


def _free_strings(path: Path, words: set[str] = WORDS) -> list[str]:
    tree = ast.parse(path.read_text())
    slots = {id(c) for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
             for c in ast.walk(node.value)}
    return [f"{path.relative_to(SIDECAR)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in words and id(node) not in slots]


@pytest.mark.parametrize("path", USERS, ids=lambda p: str(p.relative_to(SIDECAR)))
def test_no_free_string_of_a_connection_vocabulary(path: Path) -> None:
    assert _free_strings(path) == []


@pytest.mark.parametrize("path", MODE_USERS, ids=lambda p: str(p.relative_to(SIDECAR)))
def test_no_free_string_of_a_run_mode(path: Path) -> None:
    allowed = EDGES.get(str(path.relative_to(SIDECAR)), set())
    assert _free_strings(path, MODE_WORDS - allowed) == []


def test_a_member_reads_as_its_value_at_the_edge() -> None:
    # The log line and the metric label take the enum itself: it must read as the word.
    assert f"{Close.POLICY_RECHECK}" == "policy_recheck"
    assert str(Direction.INBOUND) == "inbound"
