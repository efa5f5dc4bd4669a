"""What a Prometheus user expects of /metrics (issue 20, item 3): process metrics, a
build-info gauge, no `_created` twins, every label set at 0 from the start, an
upstream-connect histogram, OpenMetrics on request, and a `rule` label that stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.config import Address, parse_config
from sidecar.observe import admin, metrics
from sidecar.outcomes import DecisionKind
from sidecar.policy import parse_policy
from sidecar.proxy.listener import dial
from sidecar.reasons import Reason

pytestmark = pytest.mark.timeout(30)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(accept: str = "") -> tuple[str, str]:
    head = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n".encode()
    probe = admin.Probe(ready=lambda: None, status=dict)
    status, ctype, body = admin.answer(head, probe)
    assert status == "200 OK"
    return ctype, body.decode()


def test_no_family_has_a_created_twin() -> None:
    metrics.handshakes.labels("inbound", "created", "ok", "false").inc()
    metrics.handshake_duration.labels("inbound", "created", "false").observe(0.01)
    for accept in ("", "application/openmetrics-text; version=1.0.0"):
        assert "_created" not in _scrape(accept)[1]


def test_build_info_names_the_version_python_and_openssl() -> None:
    labels = frozenset({"version": __version__, "python": platform.python_version(),
                        "openssl": ssl.OPENSSL_VERSION}.items())
    assert _samples(_scrape()[1])[("sidecar_build_info", labels)] == 1.0


def test_process_metrics_are_exported() -> None:
    values = {name: v for (name, _), v in _samples(_scrape()[1]).items()}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert values[name] > 0, name


def test_openmetrics_when_asked_for_text_otherwise() -> None:
    ctype, body = _scrape("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    ctype, body = _scrape("text/plain;version=0.0.4;q=1,*/*;q=0.1")
    assert ctype.startswith("text/plain") and "# EOF" not in body
    assert _scrape("")[0].startswith("text/plain")


def _config(tmp_path: Path) -> str:
    return json.dumps({
        "identity": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"},
        "inbound": [{"name": "zero-in", "listen": "127.0.0.1:0",
                     "forward_to": "127.0.0.1:1"}],
        "outbound": [{"name": "zero-out", "listen": "127.0.0.1:0",
                      "connect_to": "127.0.0.1:2",
                      "expect_ids": ["spiffe://example.org/x"]}],
        "policy": str(tmp_path / "policy.yaml")})


def test_every_label_set_of_a_configured_listener_exists_at_zero(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path), tmp_path / "s.yaml", check_files=False)
    policy = parse_policy("default: deny\nrules: []\n", "policy.yaml")
    metrics.declare(config, lambda: policy)
    found = _samples(_scrape()[1])

    def zero(name: str, **labels: str) -> bool:
        return found.get((name, frozenset(labels.items()))) == 0.0

    for direction, name in (("inbound", "zero-in"), ("outbound", "zero-out")):
        where = {"direction": direction, "listener": name}
        assert all(zero("sidecar_handshake_errors_total", **where, reason=r.value)
                   for r in Reason)
        assert all(zero("sidecar_handshakes_total", **where, result=res, resumed=rsm)
                   for res in ("ok", "error") for rsm in ("true", "false"))
        assert zero("sidecar_upstream_errors_total", **where)
        assert zero("sidecar_upstream_connect_duration_seconds_count", **where)
        assert zero("sidecar_connections_rejected_total", **where, limit="max_connections")
        assert zero("sidecar_bytes_total", **where, flow="to_app")
    # Process-wide, and other tests of this process may have reloaded: present, at least.
    assert all(("sidecar_reloads_total", frozenset({"kind": k, "result": r}.items())) in found
               for k in ("svid", "bundle", "crl", "policy") for r in ("ok", "error"))
    assert all(zero("sidecar_authz_decisions_total", listener="zero-in", decision=d,
                    rule="default") for d in ("allow", "deny", "audit_deny"))


def test_a_10000_rule_policy_adds_at_most_the_named_rules_and_other() -> None:
    rules = [{"name": f"r{i:05d}", "action": "allow",
              "from": [f"spiffe://example.org/app/{i}"]} for i in range(10_000)]
    policy = parse_policy(json.dumps({"default": "deny", "rules": rules}), "big.yaml")
    metrics.declare(parse_config(json.dumps({"identity": {
        "cert": "c", "key": "k", "bundle": "b"}}), Path("/x/s.yaml"), check_files=False),
        lambda: policy)
    for i in (*range(0, 10_000, 7), 9_999):
        metrics.count_decision(policy, "big", DecisionKind.ALLOW, f"r{i:05d}")
    metrics.count_decision(policy, "big", DecisionKind.DENY, "default")
    rules_seen = {dict(labels)["rule"] for (name, labels) in _samples(_scrape()[1])
                  if name == "sidecar_authz_decisions_total" and ("listener", "big") in labels}
    kept = {f"r{i:05d}" for i in range(0, metrics.NAMED_RULES, 7)}
    assert rules_seen == kept | {"other", "default"}
    assert metrics.rule_label(policy, "r00049") == "r00049"
    assert metrics.rule_label(policy, "r00050") == "other"


def test_a_successful_dial_is_timed_a_failed_one_is_not() -> None:
    histogram = Histogram("dial_seconds", "test", registry=CollectorRegistry())
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        async def both() -> None:
            (await dial(Address("127.0.0.1", port), 5.0, histogram)).close()
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))  # bound, never listening: refused
                with pytest.raises(OSError):
                    await dial(Address("127.0.0.1", free.getsockname()[1]), 5.0, histogram)

        asyncio.run(both())
    text = generate_latest(histogram).decode()
    assert "dial_seconds_count 1.0" in text


def test_process_totals_sum_live_workers_and_keep_dead_workers_cpu() -> None:
    """A real child process: its memory counts while it lives; once it has died and been
    reaped its CPU stays in the total (a counter must not go down on a worker restart)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
        "print('done', flush=True)\ninput()\n"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        alone = _totals([])
        together = _totals([child.pid])
        assert together["process_resident_memory_bytes"] > \
            alone["process_resident_memory_bytes"] + 1_000_000
        assert together["process_cpu_seconds_total"] >= \
            alone["process_cpu_seconds_total"] + 0.25
        assert together["process_open_fds"] > alone["process_open_fds"]
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    after = _totals([])
    assert after["process_cpu_seconds_total"] >= together["process_cpu_seconds_total"] - 0.05
    assert after["process_start_time_seconds"] == alone["process_start_time_seconds"]


