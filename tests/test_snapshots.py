"""snapshots.py: loading the identity and policy the config names, and swapping a reloaded
one into a runtime, with real files and real contexts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar.config import Config, Limits, parse_config
from sidecar.policy import DENY_ALL, Policy
from sidecar.problems import ProblemsError
from sidecar.proxy.connection import Tracker
from sidecar.proxy.runtime import Runtime
from sidecar.run import snapshots
from sidecar.tls import contexts as tls_contexts
from sidecar.tools import pki

pytestmark = pytest.mark.timeout(30)
TD = "example.org"
ID = f"spiffe://{TD}/ns/default/sa/payments"
POLICY = """\
mode: enforce
default: deny
rules:
  - name: {name}
    action: allow
    from: ["spiffe://example.org/ns/default/sa/frontend"]
"""


def cas() -> tuple[pki.CA, pki.CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


def write_svid(d: Path, ca: tuple[pki.CA, pki.CA]) -> pki.Svid:
    svid = pki.issue_svid(ca[1], ID)
    pki.write_svid(d, svid, [ca[0].cert])
    return svid


def config(d: Path, *, crl: bool = False, policy: bool = False) -> Config:
    text = ("identity: {cert: svid.pem, key: svid_key.pem, bundle: bundle.pem"
            + (", crl: [ca.crl]" if crl else "") + "}\n"
            + ("policy: policy.yaml\n" if policy else ""))
    return parse_config(text, d / "sidecar.yaml", check_files=False)


def runtime(cfg: Config) -> Runtime:
    loop = asyncio.get_running_loop()
    identity = snapshots.identity_of(cfg)
    tracker = Tracker(loop, max_connections=10, max_pending_handshakes=10,
                      idle_timeout=60.0, max_lifetime=0.0)
    return Runtime(loop, tls_contexts.build(identity), DENY_ALL, Limits(), tracker)


def test_the_crl_the_config_names_is_loaded(tmp_path: Path) -> None:
    """`check` once loaded the identity by its own copy and skipped the CRL."""
    write_svid(tmp_path, cas())
    (tmp_path / "ca.crl").write_bytes(b"not a CRL")
    assert snapshots.identity_of(config(tmp_path)).crls == ()
    with pytest.raises(ProblemsError) as exc:
        snapshots.identity_of(config(tmp_path, crl=True))
    assert "ca.crl" in str(exc.value.problems[0])


def test_no_policy_file_denies_every_caller(tmp_path: Path) -> None:
    write_svid(tmp_path, cas())
    assert snapshots.policy_of(config(tmp_path)) is DENY_ALL


async def test_a_new_svid_under_the_same_trust_keeps_the_contexts(tmp_path: Path) -> None:
    ca = cas()
    write_svid(tmp_path, ca)
    cfg = config(tmp_path)
    rt = runtime(cfg)
    before = rt.contexts
    built: list[object] = []
    swaps = snapshots.Swaps(cfg, rt, lambda i: built.append(i) or tls_contexts.build(i),
                            lambda _: None)
    new = write_svid(tmp_path, ca)
    assert swaps.identity(snapshots.identity_of(cfg))
    assert rt.contexts.server is before.server and rt.contexts.client is before.client
    assert rt.contexts.identity.serial == new.serial
    assert built == []
    assert not swaps.identity(snapshots.identity_of(cfg))  # the same files: no change


async def test_a_new_trust_builds_new_contexts(tmp_path: Path) -> None:
    write_svid(tmp_path, cas())
    cfg = config(tmp_path)
    rt = runtime(cfg)
    before = rt.contexts
    swaps = snapshots.Swaps(cfg, rt, tls_contexts.build, lambda _: None)
    new = write_svid(tmp_path, cas())  # another root: a new bundle
    assert swaps.identity(snapshots.identity_of(cfg))
    assert rt.contexts.server is not before.server
    assert rt.contexts.identity.serial == new.serial
    assert rt.contexts.identity.trust_version != before.identity.trust_version


async def test_a_new_policy_is_swapped_in_and_handed_on_once(tmp_path: Path) -> None:
    write_svid(tmp_path, cas())
    cfg = config(tmp_path, policy=True)
    (tmp_path / "policy.yaml").write_text(POLICY.replace("{name}", "first"))
    rt = runtime(cfg)
    seen: list[Policy] = []
    swaps = snapshots.Swaps(cfg, rt, tls_contexts.build, seen.append)
    reloadables = swaps.reloadables()
    assert [r.kind for r in reloadables] == ["svid", "policy"]
    assert await reloadables[1].reload("test")
    assert rt.policy is seen[0] and rt.policy is not DENY_ALL
    (tmp_path / "policy.yaml").write_text(POLICY.replace("{name}", "second"))
    assert await reloadables[1].reload("test")
    assert await reloadables[1].reload("test")  # unchanged: not handed on again
    assert len(seen) == 2 and rt.policy is seen[1]
