"""Boot a stock Debian kernel that has the `tls` module under qemu and run
`tests/vm/ktls_guest.py` inside it; return the guest's JSON line as a dict.

    python tests/vm/run_in_vm.py -- transfer --mib 8        # prints the JSON line
    python tests/vm/run_in_vm.py --setup-only               # install and cache, no boot

How (NOTES.md has the background):

- virtme-ng (`vng`) boots the kernel with this machine's root file system shared read-only
  over 9p, and an overlay on /tmp (and /etc, /usr, /var, /home ...) whose writes go to
  guest RAM: this repo, the venv and the Python behind it are visible in the guest as they
  are here, so the guest runs the same interpreter (`sys.executable` by default).
- qemu runs under software emulation (`--disable-kvm`): /dev/kvm on these machines cannot
  run a stock guest (qemu aborts on an MSR). Expect ~12 MB/s per direction.
- The kernel is Debian's `linux-image-amd64` (whatever it depends on today), fetched with
  `apt-get download` and unpacked with `dpkg-deb -x` into a cache dir (seconds; installing
  the package would build two initramfs images for nothing). virtme-ng finds the modules
  next to the unpacked vmlinuz and links them into the guest's /lib/modules.
- Host packages: qemu-system-x86; busybox-static (virtme-ng builds its initramfs with it);
  kmod (depmod for the unpacked modules, modprobe in the guest); udev: the guest runs this
  machine's systemd-udevd to create /dev/virtio-ports/*, without which virtme-ng-init cannot
  find its script I/O ports and runs the command on the console, which vng sends to
  /dev/null (no output at all, exit 255); file (vng reads the kernel version with it).
- virtme-ng itself from PyPI into a venv in the cache dir, pinned to the version checked.

Cache: `$SIDECAR_VM_CACHE`, default ~/.cache/sidecar-ktls-vm. It must be visible in the
guest (the module symlink points into it): anywhere on the root file system is.
Overrides: `SIDECAR_VM_KERNEL` (a vmlinuz with its modules under ../lib/modules/VERSION),
`SIDECAR_VM_PYTHON` (the interpreter to run in the guest).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().with_name("ktls_guest.py")
CACHE = Path(os.environ.get("SIDECAR_VM_CACHE")
             or Path.home() / ".cache" / "sidecar-ktls-vm")
VIRTME_NG = "virtme-ng==1.42"  # the version NOTES.md's recipe was checked with
KERNEL_META = "linux-image-amd64"
MEMORY = "2G"

# what must be on this machine -> the Debian package that brings it
HOST_TOOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qemu-system-x86_64": ("qemu-system-x86", ()),
    "busybox": ("busybox-static", ("/bin/busybox", "/usr/bin/busybox")),
    "depmod": ("kmod", ("/sbin/depmod", "/usr/sbin/depmod")),
    "modprobe": ("kmod", ("/sbin/modprobe", "/usr/sbin/modprobe")),
    "systemd-udevd": ("udev", ("/lib/systemd/systemd-udevd",
                               "/usr/lib/systemd/systemd-udevd")),
    "file": ("file", ()),
}

# Step timeouts (seconds).
APT_UPDATE_TIMEOUT = 300.0
APT_INSTALL_TIMEOUT = 900.0
APT_DOWNLOAD_TIMEOUT = 300.0
PIP_TIMEOUT = 300.0
DEFAULT_RUN_TIMEOUT = 1500.0  # boot + guest run, hard: the process group is killed after
GUEST_MARGIN = 90.0  # the guest's own deadline fires this much earlier, so it still reports


class VmError(Exception):
    """Setting up or running the VM failed; the message says what to do."""


def _say(msg: str) -> None:
    print(f"[run_in_vm] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], timeout: float, what: str, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=cwd, env=env)
    except subprocess.TimeoutExpired as exc:
        raise VmError(f"{what}: `{shlex.join(cmd)}` took more than {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise VmError(f"{what}: `{shlex.join(cmd)}` exited {done.returncode}:\n"
                      f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


# --- finding things --------------------------------------------------------------------


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in HOST_TOOLS.get(name, ("", ()))[1] if os.path.exists(p)), None)


def vng_path() -> str | None:
    """`vng` on PATH, or the one this module installed into the cache."""
    cached = CACHE / "vng-venv" / "bin" / "vng"
    return shutil.which("vng") or (str(cached) if cached.exists() else None)


def missing() -> list[str]:
    """What a run needs that is not here yet (each with its package), for a skip reason."""
    out = [f"{name} (apt: {pkg})" for name, (pkg, _) in HOST_TOOLS.items() if not _tool(name)]
    if vng_path() is None:
        out.append(f"vng (pip: {VIRTME_NG})")
    return out


# --- installing ------------------------------------------------------------------------


@dataclass
class Setup:
    vng: str
    kernel: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # virtme-ng calls its other entry points (virtme-run) by name
        env["PATH"] = os.pathsep.join([str(Path(self.vng).parent), env.get("PATH", "")])
        return env


def _apt_install(packages: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise VmError(f"missing Debian packages {' '.join(packages)}; as root: apt-get "
                      f"install --no-install-recommends {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        _run(cmd, APT_INSTALL_TIMEOUT, "apt-get install", env=env)
    except VmError:
        _run(["apt-get", "update", "-q"], APT_UPDATE_TIMEOUT, "apt-get update", env=env)
        _run(cmd, APT_INSTALL_TIMEOUT, "apt-get install", env=env)


def ensure_host_packages() -> None:
    need = sorted({pkg for name, (pkg, _) in HOST_TOOLS.items() if not _tool(name)})
    if need:
        _say(f"installing {' '.join(need)}")
        _apt_install(need)


def ensure_vng() -> str:
    found = vng_path()
    if found:
        return found
    venv = CACHE / "vng-venv"
    _say(f"installing {VIRTME_NG} into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], PIP_TIMEOUT, "creating a venv")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", VIRTME_NG],
         PIP_TIMEOUT, f"pip install {VIRTME_NG}")
    return str(venv / "bin" / "vng")


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on today."""
    def depends() -> str | None:
        try:
            out = _run(["apt-cache", "depends", KERNEL_META], 60, "apt-cache depends")
        except VmError:
            return None
        for line in out.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Depends" and value.startswith("linux-image-"):
                return value.strip()
        return None

    pkg = depends()
    if pkg is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-q"], APT_UPDATE_TIMEOUT, "apt-get update")
        pkg = depends()
    if pkg is None:
        raise VmError(f"cannot resolve {KERNEL_META} with apt-cache (no Debian apt "
                      "sources?); set SIDECAR_VM_KERNEL to a vmlinuz whose modules sit "
                      "under ../lib/modules/VERSION")
    return pkg


