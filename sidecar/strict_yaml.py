"""YAML as the config and the policy are read: safe, strict about a key written twice, and
shown back in messages without letting a hostile value blow up.

- `load` builds plain Python values only (a SafeLoader), with libyaml where installed:
  the pure-Python loader takes seconds on a deeply nested hostile file (fuzzed: 5,000
  levels took 1.3-4 s), libyaml milliseconds.
- A key written twice in one mapping is an error. Plain PyYAML lets the last one win, so a
  second `listen:` pasted into a listener, or a stray second `default: allow` in a
  policy, would quietly replace the first.
- `show` bounds what a message repeats of a value: repr() of an alias bomb would take
  minutes and gigabytes, and a message must stay one line.
"""

from __future__ import annotations

import reprlib
from collections.abc import Hashable
from enum import StrEnum
from typing import Any

import yaml
from yaml.nodes import MappingNode

_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SHOWN_CHARS = 80
_BOUNDED = reprlib.Repr(maxlevel=2, maxlist=4, maxdict=4, maxstring=80, maxother=80)


class YamlError(Exception):
    """Not valid YAML: what is wrong, and where when the parser knows (1-based)."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None):
        super().__init__(problem)
        self.problem = problem
        self.line = line
        self.column = column

    @property
    def where(self) -> str:
        return "" if self.line is None else f"line {self.line}, column {self.column}"


class _StrictLoader(_SafeLoader):  # type: ignore[misc]
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_lines: dict[tuple[type, object], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<:` may be overridden; that is their point
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_lines.get((type(key), key))
            except TypeError:
                continue  # unhashable; the base class reports it with its position
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {show(key)} is written twice (first on line {first_line + 1}); keep one",
                    key_node.start_mark,
                )
            first_lines[(type(key), key)] = key_node.start_mark.line
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return mapping


def load(text: str) -> object:
    """The document's value; YamlError when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "unreadable"
        if mark is None:
            raise YamlError(problem) from None
        raise YamlError(problem, mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise YamlError(str(exc)) from None
    except ValueError as exc:  # PyYAML lets some bad scalars through: 2024-13-01, huge ints
        raise YamlError(f"a value is out of range: {exc}") from None
    except RecursionError:
        raise YamlError("nested too deeply") from None


def show(value: object) -> str:
    """A value as the user wrote it in YAML, cut short: messages must stay one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = _BOUNDED.repr(value.value if isinstance(value, StrEnum) else value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