def _totals(pids: list[int]) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(metrics.ProcessTotals(lambda: pids))
    found = {name: v for (name, _), v in _samples(generate_latest(registry).decode()).items()}
    assert os.getpid() not in pids
    return found


def test_each_decision_is_labelled_by_the_policy_that_made_it() -> None:
    """Several sidecars in one process (the demo, in-process tests) each keep their own
    rule names: a process-wide policy once counted the demo's allow rule as `other`."""
    small = parse_policy(json.dumps({"default": "deny", "rules": [
        {"name": "frontend-to-payments", "action": "allow",
         "from": ["spiffe://example.org/ns/web/sa/frontend"]}]}), "small.yaml")
    big = parse_policy(json.dumps({"default": "deny", "rules": [
        {"name": f"b{i:03d}", "action": "allow", "from": [f"spiffe://example.org/b/{i}"]}
        for i in range(metrics.NAMED_RULES + 10)]}), "big.yaml")
    assert metrics.rule_label(big, "b001") == "b001"
    metrics.count_decision(small, "two-in-one", DecisionKind.ALLOW, "frontend-to-payments")
    metrics.count_decision(big, "two-in-one", DecisionKind.ALLOW,
                           f"b{metrics.NAMED_RULES + 5:03d}")
    rules_seen = {dict(labels)["rule"] for (name, labels) in _samples(_scrape()[1])
                  if name == "sidecar_authz_decisions_total"
                  and ("listener", "two-in-one") in labels}
    assert rules_seen == {"frontend-to-payments", "other"}


