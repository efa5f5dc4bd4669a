"""How fast is `Policy.decide`, and does it slow down as the policy grows?

Run: PYTHONPATH=. python bench/policy_bench.py [--seconds 1.0]

Builds policies of 10 and 10,000 rules with the same mix of patterns (exact IDs, path
prefixes, whole trust domains, some rules scoped to a listener), then asks each policy
about the same three kinds of peer: one that an exact rule names, one under a prefix rule,
and one no rule matches. A compiled policy answers in a number of dict lookups set by the
depth of the peer's path, so the ratio between the two sizes should stay near 1.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import yaml

from sidecar.policy import Policy, parse_policy
from sidecar.spiffe import SpiffeId

SIZES = (10, 10_000)
TRUST_DOMAINS = 50
PEERS_PER_KIND = 1_000
LISTENERS = ("app", "grpc")


@dataclass(frozen=True, slots=True)
class Workload:
    policy: Policy
    compile_seconds: float
    peers: dict[str, list[SpiffeId]]  # kind of peer -> peer IDs, parsed as authn does


def _rule(i: int, rng: random.Random) -> tuple[dict[str, object], str, str]:
    """Rule i, an ID it names exactly (or ""), and an ID under one of its prefixes (or "")."""
    td = f"td{i % TRUST_DOMAINS}.example.org"
    kind = i % 5  # 2/5 exact, 2/5 prefix, 1/5 trust domain
    exact = prefix_peer = ""
    if kind in (0, 1):
        exact = f"spiffe://{td}/ns/ns{i}/sa/svc{i}"
        entry = exact
    elif kind in (2, 3):
        entry = f"spiffe://{td}/team{i}/*"
        prefix_peer = f"spiffe://{td}/team{i}/svc/replica{rng.randrange(100)}"
    else:
        entry = f"spiffe://{td}/*"
    rule: dict[str, object] = {
        "name": f"rule-{i}",
        "action": "deny" if i % 7 == 0 else "allow",
        "from": [entry],
    }
    if i % 3 == 0:
        rule["to"] = {"listeners": [LISTENERS[i % 2]]}
    return rule, exact, prefix_peer


def build(size: int, seed: int = 1) -> Workload:
    rng = random.Random(seed)
    rules, exact_peers, prefix_peers = [], [], []
    for i in range(size):
        rule, exact, prefix_peer = _rule(i, rng)
        rules.append(rule)
        if exact:
            exact_peers.append(exact)
        if prefix_peer:
            prefix_peers.append(prefix_peer)
    text = yaml.safe_dump({"mode": "enforce", "default": "deny", "rules": rules})
    started = time.perf_counter()
    policy = parse_policy(text, f"bench-{size}.yaml", LISTENERS)
    compile_seconds = time.perf_counter() - started
    # A miss: a trust domain no rule names, with a typical 4-segment path.
    misses = [f"spiffe://other{i}.example.net/ns/default/sa/svc{i}" for i in range(100)]
    peers = {
        "exact": [rng.choice(exact_peers) for _ in range(PEERS_PER_KIND)],
        "prefix": [rng.choice(prefix_peers) for _ in range(PEERS_PER_KIND)],
        "no match": [rng.choice(misses) for _ in range(PEERS_PER_KIND)],
    }
    # Authentication parses a peer's ID once per handshake; decisions take the SpiffeId.
    parsed = {kind: [SpiffeId.parse(p) for p in group] for kind, group in peers.items()}
    return Workload(policy, compile_seconds, parsed)


def rate(policy: Policy, peers: list[SpiffeId], seconds: float) -> float:
    """Decisions per second over `peers`, repeated for at least `seconds`."""
    decide = policy.decide
    done = 0
    started = time.perf_counter()
    while True:
        for peer in peers:
            decide(peer, "app")
        done += len(peers)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()

    workloads = {size: build(size) for size in SIZES}
    results: dict[int, dict[str, float]] = {}
    for size, workload in workloads.items():
        every = [p for group in workload.peers.values() for p in group]
        random.Random(2).shuffle(every)
        results[size] = {
            kind: rate(workload.policy, group, args.seconds)
            for kind, group in workload.peers.items()
        }
        results[size]["mixed"] = rate(workload.policy, every, args.seconds)

    kinds = ["exact", "prefix", "no match", "mixed"]
    print(f"{'rules':>7} {'compile':>9}  " + "  ".join(f"{k + ' /s':>14}" for k in kinds))
    for size, workload in workloads.items():
        row = "  ".join(f"{results[size][k]:>14,.0f}" for k in kinds)
        print(f"{size:>7,} {workload.compile_seconds * 1000:>7.1f}ms  {row}")
    small, large = SIZES
    ratios = "  ".join(f"{results[large][k] / results[small][k]:>14.2f}" for k in kinds)
    print(f"{'ratio':>7} {'':>9}  {ratios}   ({large:,} rules / {small} rules; 1.00 = no slowdown)")


if __name__ == "__main__":
    main()
