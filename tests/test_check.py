"""`sidecar check` refuses and warns about what `sidecar run` does (issue 16, item 6).

Each input is given to both commands as real processes: `check` must exit 1 exactly when
`run` refuses to start, and print each warning `run` logs at start. A `run` that starts
is stopped with SIGTERM once it logs "ready".
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from sidecar.tools import pki

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TD = "example.org"
START_TIMEOUT = 30.0


def write_config(d: Path, **overrides: Any) -> Path:
    """A valid config with one outbound listener on port 0, changed by `overrides`."""
    root = pki.new_root(TD)
    inter = pki.new_intermediate(root)
    files = pki.write_svid(d, pki.issue_svid(inter, f"spiffe://{TD}/ns/a/sa/b"), [root.cert])
    config: dict[str, Any] = {
        "identity": {"cert": files.cert, "key": files.key, "bundle": files.bundle,
                     "watch": False},
        "outbound": [{"name": "out", "listen": "127.0.0.1:0", "connect_to": "127.0.0.1:9",
                      "expect_ids": [f"spiffe://{TD}/*"]}],
        "admin": {"listen": "127.0.0.1:0"},
        "workers": 1,
        "drain_timeout": "2s",
    }
    for key, value in overrides.items():
        config[key] = value(config) if callable(value) else value
    path = d / "sidecar.yaml"
    path.write_text(json.dumps(config))
    return path


def check(path: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=ENV)
    return done.returncode, done.stdout + done.stderr


def run(path: Path) -> tuple[bool, str]:
    """(started, everything it wrote): run until "ready" or exit, then SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if '"msg":"ready"' in line:
                ready.set()
        ready.set()  # ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(START_TIMEOUT)
        started = any('"msg":"ready"' in line for line in lines)
        if started:
            proc.send_signal(signal.SIGTERM)
        proc.wait(START_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    reader.join(5)
    return started, "".join(lines)


def agree(path: Path, *, refused: bool, says: str) -> None:
    code, checked = check(path)
    started, ran = run(path)
    assert (code == 1) == refused, checked
    assert started == (not refused), ran
    assert says in checked, checked
    assert says in ran, ran


def garbage_crl(d: Path) -> Callable[[dict[str, Any]], Any]:
    crl = d / "garbage.crl"
    crl.write_text("this is not a CRL\n")
    return lambda c: {**c["identity"], "crl": str(crl)}


def test_a_garbage_crl(tmp_path: Path) -> None:
    path = write_config(tmp_path, identity=garbage_crl(tmp_path))
    agree(path, refused=True, says="not a PEM CRL")


def test_ktls_on_where_it_is_unavailable(tmp_path: Path) -> None:
    if "tls" in Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text():
        pytest.skip("this kernel has kTLS: `ktls: on` starts here")
    path = write_config(tmp_path, tls={"ktls": "on"})
    agree(path, refused=True, says="kTLS is not available here")


def test_ktls_on_with_workers_where_it_is_unavailable(tmp_path: Path) -> None:
    if "tls" in Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text():
        pytest.skip("this kernel has kTLS: `ktls: on` starts here")
    path = write_config(tmp_path, tls={"ktls": "on"}, workers=2)
    agree(path, refused=True, says="kTLS is not available here")


def test_more_connections_than_open_files(tmp_path: Path) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard > 2_000_000:
        pytest.skip("no open-file limit low enough to exceed here")
    most = hard  # two descriptors per connection: twice the limit is needed
    path = write_config(tmp_path, limits={"max_connections": most})
    agree(path, refused=False, says=f"limits.max_connections: {most} connections need")


def test_a_memory_session_store_with_workers(tmp_path: Path) -> None:
    path = write_config(tmp_path, tls={"session_store": "memory"}, workers=2)
    agree(path, refused=False, says="memory with 2 workers")


def test_a_config_with_no_listener(tmp_path: Path) -> None:
    path = write_config(tmp_path, outbound=[])
    agree(path, refused=False, says="no listener")


def test_a_bundle_holding_another_trust_domains_ca(tmp_path: Path) -> None:
    other = pki.new_root("other.org")

    def merged(c: dict[str, Any]) -> dict[str, Any]:
        bundle = tmp_path / c["identity"]["bundle"]
        bundle.write_bytes(bundle.read_bytes() + pki.certs_pem([other.cert]))
        return c["identity"]

    path = write_config(tmp_path, identity=merged)
    subject = other.cert.subject.rfc4514_string()
    agree(path, refused=False, says=f"the CA '{subject}' belongs to trust domain other.org")


@pytest.mark.parametrize("entry", ["spiffe://example.org/a//b", "spiffe://example.org/a/../b",
                                   "spiffe://example.org/a/"])
def test_an_expected_id_that_can_never_match(entry: str, tmp_path: Path) -> None:
    path = write_config(tmp_path, outbound=lambda c: [{**c["outbound"][0],
                                                       "expect_ids": [entry]}])
    agree(path, refused=True, says="outbound[0].expect_ids[0]")


def test_a_good_config_is_summed_up(tmp_path: Path) -> None:
    """Issue 20, item 8: on success, who it is and until when, each listener, the rules."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: deny\nrules:\n"
                      "  - {name: web, action: allow, from: ['spiffe://example.org/ns/web/*'],"
                      " to: {listeners: [in]}}\n")
    path = write_config(tmp_path, policy=str(policy), inbound=[
        {"name": "in", "listen": "127.0.0.1:0", "forward_to": "127.0.0.1:8080"},
        {"name": "pp", "listen": "127.0.0.1:0", "forward_to": "127.0.0.1:8081",
         "proxy_protocol": True}])
    code, out = check(path)
    assert code == 0, out
    svid = x509.load_pem_x509_certificate((tmp_path / "svid.pem").read_bytes())
    not_after = svid.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert re.search(rf"identity: spiffe://{TD}/ns/a/sa/b, expires in \d+ min \({not_after}\)",
                     out), out
    for line in (
                 "inbound in: 127.0.0.1:0 -> 127.0.0.1:8080 (tcp)\n",
                 "inbound pp: 127.0.0.1:0 -> 127.0.0.1:8081 (tcp, PROXY v2 header first)",
                 f"outbound out: 127.0.0.1:0 -> 127.0.0.1:9, expects spiffe://{TD}/*",
                 "admin: 127.0.0.1:0",
                 "1 rule(s), default deny",
                 "allow web: from spiffe://example.org/ns/web/* to in"):
        assert line in out, out


def test_an_http_rule_is_summed_up_with_its_methods_and_paths(tmp_path: Path) -> None:
    """A deny on /admin/* summed up without its paths read as a deny of every caller."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("default: allow\nrules:\n"
                      "  - {name: no-admin, action: deny, from: ['spiffe://example.org/*'],"
                      " to: {paths: ['/admin/*'], methods: [GET, POST]}}\n")
    path = write_config(tmp_path, policy=str(policy), inbound=[
        {"name": "web", "listen": "127.0.0.1:0", "forward_to": "127.0.0.1:8080",
         "protocol": "http"}])
    code, out = check(path)
    assert code == 0, out
    assert ("deny no-admin: from spiffe://example.org/* to every inbound "
            "(http requests only: methods GET, POST; paths /admin/*)") in out, out


def test_check_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    """`sidecar check | head -1`: the closed pipe ends the output quietly, not a traceback."""
    path = write_config(tmp_path)
    # The reader is gone before the command writes a byte (it needs a second to start), so
    # the write surely meets a closed pipe; `| head` raced the command's one flush.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(path)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=60, env=ENV)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141, done.stderr


def test_a_key_of_another_svid_is_blamed_on_the_key_at_its_yaml_path(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    config = json.loads(path.read_text())
    other = pki.write_svid(tmp_path / "other", pki.issue_svid(
        pki.new_intermediate(pki.new_root(TD)), f"spiffe://{TD}/ns/a/sa/c"), [])
    key = str(tmp_path / "other" / other.key)
    config["identity"]["key"] = key
    path.write_text(json.dumps(config))
    cert = str(tmp_path / config["identity"]["cert"])
    agree(path, refused=True, says=f"identity.key: {key}: this private key does not match "
                                   f"the certificate in {cert}")


def test_an_expired_svid_names_its_yaml_path(tmp_path: Path) -> None:
    root = pki.new_root(TD)
    files = pki.write_svid(tmp_path / "old", pki.issue_svid(
        pki.new_intermediate(root), f"spiffe://{TD}/ns/a/sa/b",
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)), [root.cert])
    path = write_config(tmp_path, identity={
        "cert": str(tmp_path / "old" / files.cert), "key": str(tmp_path / "old" / files.key),
        "bundle": str(tmp_path / "old" / files.bundle), "watch": False})
    code, out = check(path)
    assert code == 1, out
    assert f"identity.cert: {tmp_path / 'old' / files.cert}: expired at" in out, out