def test_batched_request_durations_expose_what_one_observe_each_would() -> None:
    """metrics.bucketed and _observe_many write prometheus_client's histogram layout
    directly (a count per bucket and a sum): a library change there must fail here, not
    skew the buckets. Values on a bucket's bound count in it (`le`)."""
    # Sums of these are exact in any order (multiples of 2**-20): the sum must be too.
    values = [round(v * 2**20) / 2**20 for v in (
        0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.2, 7.0, 100.0, 0.0, 30.0, 10.0, 0.001)]
    values += metrics._REQUEST_BUCKETS  # each bound itself
    one_by_one = CollectorRegistry()
    batched = CollectorRegistry()
    buckets = metrics._REQUEST_BUCKETS
    for registry in (one_by_one, batched):
        Histogram("h_seconds", "h", ["listener"], buckets=buckets, registry=registry)
    h1 = one_by_one._names_to_collectors["h_seconds"]
    h2 = batched._names_to_collectors["h_seconds"]
    for v in values:
        h1.labels("api").observe(v)
    half = len(values) // 2  # in two batches, one reversed: the order does not matter
    metrics._observe_many(h2.labels("api"), metrics.bucketed(values[:half]))
    metrics._observe_many(h2.labels("api"), metrics.bucketed(values[half:][::-1]))
    exposed = _samples(generate_latest(batched).decode())
    expected = _samples(generate_latest(one_by_one).decode())
    sum_key = ("h_seconds_sum", frozenset({("listener", "api")}))
    # The sum of the bounds themselves (not multiples of 2**-20) may differ by rounding.
    assert exposed.pop(sum_key) == pytest.approx(expected.pop(sum_key), rel=1e-15)
    assert exposed == expected


def test_request_durations_counted_by_connections_are_exact_across_scrapes() -> None:
    """Every duration a RequestCounter takes lands in its bucket, the count and the sum,
    once, whichever scrape (or flush) comes between."""
    def histogram() -> dict[str, float]:
        got = _samples(generate_latest(metrics.REGISTRY).decode())
        return {f"{name}{dict(labels).get('le', '')}": value
                for (name, labels), value in got.items()
                if name.startswith("sidecar_http_request_duration_seconds")
                and dict(labels).get("listener") == "t-exact"}

    reference = CollectorRegistry()
    ref = Histogram("sidecar_http_request_duration_seconds", "h", ["listener"],
                    buckets=metrics._REQUEST_BUCKETS, registry=reference).labels("t-exact")
    first = metrics.RequestCounter("t-exact")
    second = metrics.RequestCounter("t-exact")
    bounds = [*metrics._REQUEST_BUCKETS, 60.0]
    for i in range(1000):
        # Multiples of 2**-16 s (exact sums), on and between the bounds' neighbourhoods.
        seconds = round(bounds[i % len(bounds)] * (0.5 + (i % 3) / 2) * 2**16) / 2**16
        counter = first if i % 2 else second
        counter.add(DecisionKind.ALLOW, "r1", 200 if i % 5 else 404, seconds)
        ref.observe(seconds)
        if i % 97 == 0:
            histogram()  # a scrape between requests
        if i % 89 == 0:
            metrics.requests.flush()  # the sweeper
    expected = {f"{name}{dict(labels).get('le', '')}": value
                for (name, labels), value in _samples(
                    generate_latest(reference).decode()).items()}
    assert histogram() == expected
    assert histogram() == expected  # a second scrape adds nothing


def test_pending_request_counts_are_added_before_a_scrape() -> None:
    def requests() -> float:
        return _samples(generate_latest(metrics.REGISTRY).decode()).get(
            ("sidecar_http_requests_total", frozenset(
                {("listener", "t-scrape"), ("decision", "none"), ("code", "400")})), 0.0)

    before = requests()
    metrics.requests.add("t-scrape", "none", None, 400, 0.01)
    assert requests() == before + 1


def test_a_scrape_sees_every_request_counted_on_both_paths() -> None:
    # The connection path (`_inc`: a WebSocket recheck) and the request path
    # (RequestTally) count the same authz series; the first scrape after both must show
    # both, not one now and the other a scrape later.
    labels = ("scrape-both-paths", "allow", "r1")
    key = ("sidecar_authz_decisions_total",
           frozenset(zip(("listener", "decision", "rule"), labels, strict=True)))
    before = _samples(_scrape()[1]).get(key, 0.0)
    metrics._inc(metrics.authz_decisions, *labels)
    metrics.requests.add("scrape-both-paths", "allow", "r1", 200, 0.01)
    assert _samples(_scrape()[1])[key] == before + 2


