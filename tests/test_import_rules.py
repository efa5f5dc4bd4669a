"""The arrows the design forbids, read from the package's own imports (issue 17, STYLE.md).

A byte's way reads in one direction (listener -> engine -> authn -> authz -> pump -> app),
and imports point the same way: the pure cores import no I/O, `tls/` knows neither the
proxy, the config schema nor the dev CA, observation never drives the proxy, the proxy
never reaches into the tools, and only `tls/openssl.py` touches CPython's private ssl
objects or ctypes. Each rule is a test of its own, so a failure names the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SIDECAR = Path(__file__).resolve().parent.parent / "sidecar"

# Pure values, rules and vocabularies: functions of plain values, testable without I/O.
PURE = ("spiffe", "svid", "reasons", "outcomes", "modes", "problems", "times",
        "policy.model", "tls.classify", "proxy.proxy_header", "http1", "http1.path",
        "http1.request", "http1.response", "http1.answers", "http1.xfcc")
IO_MODULES = {"socket", "ssl", "asyncio", "subprocess", "os", "selectors", "threading",
              "ctypes", "uvloop", "inotify_simple", "prometheus_client", "http", "urllib"}
# The commands around the proxy: the proxy and its life cycle never import them.
TOOLS = ("tools", "cli")
PROXY_AND_RUN = ("proxy", "tls", "run.server", "run.workers", "run.snapshots", "run.drain",
                 "run.lifecycle", "sources", "authn", "identity", "endpoint", "run.preflight",
                 "run.status")
OBSERVATION = ("observe", "run.status")
# Tests allow `ssl.SSLSocket`'s public names; these are CPython's private reach.
PRIVATE_SSL = {"_sslobj", "_msg_callback", "_sslcontext", "_ssl"}


def _name(path: Path) -> str:
    rel = path.relative_to(SIDECAR).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(SIDECAR.rglob("*.py"))}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import, lazy ones inside functions too."""
    package = _name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = "sidecar." + ".".join([*up, base]).strip(".")
            yield node.lineno, base
            for alias in node.names:  # `from sidecar.tools import pki` imports sidecar.tools.pki
                yield node.lineno, f"{base}.{alias.name}"


def _within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _ours(imported: str) -> str | None:
    if imported == "sidecar" or not imported.startswith("sidecar."):
        return None
    inner = imported.removeprefix("sidecar.")
    # `from sidecar.x import name` also yields "sidecar.x.name": keep the module part.
    while inner and inner not in MODULES and "." in inner:
        inner = inner.rsplit(".", 1)[0]
    return inner if inner in MODULES else None


def _violations(sources: tuple[str, ...], bad: tuple[str, ...]) -> list[str]:
    out = []
    for name, path in MODULES.items():
        if not _within(name, sources):
            continue
        for line, imported in _imports(path):
            target = _ours(imported)
            if target is not None and _within(target, bad) and not _within(target, sources):
                out.append(f"{name}:{line} imports {target}")
    return sorted(set(out))


def test_the_module_list_is_read() -> None:
    assert {"spiffe", "tls.openssl", "proxy.pump", "run.server", "policy.model"} <= set(MODULES)


@pytest.mark.parametrize("module", PURE)
def test_pure_cores_import_no_io(module: str) -> None:
    path = MODULES[module]
    found = []
    for line, imported in _imports(path):
        if imported.split(".")[0] in IO_MODULES and not (
                module == "tls.classify" and imported == "ssl"):  # reads SSLError's fields
            found.append(f"{module}:{line} imports {imported}")
        target = _ours(imported)
        if target is not None and not _within(target, PURE):
            found.append(f"{module}:{line} imports {target}, which is not a pure core")
    assert found == []


def test_tls_knows_neither_the_proxy_nor_the_config_nor_the_dev_ca() -> None:
    assert _violations(("tls",), ("proxy", "config", "tools.pki", "run.server",
                                  "run.workers", *TOOLS)) == []


def test_observation_does_not_drive_the_proxy() -> None:
    assert _violations(OBSERVATION, ("proxy", "run.server", "run.workers", "run.drain",
                                     "run.lifecycle", *TOOLS)) == []


def test_the_proxy_and_its_life_cycle_never_import_the_tools() -> None:
    assert _violations(PROXY_AND_RUN, TOOLS) == []


def test_the_proxy_does_not_import_its_assembly() -> None:
    assert _violations(("proxy",), ("run.server", "run.workers", "run.snapshots",
                                    "run.drain", "run.lifecycle")) == []


def test_only_tls_openssl_touches_private_ssl_objects_or_ctypes() -> None:
    found = []
    for name, path in MODULES.items():
        if name == "tls.openssl":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_SSL:
                found.append(f"{name}:{node.lineno} .{node.attr}")
        for line, imported in _imports(path):
            if imported.split(".")[0] in {"ctypes", "_ssl"}:
                found.append(f"{name}:{line} imports {imported}")
    assert found == []
