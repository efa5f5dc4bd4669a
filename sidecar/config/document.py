"""Reading the YAML document: a strict loader (no key twice in a mapping) and the `_Reader`
that walks it with YAML paths, collecting every problem instead of stopping at the first."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path

from sidecar import strict_yaml
from sidecar.config.values import _kind
from sidecar.problems import Problem, ProblemsError
from sidecar.strict_yaml import show as _show


def _load_yaml(text: str) -> object:
    try:
        return strict_yaml.load(text)
    except strict_yaml.YamlError as exc:
        raise ProblemsError([Problem(exc.where, f"not valid YAML: {exc.problem}")]) from None


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
        known = [f.name for f in fields(schema)
                 if f.name != "source" and f.metadata.get("yaml", True)]
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
