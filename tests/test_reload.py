"""Reload: retries of a set caught mid-write, errors that keep the old snapshot, and real
file watching of each on-disk layout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sidecar import metrics, pki
from sidecar.identity import Identity, load_identity
from sidecar.reload import Reloadable, watch

pytestmark = pytest.mark.timeout(20)
TD = "example.org"
ID = f"spiffe://{TD}/ns/default/sa/payments"


@pytest.fixture(scope="module")
def ca() -> tuple[pki.CA, pki.CA]:
    root = pki.new_root(TD)
    return root, pki.new_intermediate(root)


def write(out: Path, ca: tuple[pki.CA, pki.CA], layout: pki.Layout = pki.Layout.SPIFFE_HELPER,
          **kw: object) -> pki.Svid:
    svid = pki.issue_svid(ca[1], ID, **kw)  # type: ignore[arg-type]
    pki.write_svid(out, svid, [ca[0].cert], layout)
    return svid


def identity_reloadable(out: Path, layout: pki.Layout, swapped: list[Identity]) -> Reloadable:
    f = layout.files

    def swap(new: object) -> bool:
        assert isinstance(new, Identity)
        swapped.append(new)
        return True

    return Reloadable("svid", (out / f.cert, out / f.key, out / f.bundle),
                      lambda: load_identity(out / f.cert, out / f.key, out / f.bundle), swap)


def errors() -> float:
    return metrics.REGISTRY.get_sample_value(
        "sidecar_reloads_total", {"kind": "svid", "result": "error"}) or 0.0


def test_watches_our_files_and_k8s_symlink_swaps_only(tmp_path: Path) -> None:
    r = Reloadable("svid", (tmp_path / "svid.pem",), lambda: None, lambda _: True)
    assert r.watches(tmp_path / "svid.pem")
    assert r.watches(tmp_path / "..data")
    assert r.watches(tmp_path / "..2026_11_25_10_00_00.1")
    assert not r.watches(tmp_path / "other.pem")
    assert not r.watches(tmp_path / "sub" / "svid.pem")


async def test_a_set_caught_mid_write_is_retried_and_never_served(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA]
) -> None:
    write(tmp_path, ca)
    new = pki.issue_svid(ca[1], ID)
    # spiffe-helper's race: the new cert is on disk, the key is still the old one.
    (tmp_path / "svid.pem").write_bytes(new.chain_pem())
    swapped: list[Identity] = []
    r = identity_reloadable(tmp_path, pki.Layout.SPIFFE_HELPER, swapped)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, (tmp_path / "svid_key.pem").write_bytes, new.key_pem())
    assert await r.reload("test")
    assert [s.serial for s in swapped] == [new.serial]


async def test_a_set_that_stays_bad_keeps_the_old_one_and_is_counted(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA]
) -> None:
    write(tmp_path, ca)
    (tmp_path / "svid.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")  # truncated
    swapped: list[Identity] = []
    before = errors()
    assert not await identity_reloadable(tmp_path, pki.Layout.SPIFFE_HELPER, swapped).reload("t")
    assert swapped == []
    assert errors() == before + 1


@pytest.mark.parametrize("layout", list(pki.Layout))
async def test_each_layout_is_seen_by_the_directory_watch(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA], layout: pki.Layout
) -> None:
    write(tmp_path, ca, layout)
    swapped: list[Identity] = []
    r = identity_reloadable(tmp_path, layout, swapped)
    stop = asyncio.Event()
    seen = asyncio.Event()
    original = r._swap

    def swap(new: object) -> bool:
        seen.set()
        return original(new)

    r._swap = swap
    task = asyncio.create_task(watch([r], stop))
    try:
        new = None
        # The watcher starts asynchronously: rewrite until it reports (bounded).
        async with asyncio.timeout(15):
            while not seen.is_set():
                new = write(tmp_path, ca, layout)
                try:
                    async with asyncio.timeout(1.5):
                        await seen.wait()
                except TimeoutError:
                    continue
        assert new is not None
        async with asyncio.timeout(5):
            while swapped[-1].serial != new.serial:
                seen.clear()
                await seen.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
