"""Instructions per policy decision at 10 and 10,000 rules, counted by callgrind.

The decisions/s of `policy_bench.py` move with whatever else the machine runs; an
instruction count does not. This script re-runs itself under
`valgrind --tool=callgrind --instr-atstart=no`, builds the same workloads as
policy_bench.py, switches collection on around the decision loop only (with
`callgrind_control -i on/off` on its own pid) and prints instructions per decision.

    PYTHONPATH=. python bench/policy_instructions.py [--decisions 3000]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("exact", "prefix", "no match")


def _inner(size: int, kind: str, decisions: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from policy_bench import build

    work = build(size)
    peers = (work.peers[kind] * (decisions // len(work.peers[kind]) + 1))[:decisions]
    decide = work.policy.decide
    decide(work.peers[kind][0], "app")  # warm: first-call costs are not the per-decision cost
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
    for peer in peers:
        decide(peer, "app")
    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)


def _count(size: int, kind: str, decisions: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "cg.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, __file__, "--inner", str(size),
             kind, str(decisions)],
            check=True, capture_output=True, env={**os.environ})
        text = "".join(p.read_text() for p in Path(d).glob("cg.out*"))
    return sum(int(m) for m in re.findall(r"^totals: (\d+)", text, re.M))


def per_decision(size: int, kind: str, decisions: int) -> float:
    # The switch itself (starting callgrind_control) is counted too: subtract an empty run.
    return (_count(size, kind, decisions) - _count(size, kind, 0)) / decisions


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        _inner(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decisions", type=int, default=3000)
    n = p.parse_args().decisions
    print(f"{'peer kind':12} {'10 rules':>14} {'10,000 rules':>14} {'ratio':>7}"
          "   (instructions per decision)")
    for kind in KINDS:
        small = per_decision(10, kind, n)
        large = per_decision(10_000, kind, n)
        print(f"{kind:12} {small:14,.0f} {large:14,.0f} {large / small:7.2f}")


if __name__ == "__main__":
    main()
