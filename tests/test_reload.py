"""Reload: retries of a set caught mid-write, errors that keep the old snapshot, and real
file watching of each on-disk layout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.identity import Identity, load_identity
from sidecar.observe import metrics
from sidecar.policy import load_policy
from sidecar.problems import ProblemsError
from sidecar.sources.watch import Bursts, Reloadable, watch
from sidecar.tools import pki

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


async def test_a_file_next_to_ours_starts_no_burst_and_ours_end_one(tmp_path: Path) -> None:
    """A log or a dump written beside the policy must not wake the loop every write; a
    burst of our files ends once, with every path in it. inotify queues an event before
    write() returns, so the reader is called here instead of waiting for the loop's."""
    loop = asyncio.get_running_loop()
    bursts = Bursts(loop, [tmp_path], lambda p: p.name in ("svid.pem", "svid_key.pem"))
    try:
        (tmp_path / "app.log").write_text("a line")
        bursts._read()
        assert not bursts.armed and bursts.take() == (set(), False)
        (tmp_path / "svid.pem").write_text("new")
        (tmp_path / "svid_key.pem").write_text("new")
        bursts._read()
        assert bursts.armed
        async with asyncio.timeout(5):
            await bursts.ended.wait()
        assert bursts.take() == ({tmp_path / "svid.pem", tmp_path / "svid_key.pem"}, False)
        assert not bursts.armed and not bursts.ended.is_set()
    finally:
        bursts.close()


# --- files that block (issue 15, item 6) --------------------------------------------------


def test_a_fifo_at_the_cert_path_is_refused_without_blocking(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA]
) -> None:
    write(tmp_path, ca)
    (tmp_path / "svid.pem").unlink()
    os.mkfifo(tmp_path / "svid.pem")  # nobody ever writes to it: an open() would wait forever
    with pytest.raises(ProblemsError) as caught:
        load_identity(tmp_path / "svid.pem", tmp_path / "svid_key.pem",
                      tmp_path / "svid_bundle.pem")
    assert "FIFO" in str(caught.value) and "not a regular file" in str(caught.value)


def test_a_symlink_to_a_regular_file_is_read_as_kubernetes_projects_it(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA]
) -> None:
    svid = write(tmp_path, ca, pki.Layout.K8S)
    f = pki.Layout.K8S.files
    assert (tmp_path / f.cert).is_symlink()
    ident = load_identity(tmp_path / f.cert, tmp_path / f.key, tmp_path / f.bundle)
    assert ident.serial == svid.cert.serial_number


def test_a_fifo_policy_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "policy.yaml")
    with pytest.raises(ProblemsError, match="FIFO"):
        load_policy(tmp_path / "policy.yaml")


@pytest.fixture
def hung_file(tmp_path: Path) -> Iterator[Path]:
    """A FIFO opened *blocking*: what a read on a hung NFS mount looks like to the thread
    that does it (the regular-file check cannot catch that). Released at the end."""
    fifo = tmp_path / "hung"
    os.mkfifo(fifo)
    yield fifo
    # Wake any reader still blocked in open(): a writer appears, then goes.
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_load_that_hangs_is_abandoned_counted_and_the_next_rotation_applies(
    tmp_path: Path, ca: tuple[pki.CA, pki.CA], hung_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(tmp_path, ca)
    f = pki.Layout.SPIFFE_HELPER.files
    hang = [True]

    def load() -> Identity:
        if hang[0]:
            hung_file.read_bytes()
        return load_identity(tmp_path / f.cert, tmp_path / f.key, tmp_path / f.bundle)

    swapped: list[Identity] = []

    def swap(new: object) -> bool:
        assert isinstance(new, Identity)
        swapped.append(new)
        return True

    r = Reloadable("svid", (tmp_path / f.cert,), load, swap, timeout=0.5)
    before = errors()
    async with asyncio.timeout(5):  # one bounded attempt, not five retries of it
        assert not await r.reload("test")
    assert errors() == before + 1
    assert swapped == []
    problems = [str(p) for rec in caplog.records for p in rec.fields["problems"]]
    assert any("abandoned" in p for p in problems), problems
    # The stuck thread holds nothing: the next rotation loads and applies at once.
    hang[0] = False
    new = write(tmp_path, ca)
    async with asyncio.timeout(5):
        assert await r.reload("test")
    assert [s.serial for s in swapped] == [new.cert.serial_number]


def test_a_load_stuck_at_exit_does_not_keep_the_process_alive(hung_file: Path) -> None:
    """asyncio.run ends while a reload waits on a read that never returns: the process
    exits at once (with asyncio.to_thread it waited for the thread, that is forever)."""
    script = textwrap.dedent(f"""
        import asyncio, threading
        from pathlib import Path
        from sidecar.sources.watch import Reloadable

        async def main():
            r = Reloadable("svid", (), lambda: Path({str(hung_file)!r}).read_bytes(),
                           lambda _: True, timeout=60)
            task = asyncio.create_task(r.reload("test"))
            while not any(t.name == "sidecar-load" for t in threading.enumerate()):
                await asyncio.sleep(0.01)
            print("stuck", flush=True)

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=15,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout == b"stuck\n", proc.stderr.decode()
    assert proc.returncode == 0, proc.stderr.decode()
