"""The README's local walkthrough, run as written (issue 20, item 1).

The commands between `<!-- walkthrough -->` and `<!-- /walkthrough -->` in README.md are
taken verbatim and run one by one in a fresh copy of `examples/local/` (nothing a previous
run issued), with the venv's `sidecar` and `python3` first on PATH, as after the quick
start. A command ending in `&` is started in the background, as a shell would, and kept
until the end; every other command must finish within COMMAND_TIMEOUT.

The walkthrough uses the fixed ports a reader types (8080, 8443, 9001, 9901, 9902), so it
runs in a network namespace of its own (`unshare -rn`: a user namespace maps us to root
there, and its loopback is ours alone): no port of this machine is taken, and tests
running alongside cannot collide with it. This file is its own driver inside that
namespace (`python test_readme_walkthrough.py --drive DIR` prints what each command did
as JSON), and the driver stops every process it started, pass or fail; the test kills the
driver's whole process group if it overruns.

Checks: the call through the pair (curl -> sidecar A's outbound listener -> mTLS ->
sidecar B's inbound -> the app) returns the app's page; `sidecar check` sums up each
config; the call as report-job is refused by policy rule `no-batch` (B's log says so) and
never reaches the app; every other command exits 0, and both sidecars exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local"
BLOCK = re.compile(r"<!-- walkthrough -->\s*```sh\n(.*?)```\s*<!-- /walkthrough -->", re.S)

COMMAND_TIMEOUT = 45.0  # one foreground command; the readiness waits retry for up to 30 s
STOP_TIMEOUT = 15.0  # a background process to exit after SIGTERM
DRIVER_TIMEOUT = 150.0  # the whole walkthrough in its namespace

APP_PAGE = (EXAMPLE / "app" / "index.html").read_text()


def walkthrough_commands(readme: str) -> list[str]:
    """The marked block's commands: comments and blank lines dropped, `\\` lines joined."""
    found = BLOCK.findall(readme)
    assert len(found) == 1, "README.md needs exactly one <!-- walkthrough --> ```sh block"
    commands, pending = [], ""
    for line in found[0].splitlines():
        line = line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return commands


# --- the driver, inside the namespace ------------------------------------------------


def _drive(workdir: Path) -> list[dict[str, Any]]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIDECAR_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    readme = (workdir / "README.md").read_text()
    results: list[dict[str, Any]] = []
    background: list[tuple[dict[str, Any], subprocess.Popen[bytes], Path]] = []
    try:
        for i, command in enumerate(walkthrough_commands(readme)):
            entry: dict[str, Any] = {"command": command}
            results.append(entry)
            if command.endswith("&"):
                log = workdir / f"background-{i}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(shlex.split(command[:-1]), cwd=workdir, env=env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                background.append((entry, proc, log))
                continue
            try:
                done = subprocess.run(command, shell=True, cwd=workdir, env=env,
                                      capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                      stdin=subprocess.DEVNULL)
                entry.update(returncode=done.returncode, stdout=done.stdout,
                             stderr=done.stderr)
            except subprocess.TimeoutExpired:
                entry.update(returncode=None, stdout="", stderr="timed out")
    finally:
        for _, proc, _ in background:
            proc.send_signal(signal.SIGTERM)
        for entry, proc, log in background:
            try:
                entry["returncode"] = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                entry["returncode"] = f"killed after {STOP_TIMEOUT}s"
                proc.wait()
            entry["output"] = log.read_text(errors="replace")
    return results


# --- the test ------------------------------------------------------------------------


def _fresh_copy(into: Path) -> None:
    shutil.copy(REPO / "README.md", into / "README.md")
    # Only what the repository holds: a reader's own ca/ and svid/ stay out.
    shutil.copytree(EXAMPLE, into / "examples" / "local",
                    ignore=shutil.ignore_patterns("ca", "svid", "__pycache__"))


def _run_driver(workdir: Path) -> list[dict[str, Any]]:
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace (unshare -rn): {probe.stderr.strip()}")
    proc = subprocess.Popen(
        ["unshare", "-rn", sys.executable, __file__, "--drive", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.communicate()
        raise AssertionError(f"the walkthrough ran past {DRIVER_TIMEOUT}s") from None
    assert proc.returncode == 0, f"the driver failed:\n{err}"
    results: list[dict[str, Any]] = json.loads(out)
    return results


def _show(entry: dict[str, Any]) -> str:
    return json.dumps(entry, indent=1)


def test_the_readme_walkthrough_runs_as_written() -> None:
    if shutil.which("curl") is None:
        pytest.skip("the walkthrough calls with curl, which is not installed")
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as tmp:
        _fresh_copy(Path(tmp))
        results = _run_driver(Path(tmp))

    denied = [r for r in results if "svid/batch/" in r["command"] and "--cert" in r["command"]]
    through_pair = [r for r in results
                    if r["command"].startswith("curl") and "127.0.0.1:9001" in r["command"]]
    sidecars = [r for r in results if r["command"].startswith("sidecar run")]
    assert len(denied) == 1 and len(through_pair) == 1 and len(sidecars) == 2, results

    call = through_pair[0]
    assert call["returncode"] == 0 and call["stdout"] == APP_PAGE, _show(call)
    refused = denied[0]
    assert refused["returncode"] != 0 and APP_PAGE not in refused["stdout"], _show(refused)
    payments = next(r for r in sidecars if "payments.yaml" in r["command"])
    assert re.search(r"peer_id=spiffe://example.org/ns/batch/sa/report-job .*"
                     r"decision=deny rule=no-batch", payments["output"]), payments["output"]
    assert re.search(r"peer_id=spiffe://example.org/ns/web/sa/frontend .*"
                     r"decision=allow rule=frontend", payments["output"]), payments["output"]

    checks = [r for r in results if r["command"].startswith("sidecar check")]
    assert len(checks) == 2, results
    for entry in checks:  # the summary a good config gets (issue 20, item 8)
        assert re.search(r"^  identity: spiffe://example.org/ns/\S+, expires in ",
                         entry["stdout"], re.M), _show(entry)

    for entry in results:
        if entry is refused or entry["command"].startswith("python3 -m http.server"):
            continue  # the app ends by SIGTERM; the refused call is meant to fail
        assert entry["returncode"] == 0, _show(entry)


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:
    print(json.dumps(_drive(Path(sys.argv[2]))))