def _kernel_in(root: Path) -> Path | None:
    """The vmlinuz in an unpacked kernel package, if its modules include tls.ko."""
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*")):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        for lib in ("lib", "usr/lib"):
            mods = root / lib / "modules" / version
            if any(mods.glob("kernel/net/tls/tls.ko*")):
                return vmlinuz
    return None


def ensure_kernel() -> Path:
    override = os.environ.get("SIDECAR_VM_KERNEL")
    if override:
        return Path(override)
    kernels = CACHE / "kernels"
    try:
        pkg = _kernel_package()
    except VmError:
        cached = sorted(p for p in (kernels.glob("*/") if kernels.exists() else ())
                        if _kernel_in(p))
        if cached:  # offline: the newest kernel unpacked before
            return _kernel_in(cached[-1]) or Path()
        raise
    root = kernels / pkg
    found = _kernel_in(root)
    if found:
        return found
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {pkg} (apt-get download) into {debs}")
    _run(["apt-get", "download", pkg], APT_DOWNLOAD_TIMEOUT, f"apt-get download {pkg}",
         cwd=debs)
    deb = max(debs.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
    tmp = kernels / f"{pkg}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb), str(tmp)], APT_DOWNLOAD_TIMEOUT, "dpkg-deb -x")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    deb.unlink()  # 70 MB, and the unpacked tree is what we reuse
    found = _kernel_in(root)
    if found is None:
        raise VmError(f"{pkg} unpacked into {root} has no vmlinuz with net/tls/tls.ko")
    return found


def ensure() -> Setup:
    """Install or find everything a run needs; reuses the cache."""
    seconds: dict[str, float] = {}
    t = time.monotonic()
    ensure_host_packages()
    seconds["host_packages"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    vng = ensure_vng()
    seconds["virtme_ng"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    kernel = ensure_kernel()
    seconds["kernel"] = round(time.monotonic() - t, 1)
    return Setup(vng, kernel, seconds)


# --- running ---------------------------------------------------------------------------


def guest_command(guest_args: Sequence[str], python: str) -> str:
    """The shell line the guest runs. `modprobe tls` first: the guest script reports an
    absent module itself (its JSON says which ULPs the kernel offers)."""
    script = shlex.join([python, str(GUEST), *guest_args])
    return (f"modprobe tls || echo 'modprobe tls failed' >&2; cd {shlex.quote(str(REPO))} "
            f"&& PYTHONPATH={shlex.quote(str(REPO))} exec {script}")


def run(
    guest_args: Sequence[str],
    *,
    timeout: float = DEFAULT_RUN_TIMEOUT,
    python: str | None = None,
    setup: Setup | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Boot the VM, run `ktls_guest.py GUEST_ARGS`, return its JSON line (plus a `host`
    section with timings). Raises VmError with the output's tail when there is no JSON."""
    t0 = time.monotonic()
    setup = setup or ensure()
    python = python or os.environ.get("SIDECAR_VM_PYTHON") or sys.executable
    args = list(guest_args)
    if "--deadline" not in args:
        args += ["--deadline", str(int(max(60.0, timeout - GUEST_MARGIN)))]
    cmd = [setup.vng, "-r", str(setup.kernel), "--disable-kvm", "--memory", MEMORY,
           "--exec", guest_command(args, python)]
    _say(f"booting: {shlex.join(cmd)}")
    echo = echo or (lambda line: print(f"[guest] {line}", file=sys.stderr, flush=True))
    t_boot = time.monotonic()
    # Pipes for both streams (the `| cat` of NOTES.md): vng garbles output sent to a tty
    # or to one file for both. Its own process group, so a timeout kills qemu too.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=setup.env, cwd=REPO,
                            start_new_session=True)
    out_lines: list[str] = []
    err_lines: list[str] = []

    def pump(stream: Any, sink: list[str], show: bool) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            sink.append(line)
            if show:
                echo(line)

    readers = [threading.Thread(target=pump, args=(proc.stdout, out_lines, False),
                                daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_lines, True),
                                daemon=True)]
    for r in readers:
        r.start()
    timed_out = False
    try:
        proc.wait(timeout - (time.monotonic() - t0))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # vng, virtme-run, qemu: our group only
            proc.wait(30)
    for r in readers:
        r.join(10)
    result = _json_line(out_lines)
    if result is None:
        why = (f"timed out after {timeout:.0f}s" if timed_out
               else f"vng exited {proc.returncode}")
        tail = "\n".join((out_lines + err_lines)[-60:])
        raise VmError(f"no JSON line from the guest ({why}); the output's tail:\n{tail}")
    result["host"] = {
        "setup_s": setup.seconds,
        "boot_and_run_s": round(time.monotonic() - t_boot, 1),
        "total_s": round(time.monotonic() - t0, 1),
        "vng_exit": proc.returncode,
        "timed_out": timed_out,
        "kernel_image": str(setup.kernel),
        "guest_python": python,
        "stdout_other": [ln for ln in out_lines if not ln.startswith("{")][-20:],
    }
    return result


def _json_line(lines: Sequence[str]) -> dict[str, Any] | None:
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "mode" in obj:
                return obj
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup-only", action="store_true", help="install and cache, no boot")
    p.add_argument("--timeout", type=float, default=DEFAULT_RUN_TIMEOUT)
    p.add_argument("--python", default=None, help="interpreter to run in the guest")
    p.add_argument("guest_args", nargs=argparse.REMAINDER,
                   help="after --: ktls_guest.py arguments (default: transfer --mib 8)")
    args = p.parse_args(argv)
    t = time.monotonic()
    try:
        setup = ensure()
        _say(f"setup done in {time.monotonic() - t:.1f}s: vng={setup.vng} "
             f"kernel={setup.kernel} {setup.seconds}")
        if args.setup_only:
            return 0
        guest = [a for a in args.guest_args if a != "--"] or ["transfer", "--mib", "8"]
        result = run(guest, timeout=args.timeout, python=args.python, setup=setup)
    except VmError as exc:
        _say(f"error: {exc}")
        return 2
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
