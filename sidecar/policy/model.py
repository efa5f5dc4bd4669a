"""The policy as compiled once per load, and `Policy.decide`: pure, no I/O (the cost of a
decision is in the package's docstring)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.outcomes import DecisionKind
from sidecar.spiffe import PatternKind, SpiffeId, SpiffePattern


class Mode(StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"  # count and log what would be denied, and allow it


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


# The `rule` label when no rule of the file decided. They are reserved as rule names so a
# metric or log line always says unambiguously where a decision came from.
DEFAULT_RULE = "default"
NO_POLICY_RULE = "no_policy"
INVALID_PEER_RULE = "invalid_peer_id"


_NEVER = sys.maxsize  # "no rule": larger than any rule index, so min() picks a real one


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    rule: str  # the deciding rule's name, or DEFAULT_RULE / NO_POLICY_RULE / INVALID_PEER_RULE

    @property
    def allowed(self) -> bool:
        return self.kind is not DecisionKind.DENY


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    peers: tuple[SpiffePattern, ...]  # the `from` entries
    listeners: tuple[str, ...] | None = None  # None: every inbound listener
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        """True when the rule names methods or paths, so it never matches a tcp listener."""
        return bool(self.methods or self.paths)


# One index slot: (first deny, first allow) rule indexes for rules on every listener, and
# the same per listener for listener-scoped rules (None when there are none).
type _Slot = tuple[int, int, Mapping[str, tuple[int, int]] | None]


@dataclass(frozen=True, slots=True)
class _Index:
    exact: Mapping[str, _Slot]  # key: trust domain + full path
    under: Mapping[str, _Slot]  # key: trust domain + the path IDs are strictly under


def _compile(rules: tuple[Rule, ...]) -> _Index:
    # Mutable while building: [deny, allow, {listener: [deny, allow]}]
    tables: dict[PatternKind, dict[str, tuple[list[int], dict[str, list[int]]]]] = {
        PatternKind.EXACT: {},
        PatternKind.PREFIX: {},
    }
    for index, rule in enumerate(rules):
        if rule.http_only:
            continue
        column = 0 if rule.action is Action.DENY else 1
        for pattern in rule.peers:
            kind = PatternKind.EXACT if pattern.kind is PatternKind.EXACT else PatternKind.PREFIX
            everywhere, by_listener = tables[kind].setdefault(pattern.key, ([_NEVER, _NEVER], {}))
            pairs = (
                [everywhere]
                if rule.listeners is None
                else [by_listener.setdefault(name, [_NEVER, _NEVER]) for name in rule.listeners]
            )
            for pair in pairs:
                # Rules are visited in file order, so the first one set stays.
                pair[column] = min(pair[column], index)

    def freeze(table: dict[str, tuple[list[int], dict[str, list[int]]]]) -> dict[str, _Slot]:
        return {
            key: (
                everywhere[0],
                everywhere[1],
                {name: (pair[0], pair[1]) for name, pair in by_listener.items()} or None,
            )
            for key, (everywhere, by_listener) in table.items()
        }

    return _Index(freeze(tables[PatternKind.EXACT]), freeze(tables[PatternKind.PREFIX]))


# The http-only rules under each peer key, in file order: (exact, under), as _Index is.
type _HttpIndex = tuple[Mapping[str, tuple[int, ...]], Mapping[str, tuple[int, ...]]]


def _compile_http(rules: tuple[Rule, ...]) -> _HttpIndex:
    exact: dict[str, list[int]] = {}
    under: dict[str, list[int]] = {}
    for index, rule in enumerate(rules):
        if not rule.http_only:
            continue
        for pattern in rule.peers:
            table = exact if pattern.kind is PatternKind.EXACT else under
            found = table.setdefault(pattern.key, [])
            if not found or found[-1] != index:  # two patterns of one rule: listed once
                found.append(index)
    return ({k: tuple(v) for k, v in exact.items()}, {k: tuple(v) for k, v in under.items()})


@dataclass(frozen=True, slots=True)
class _Target:
    """One http-only rule as a request is matched against it."""

    index: int  # the rule's place in the file: the lower wins among its kind
    deny: bool
    methods: frozenset[str] | None  # None: every method
    exact: frozenset[str]  # paths that must equal the request path
    prefixes: tuple[str, ...]  # `/api/*` as "/api/": paths that must start so
    any_path: bool  # the rule names no paths

    @classmethod
    def of(cls, index: int, rule: Rule) -> _Target:
        exact = frozenset(p for p in rule.paths if not p.endswith("/*"))
        prefixes = tuple(p[:-1] for p in rule.paths if p.endswith("/*"))
        return cls(index, rule.action is Action.DENY,
                   frozenset(rule.methods) if rule.methods else None, exact, prefixes,
                   not rule.paths)


class RequestRules:
    """What a policy says of one peer on one http listener, request by request: made once
    per connection (`Policy.for_peer`), so a request costs a walk over only the http rules
    that name this peer and listener, not a policy lookup."""

    __slots__ = ("_allow", "_decisions", "_deny", "_fallback", "_targets", "fixed")

    def __init__(self, deny: int, allow: int, targets: tuple[_Target, ...],
                 decisions: tuple[Decision, ...], fallback: Decision,
                 fixed: Decision | None = None) -> None:
        self._deny, self._allow = deny, allow  # from the rules without methods or paths
        self._targets = targets
        self._decisions = decisions
        self._fallback = fallback
        # The decision of every request, when no http rule can change it (no http rule
        # names this peer, or a connection-level deny precedes them all).
        self.fixed = fixed

    def decide(self, method: str, path: str) -> Decision:
        """May this request (its method, and its normalized path) pass? Never raises."""
        if self.fixed is not None:
            return self.fixed
        deny, allow = self._deny, self._allow
        # In file order; none comes after the connection-level deny (for_peer leaves
        # them out), and the loop ends at the first http deny: no later rule can win.
        for target in self._targets:
            if target.index > allow and not target.deny:
                continue  # an allow after the first one found
            methods = target.methods
            if (methods is None or method in methods) and (
                    target.any_path or path in target.exact
                    or (target.prefixes and path.startswith(target.prefixes))):
                if target.deny:
                    deny = target.index
                    break  # any later rule's index is higher
                allow = target.index
        if deny != _NEVER:
            return self._decisions[deny]
        if allow != _NEVER:
            return self._decisions[allow]
        return self._fallback


_INVALID_PEER = Decision(DecisionKind.DENY, INVALID_PEER_RULE)


def _merge(slot: _Slot, listener: str, deny: int, allow: int) -> tuple[int, int]:
    everywhere_deny, everywhere_allow, by_listener = slot
    deny, allow = min(deny, everywhere_deny), min(allow, everywhere_allow)
    if by_listener is not None:
        scoped = by_listener.get(listener)
        if scoped is not None:
            deny, allow = min(deny, scoped[0]), min(allow, scoped[1])
    return deny, allow


def _names(listeners: tuple[str, ...] | None, listener: str) -> bool:
    return listeners is None or listener in listeners


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """A validated, compiled policy; immutable, so a reload swaps the whole object."""

    rules: tuple[Rule, ...]
    default: Action = Action.DENY
    mode: Mode = Mode.ENFORCE
    source: str = ""  # where it was read from, for messages
    version: str = ""  # short sha256 of the source text
    default_rule: str = DEFAULT_RULE  # the `rule` label when no rule matches
    _index: _Index = field(init=False, repr=False)
    _decisions: tuple[Decision, ...] = field(init=False, repr=False)  # one per rule
    _fallback: Decision = field(init=False, repr=False)
    _http_index: _HttpIndex = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        object.__setattr__(self, "_index", _compile(self.rules))
        object.__setattr__(
            self, "_decisions", tuple(self._outcome(r.action, r.name) for r in self.rules)
        )
        object.__setattr__(self, "_fallback", self._outcome(self.default, self.default_rule))
        object.__setattr__(self, "_http_index", _compile_http(self.rules))

    def _outcome(self, action: Action, rule: str) -> Decision:
        if action is Action.ALLOW:
            return Decision(DecisionKind.ALLOW, rule)
        kind = DecisionKind.AUDIT_DENY if self.mode is Mode.AUDIT else DecisionKind.DENY
        return Decision(kind, rule)

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    def decide(self, peer: SpiffeId, listener: str) -> Decision:
        """May `peer` (already authenticated) use inbound `listener`? Never raises.

        An ID that names no workload (a trust domain's own ID, without a path) is denied
        even in audit mode: it means authentication let something through that it must
        not, which audit cannot excuse.
        """
        if not peer.path:
            return _INVALID_PEER
        key = peer.trust_domain.name + peer.path  # as SpiffePattern.key spells it
        deny = allow = _NEVER
        slot = self._index.exact.get(key)
        if slot is not None:
            deny, allow = _merge(slot, listener, deny, allow)
        under = self._index.under
        # Each "/" ends a proper prefix: "td" (whole trust domain), "td/a", "td/a/b", ...
        cut = key.find("/")
        while cut != -1:
            slot = under.get(key[:cut])
            if slot is not None:
                deny, allow = _merge(slot, listener, deny, allow)
            cut = key.find("/", cut + 1)
        if deny != _NEVER:
            return self._decisions[deny]
        if allow != _NEVER:
            return self._decisions[allow]
        return self._fallback

    def for_peer(self, peer: SpiffeId, listener: str) -> RequestRules:
        """The per-request decisions for `peer` on http `listener`. A request matches the
        rules `decide` weighs (no methods, no paths: every request) and the http rules
        whose methods and paths it fits; deny wins, then the first allow, then `default`,
        as for a connection. `decide` itself is left as it is: tcp listeners pay nothing
        for http rules."""
        if not peer.path:
            return RequestRules(_NEVER, _NEVER, (), self._decisions, self._fallback,
                                fixed=_INVALID_PEER)
        key = peer.trust_domain.name + peer.path
        deny = allow = _NEVER
        exact_http, under_http = self._http_index
        found: list[int] = list(exact_http.get(key, ()))
        slot = self._index.exact.get(key)
        if slot is not None:
            deny, allow = _merge(slot, listener, deny, allow)
        cut = key.find("/")
        while cut != -1:
            prefix = key[:cut]
            slot = self._index.under.get(prefix)
            if slot is not None:
                deny, allow = _merge(slot, listener, deny, allow)
            found.extend(under_http.get(prefix, ()))
            cut = key.find("/", cut + 1)
        targets = tuple(
            _Target.of(i, self.rules[i]) for i in sorted(set(found))
            if i < deny and _names(self.rules[i].listeners, listener))
        fixed = None
        if not targets:
            fixed = (self._decisions[deny] if deny != _NEVER else self._decisions[allow]
                     if allow != _NEVER else self._fallback)
        return RequestRules(deny, allow, targets, self._decisions, self._fallback, fixed)


DENY_ALL = Policy(rules=(), source="", version="none", default_rule=NO_POLICY_RULE)
"""In force when no valid policy was ever loaded: every connection is denied."""
