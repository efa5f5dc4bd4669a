"""Authorization: the policy file, compiled once per load, and `Policy.decide`.

Authentication has already proved who the peer is; this module only answers "may that
SPIFFE ID use this inbound listener?". It is pure: no TLS, no sockets, and the only I/O is
`load_policy` reading one file.

Semantics (SPEC.md, "Policy file"):
- a rule matches when one of its `from` patterns matches the peer and its `to.listeners`
  (omitted: every inbound listener) includes the listener;
- any matching deny rule wins over every allow rule; with no match, `default` decides;
  there is no implicit allow: a missing `default` means deny;
- in audit mode a deny is reported as `audit_deny` and let through;
- a rule naming `methods` or `paths` is for http listeners and never matches at the
  connection level, which is what `decide` answers (`policy_warnings` points out such
  rules scoped to tcp listeners); an http listener asks `for_peer(peer,
  listener).decide(method, path)` per request, which weighs both kinds of rules;
- the reported rule is deterministic: the first matching deny rule in file order, else the
  first matching allow rule in file order.

Patterns (`spiffe.SpiffePattern`, which the outbound's `expect_ids` use too): an exact
ID; `spiffe://td/a/b/*`, every ID strictly under `/a/b` on a segment boundary (`/a/b/c`,
`/a/b/c/d`, not `/a/b` and not `/a/bc`); `spiffe://td/*`, every workload ID of the trust
domain; trust domains compare case-insensitively. A peer ID without a path names a trust
domain, not a workload (X.509-SVID 5.2 forbids it on a leaf), so it is denied.

Cost: compiling turns the rules into two dicts keyed by the plain string
`trust_domain + path`: exact IDs, and the paths patterns match under (`""` for a whole
trust domain). The peer comes as a `SpiffeId`, parsed once by authentication, never per
decision. A decision is one lookup for the exact ID plus one per proper path prefix of
the peer, so it grows with the peer's path depth, never with the number of rules. Each
key holds the first deny and first allow rule for every listener plus, only if some rules
are listener-scoped, the same per listener: one table, whatever the number of listeners.
Per request, `for_peer` does that walk once per connection and keeps the http rules that
name the peer and listener; a request then costs a walk over those few rules (none at
all when no http rule names the peer), `decide` for tcp listeners is unchanged.
"""


from __future__ import annotations

from sidecar.outcomes import DecisionKind
from sidecar.policy.model import (
    DEFAULT_RULE,
    DENY_ALL,
    INVALID_PEER_RULE,
    NO_POLICY_RULE,
    Action,
    Decision,
    Mode,
    Policy,
    RequestRules,
    Rule,
)
from sidecar.policy.reader import load_policy, parse_policy, policy_warnings
from sidecar.spiffe import PatternKind, SpiffePattern

__all__ = [
    "DEFAULT_RULE",
    "DENY_ALL",
    "INVALID_PEER_RULE",
    "NO_POLICY_RULE",
    "Action",
    "Decision",
    "DecisionKind",
    "Mode",
    "PatternKind",
    "Policy",
    "RequestRules",
    "Rule",
    "SpiffePattern",
    "load_policy",
    "parse_policy",
    "policy_warnings",
]
