"""Reading a policy file: every problem listed with its YAML path, then compiled into a
`Policy`; and the warnings about rules that cannot match at the connection level."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Collection, Iterable, Iterator
from enum import StrEnum
from pathlib import Path

from sidecar import files, strict_yaml
from sidecar.http1.path import normalize
from sidecar.policy.model import (
    DEFAULT_RULE,
    INVALID_PEER_RULE,
    NO_POLICY_RULE,
    Action,
    Mode,
    Policy,
    Rule,
)
from sidecar.problems import Problem, ProblemsError
from sidecar.spiffe import SpiffeIdError, SpiffePattern
from sidecar.strict_yaml import show as _show

_RESERVED_NAMES = frozenset({DEFAULT_RULE, NO_POLICY_RULE, INVALID_PEER_RULE})

# Rule names become metric label values and log fields: keep them short, plain tokens.
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_METHOD_RE = re.compile(r"[A-Z]+")  # HTTP methods are case-sensitive (RFC 9110 9.1)
_TOP_KEYS = ("mode", "default", "rules")
_RULE_KEYS = ("name", "action", "from", "to")
_TO_KEYS = ("listeners", "methods", "paths")


class _PolicyReader:
    """Walks the parsed YAML, collecting every problem with its path."""

    def __init__(self, source: str, listeners: Collection[str] | None) -> None:
        self.source = source
        self.listeners = None if listeners is None else frozenset(listeners)
        self.problems: list[Problem] = []
        self.named: dict[str, int] = {}  # rule name -> index of the rule that took it

    def problem(self, where: str, message: str) -> None:
        self.problems.append(Problem(f"{self.source}: {where}" if where else self.source, message))

    def mapping(self, value: object, where: str, keys: tuple[str, ...], what: str) -> bool:
        if not isinstance(value, dict):
            self.problem(where, f"{what} must be a mapping, not {_show(value)}")
            return False
        for key in value:
            if key not in keys:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(keys)}"
                at = f"{where}.{key}" if where else str(key)
                self.problem(at, f"unknown key {_show(key)}; {hint}")
        return True

    def choice[E: StrEnum](self, value: object, where: str, kind: type[E]) -> E | None:
        if isinstance(value, str) and value in {member.value for member in kind}:
            return kind(value)
        choices = " or ".join(member.value for member in kind)
        hint = " (YAML reads unquoted yes/no/on/off as booleans)" if isinstance(value, bool) else ""
        self.problem(where, f"{_show(value)} is not valid here: write {choices}{hint}")
        return None

    def strings(self, value: object, where: str, what: str) -> Iterator[tuple[str, str]]:
        """The strings of a non-empty list, as (path, string); a problem for anything else.

        A generator, so problems are recorded in file order with the caller's own.
        """
        if not isinstance(value, list) or not value:
            self.problem(where, f"must be a non-empty list of {what}, not {_show(value)}")
            return
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield f"{where}[{i}]", item
            else:
                self.problem(f"{where}[{i}]", f"must be a string ({what}), not {_show(item)}")

    def policy(self, doc: object, text: str) -> Policy | None:
        if doc is None:
            self.problem("", "the policy is empty: write at least `default: deny` and rules")
            return None
        if not self.mapping(doc, "", _TOP_KEYS, "the policy"):
            return None
        assert isinstance(doc, dict)
        mode = self.choice(doc.get("mode", Mode.ENFORCE.value), "mode", Mode)
        default = self.choice(doc.get("default", Action.DENY.value), "default", Action)
        raw_rules = doc.get("rules", [])
        if not isinstance(raw_rules, list):
            self.problem(
                "rules", f"must be a list of rules (`rules: []` for none), not {_show(raw_rules)}"
            )
            raw_rules = []
        rules = [self.rule(raw, i) for i, raw in enumerate(raw_rules)]
        if self.problems or mode is None or default is None:
            return None
        version = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return Policy(tuple(r for r in rules if r), default, mode, self.source, version)

    def rule(self, raw: object, index: int) -> Rule | None:
        where = f"rules[{index}]"
        if not self.mapping(raw, where, _RULE_KEYS, "a rule"):
            return None
        assert isinstance(raw, dict)
        before = len(self.problems)
        name = self.rule_name(raw.get("name"), index)
        action = None
        if "action" in raw:
            action = self.choice(raw["action"], f"{where}.action", Action)
        else:
            self.problem(f"{where}.action", "missing: write `action: allow` or `action: deny`")
        peers = self.peers(raw, where)
        listeners, methods, paths = self.target(raw.get("to"), f"{where}.to", "to" in raw)
        if len(self.problems) != before or name is None or action is None:
            return None
        return Rule(name, action, tuple(peers), listeners, tuple(methods), tuple(paths))

    def rule_name(self, name: object, index: int) -> str | None:
        where = f"rules[{index}].name"
        if name is None:
            self.problem(where, "missing: every rule needs a name; it labels its decisions")
        elif not isinstance(name, str) or _RULE_NAME_RE.fullmatch(name) is None:
            self.problem(
                where,
                f"{_show(name)} is not a valid rule name: use 1-128 letters, digits, "
                "'.', '_', ':' or '-', starting with a letter or digit",
            )
        elif name in _RESERVED_NAMES:
            self.problem(where, f"{name!r} is reserved: it labels decisions no rule made")
        elif name in self.named:
            self.problem(
                where,
                f"{name!r} is already the name of rules[{self.named[name]}]; names must be "
                "unique, they label decisions in metrics and logs",
            )
        else:
            self.named[name] = index
            return name
        return None

    def peers(self, raw: dict[object, object], where: str) -> list[SpiffePattern]:
        # A rule without `from` would apply to everyone; that must be written out
        # (`spiffe://td/*`), never implied by a forgotten key.
        if "from" not in raw:
            self.problem(
                f"{where}.from",
                "missing: every rule must say whose connections it applies to, e.g. "
                "from: [spiffe://example.org/ns/web/sa/frontend]",
            )
            return []
        found = []
        for at, text in self.strings(raw["from"], f"{where}.from", "SPIFFE IDs or prefixes"):
            pattern = self.peer(text, at)
            if pattern is not None:
                found.append(pattern)
        return found

    def peer(self, text: str, where: str) -> SpiffePattern | None:
        try:
            return SpiffePattern.parse(text)
        except SpiffeIdError as error:
            self.problem(where, str(error))
            return None

    def target(
        self, to: object, where: str, present: bool
    ) -> tuple[tuple[str, ...] | None, list[str], list[str]]:
        if not present:
            return None, [], []
        if not self.mapping(to, where, _TO_KEYS, "`to`"):
            return None, [], []
        assert isinstance(to, dict)
        listeners = None
        if "listeners" in to:
            listeners = tuple(self.listener_names(to["listeners"], f"{where}.listeners"))
        methods = []
        if "methods" in to:
            for at, method in self.strings(to["methods"], f"{where}.methods", "HTTP methods"):
                if _METHOD_RE.fullmatch(method) is None:
                    self.problem(at, f"{_show(method)}: HTTP methods are uppercase, like GET")
                else:
                    methods.append(method)
        paths = []
        if "paths" in to:
            for at, path in self.strings(to["paths"], f"{where}.paths", "URL paths"):
                if not path.startswith("/") or "*" in path.removesuffix("/*"):
                    self.problem(
                        at, f"{_show(path)}: a path starts with '/' and may end with '/*'"
                    )
                    continue
                if "?" in path:
                    # (normalize would say "must be percent-encoded", which would match a
                    # literal %3F in the path, never a query)
                    self.problem(at, f"{_show(path)}: the query is not judged by the "
                                 f"policy, only the path: write {_show(path.split('?')[0])}")
                    continue
                base = path.removesuffix("*")
                normal = normalize(base.encode("utf-8", "surrogateescape"))
                if isinstance(normal, str):
                    self.problem(at, f"{_show(path)}: never matches: {normal}")
                elif normal.decode("ascii") != base:
                    self.problem(
                        at, f"{_show(path)}: requests are matched on their normalized path, "
                        f"so write {_show(normal.decode('ascii') + path[len(base):])}")
                else:
                    paths.append(path)
        return listeners, methods, paths

    def listener_names(self, value: object, where: str) -> Iterable[str]:
        for at, name in self.strings(value, where, "inbound listener names"):
            if self.listeners is not None and name not in self.listeners:
                known = ", ".join(sorted(self.listeners)) or "there are none"
                self.problem(at, f"{name!r} is not an inbound listener of the config ({known})")
            else:
                yield name


def parse_policy(text: str, source: str, listeners: Collection[str] | None = None) -> Policy:
    """Validate and compile a policy; raise `ProblemsError` listing every problem.

    `listeners`: the inbound listener names of the config; when given, a rule naming any
    other listener is an error (a typo must not silently narrow a rule to nothing).
    """
    reader = _PolicyReader(source, listeners)
    try:
        doc = strict_yaml.load(text)  # libyaml: a 10,000-rule policy is seconds in pure Python
    except strict_yaml.YamlError as exc:
        where = f" ({exc.where})" if exc.where else ""
        raise ProblemsError([Problem(source, f"not valid YAML{where}: {exc.problem}")]) from None
    policy = reader.policy(doc, text)
    if policy is None:
        raise ProblemsError(reader.problems)
    return policy


def load_policy(path: Path, listeners: Collection[str] | None = None) -> Policy:
    """Read and parse a policy file; raise `ProblemsError` on any problem."""
    try:
        text = files.read_regular(path).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProblemsError([Problem(str(path), f"not UTF-8 text (byte {error.start})")]) from None
    except OSError as error:
        reason = error.strerror or str(error)
        raise ProblemsError([Problem(str(path), f"cannot read the policy: {reason}")]) from None
    return parse_policy(text, str(path), listeners)


def policy_warnings(policy: Policy, tcp_listeners: Collection[str]) -> list[Problem]:
    """Rules that name methods or paths, and so never match these tcp listeners."""
    tcp = frozenset(tcp_listeners)
    warnings = []
    for i, rule in enumerate(policy.rules):
        if not rule.http_only:
            continue
        scope = tcp if rule.listeners is None else tcp.intersection(rule.listeners)
        if scope:
            warnings.append(
                Problem(
                    f"{policy.source}: rules[{i}].to",
                    f"rule {rule.name!r} names methods or paths, which only http listeners "
                    f"check; it never matches tcp listener(s) {', '.join(sorted(scope))}",
                )
            )
    return warnings