def _request_series(listener: str) -> tuple[float, float, float]:
    """(requests allow/200, authz allow by rule r1, durations count) of `listener`."""
    got = _samples(generate_latest(metrics.REGISTRY).decode())
    return (got.get(("sidecar_http_requests_total", frozenset(
                {("listener", listener), ("decision", "allow"), ("code", "200")})), 0.0),
            got.get(("sidecar_authz_decisions_total", frozenset(
                {("listener", listener), ("decision", "allow"), ("rule", "r1")})), 0.0),
            got.get(("sidecar_http_request_duration_seconds_count", frozenset(
                {("listener", listener)})), 0.0))


def test_a_connections_request_counter_counts_across_scrapes() -> None:
    """RequestCounter keeps the cell of its last labels: a scrape hands on and zeroes the
    cells in place, so each request is counted once, before and after it."""
    counter = metrics.RequestCounter("t-counter")
    before = _request_series("t-counter")
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.001)
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.002)
    assert _request_series("t-counter") == tuple(b + 2 for b in before)
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.003)
    counter.add(DecisionKind.DENY, "r1", 403, 0.003)  # another cell, then the first again
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.003)
    assert _request_series("t-counter") == (before[0] + 4, before[1] + 4, before[2] + 5)
    assert _request_series("t-counter") == (before[0] + 4, before[1] + 4, before[2] + 5)


def test_a_request_counter_finds_its_cell_again_once_the_cells_are_dropped() -> None:
    counter = metrics.RequestCounter("t-dropped")
    before = _request_series("t-dropped")
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.001)
    generation = metrics.requests.generation
    for code in range(metrics._MAX_REQUEST_CELLS + 1):  # label sets past the bound
        metrics.requests.cell("t-dropped-many", "allow", None, code)
    metrics.requests.flush()
    assert metrics.requests.generation == generation + 1
    counter.add(DecisionKind.ALLOW, "r1", 200, 0.001)  # its old cell counts nowhere now
    assert _request_series("t-dropped") == tuple(b + 2 for b in before)


def test_held_samples_expose_what_one_observe_each_would() -> None:
    """The loop-lag samples are held and added at a flush: the buckets, count and sum
    must be what one observe() per sample gives."""
    values = [round(v * 2**20) / 2**20 for v in (0.0, 0.0004, 0.003, 0.02, 0.3, 7.0, 0.0009)]
    values += metrics._LAG_BUCKETS
    one_by_one = CollectorRegistry()
    held_in = CollectorRegistry()
    h1 = Histogram("lag_seconds", "l", buckets=metrics._LAG_BUCKETS, registry=one_by_one)
    h2 = Histogram("lag_seconds", "l", buckets=metrics._LAG_BUCKETS, registry=held_in)
    held = metrics.HeldSamples(h2, metrics._LAG_BUCKETS)
    for i, v in enumerate(values):
        h1.observe(v)
        held.samples.append(v)
        if i == 3:
            held.flush()  # in two batches
    held.flush()
    assert not held.samples
    exposed = _samples(generate_latest(held_in).decode())
    expected = _samples(generate_latest(one_by_one).decode())
    sum_key = ("lag_seconds_sum", frozenset())
    assert exposed.pop(sum_key) == pytest.approx(expected.pop(sum_key), rel=1e-15)
    assert exposed == expected


async def test_a_scrape_sees_every_loop_lag_sample_taken() -> None:
    """The probe's samples wait for a flush: a scrape makes one, so it counts them all."""
    from sidecar.run import lifecycle

    def count() -> float:
        got = _samples(generate_latest(metrics.REGISTRY).decode())
        return got[("sidecar_event_loop_lag_seconds_count", frozenset())]

    before = count()
    probe = lifecycle.LagProbe(asyncio.get_running_loop(), tick=0.001)
    try:
        probe.wake(5)
        deadline = asyncio.get_running_loop().time() + 5
        while probe.armed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
    finally:
        probe.cancel()
    assert probe.samples == 5
    assert count() == before + 5
