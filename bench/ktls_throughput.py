"""Pair throughput with kTLS on and off, inside a VM whose kernel has the `tls` module.

Run (from the repo root, as root the first time: it may apt-get install qemu & co):

    PYTHONPATH=. python bench/ktls_throughput.py [--mib 8] [--rounds 6] [--json]

One VM boot (tests/vm/run_in_vm.py: Debian's stock kernel under qemu software emulation,
virtme-ng) runs `tests/vm/ktls_guest.py bench`: two outbound -> inbound sidecar pairs side
by side, one with `tls.ktls: off`, one with `on`; 1 MiB of warm-up through each, then
`--rounds` transfers of `--mib` each way through each pair, alternating between the pairs
(order flipped every round): plaintext client -> outbound ==mTLS==> inbound -> echo app ->
back, both directions at once. Reported per mode: MB/s each way (median) and the two
sidecars' CPU seconds per MiB carried (utime + stime; each MiB crosses each sidecar once
each way); then the ratio on/off as the median of the per-round ratios, which cancels a
slow drift of the host's load better than a ratio of medians.

Absolute figures mean nothing: the guest CPU is emulated (TCG), so AES-GCM in the kernel
and in OpenSSL both run as translated code at a small fraction of native speed, and the
client, the echo app and both sidecars share 2 emulated CPUs. Only the ratio, measured in
one run on the same emulated machine, says something, and even that is shaped by the
emulation (OpenSSL's AES-NI assembly vs the kernel's). By default the client checks byte
counts only (`--verify` adds sha256 at the cost of client CPU that competes with the
sidecars); the correctness of the kTLS path is `tests/vm/test_ktls_vm.py`'s job.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm import run_in_vm


def table(result: dict[str, Any]) -> str:
    rows = [("kTLS", "MB/s each way", "sidecar CPU s/MiB", "runs (MB/s)", "intact")]
    for mode in ("off", "on"):
        r = result[mode]
        rows.append((mode, f"{r['mb_per_s_each_way']:.2f}", f"{r['sidecar_cpu_s_per_mib']:.4f}",
                     ", ".join(f"{x:.2f}" for x in r["all_mb_per_s"]),
                     "yes" if r["hashes_ok"] else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"ratio on/off: throughput {result['ratio_on_off']}x (median of the rounds: "
                 f"{', '.join(str(x) for x in result['round_ratios'])}), "
                 f"sidecar CPU per MiB {result['cpu_ratio_on_off']}x")
    lines.append(f"{result['mib']:g} MiB each way, {result['rounds']} round(s), "
                 f"loop {result['loop']}, checked by {result['verified']}; guest kernel "
                 f"{result['kernel']}, {result['openssl']}, Python {result['python']}")
    lines.append("Under qemu software emulation: absolute speeds mean nothing, only the "
                 "ratio within this one run does.")
    host = result.get("host", {})
    lines.append(f"VM boot + run {host.get('boot_and_run_s')}s, setup {host.get('setup_s')}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=8.0, help="MiB each way per transfer (8)")
    p.add_argument("--rounds", type=int, default=6, help="transfers per mode (6)")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--verify", action="store_true", help="sha256 too (costs client CPU)")
    p.add_argument("--timeout", type=float, default=run_in_vm.DEFAULT_RUN_TIMEOUT)
    p.add_argument("--json", action="store_true", help="print the whole JSON record")
    args = p.parse_args()
    guest = ["bench", "--mib", str(args.mib), "--rounds", str(args.rounds),
             "--loop", args.loop]
    if args.verify:
        guest.append("--verify-bench")
    try:
        result = run_in_vm.run(guest, timeout=args.timeout)
    except run_in_vm.VmError as exc:
        print(f"ktls_throughput: {exc}", file=sys.stderr)
        return 2
    if not result.get("ok") or "on" not in result:
        print(json.dumps(result, indent=1))
        print("ktls_throughput: the guest run failed (see above)", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
