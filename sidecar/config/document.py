"""Reading the YAML document: a strict loader (no key twice in a mapping) and the `_Reader`
that walks it with YAML paths, collecting every problem instead of stopping at the first."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode

from sidecar.config.values import _kind, _show
from sidecar.problems import Problem, ProblemsError

# libyaml's loader where installed: the pure-Python one takes seconds on a deeply nested
# hostile file (fuzzed: 5,000 levels took 1.3-4 s), libyaml milliseconds.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a key written twice in one mapping.

    Plain PyYAML lets the last one win, so a second `listen:` pasted into a listener would
    quietly replace the first: the typo the unknown-key rule exists to catch.
    """

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
                    f"key {_show(key)} is written twice (first on line {first_line + 1}); keep one",
                    key_node.start_mark,
                )
            first_lines[(type(key), key)] = key_node.start_mark.line
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep)
        return mapping


def _load_yaml(text: str) -> object:
    where, message = "", ""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds no Python objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        message = exc.problem or exc.context or "unreadable"
    except yaml.YAMLError as exc:
        message = str(exc)
    except ValueError as exc:  # PyYAML lets some bad scalars through: 2024-13-01, huge ints
        message = f"a value is out of range: {exc}"
    except RecursionError:
        message = "nested too deeply"
    raise ProblemsError([Problem(where, f"not valid YAML: {message}")])


class _Reader:
    """Walks the YAML document, keeping every problem instead of stopping at the first."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[Problem] = []
        self.bad: set[str] = set()  # YAML paths with a problem; cross-checks skip them
        self.parsed: dict[str, object] = {}  # YAML path -> parsed value, for NOT_SUPPORTED_YET

    def report(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))
        self.bad.add(where)

    def mapping(self, raw: object, where: str, schema: type) -> dict[str, object]:
        """The known keys of `raw`, a mapping whose keys are the fields of `schema`."""
        known = [f.name for f in fields(schema) if f.name != "source"]
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(
                where, f"expected a mapping with keys {', '.join(known)}; found {_kind(raw)}"
            )
            return {}
        for key in raw:
            if key not in known:
                self.report(_join(where, str(key)), _unknown_key(str(key), known))
        return {k: v for k, v in raw.items() if k in known}

    def sequence(self, raw: object, where: str) -> list[object]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            hint = f"; for one item write [{raw}]" if isinstance(raw, str) else ""
            self.report(where, f"expected a list, found {_kind(raw)}{hint}")
            return []
        return raw

    def value[T](
        self,
        m: Mapping[str, object],
        key: str,
        where: str,
        parse: Callable[[object], T],
        default: T,
        *,
        missing: str = "",
    ) -> T:
        """Parse `m[key]`; a problem (or a missing required key) gives back `default`."""
        path = _join(where, key)
        if key not in m:
            if missing:
                self.report(path, f"is required: {missing}")
            return default
        try:
            parsed = parse(m[key])
        except ValueError as exc:
            self.report(path, str(exc))
            return default
        self.parsed[path] = parsed
        return parsed

    def path(self, raw: object) -> Path:
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise ValueError(f"expected a file path, found {_kind(raw)}")
        return self.base / raw  # an absolute `raw` replaces base

    def optional_path(self, raw: object) -> Path | None:
        return None if raw is None else self.path(raw)


def _find(node: object, segments: list[str], where: str) -> Iterator[tuple[str, object]]:
    """Each (YAML path, raw value) the document sets for a NOT_SUPPORTED_YET pattern."""
    if not segments:
        yield where, node
        return
    head, *rest = segments
    key = head.removesuffix("[]")
    if not isinstance(node, dict) or key not in node:
        return
    child, here = node[key], _join(where, key)
    if head == key:
        yield from _find(child, rest, here)
    elif isinstance(child, list):
        for i, item in enumerate(child):
            yield from _find(item, rest, f"{here}[{i}]")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    if close:
        return f"unknown key {_show(key)}; did you mean {close[0]!r}?"
    return f"unknown key {_show(key)}; the keys here are {', '.join(known)}"
