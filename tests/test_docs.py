"""The reference in docs/ says what the code has, no more and no less (issue 20, item 2).

Each set is derived from the code's own declaration: config keys from the schema's
dataclasses (their field names are the YAML keys), metric families from the metrics
registry (with types and label names from the metric objects), failure reasons from the
`Reason` enum with their explanation and fix. A key, family or reason added to the code
without its line in docs/ fails here, and so does a line for one that is gone.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from sidecar.config import Address, Config, parse_config
from sidecar.observe import metrics
from sidecar.reasons import Reason
from sidecar.spiffe import SpiffePattern

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

# Dataclasses in the schema that are one YAML scalar, not a section of keys.
SCALARS = (Address, SpiffePattern)

# A table row that documents one name: `| `name` | ...`
ROW = re.compile(r"^\| `([^`]+)` \|(.*)\|\s*$", re.M)


def _keys(schema: type, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name == "source" or not f.metadata.get("yaml", True):  # not YAML keys
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            if dataclasses.is_dataclass(item) and item not in SCALARS:
                keys |= _keys(typing.cast(type, item), f"{prefix}{f.name}[].")
                continue
        if dataclasses.is_dataclass(kind) and kind not in SCALARS:
            keys |= _keys(typing.cast(type, kind), f"{prefix}{f.name}.")
            continue
        keys.add(prefix + f.name)
    return keys


def _rows(page: str) -> dict[str, str]:
    return dict(ROW.findall((DOCS / page).read_text()))


def _exposed_name(name: str, kind: str) -> str:
    # prometheus_client keeps a counter's name without `_total` and adds it on exposition.
    return f"{name}_total" if kind == "counter" else name


def _families() -> dict[str, str]:
    """name as exposed -> type, for everything the registry collects."""
    return {_exposed_name(m.name, m.type): m.type for m in metrics.REGISTRY.collect()}


def _metric_objects() -> dict[str, MetricWrapperBase]:
    found = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    return {_exposed_name(m._name, m._type): m for m in found}


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    in_code = _keys(Config)
    assert {"identity.cert", "inbound[].forward_to", "tls.groups", "admin.listen",
            "workers"} <= in_code  # the derivation itself works
    documented = set(_rows("configuration.md"))
    assert sorted(in_code - documented) == [], "config keys missing from configuration.md"
    assert sorted(documented - in_code) == [], "configuration.md documents unknown keys"


def test_the_documented_defaults_are_the_schemas() -> None:
    """The default column, read back as a config file, gives the schema's defaults."""
    document: dict[str, object] = {}
    for key, row in _rows("configuration.md").items():
        default = re.fullmatch(r"\s*`([^`]+)`\s*", row.split("|")[0])
        if "[]" in key or default is None:  # list items; "required", "the host of ..."
            continue
        *sections, name = key.split(".")
        place = document
        for section in sections:
            place = typing.cast(dict[str, object], place.setdefault(section, {}))
        place[name] = yaml.safe_load(default.group(1))
    assert {"identity", "tls", "limits", "admin", "log", "workers"} <= set(document)
    source = Path("/nonexistent/sidecar.yaml")
    as_documented = parse_config(yaml.safe_dump(document), source, check_files=False)
    assert as_documented == Config(source=source)


def test_every_metric_family_is_documented_with_its_type_and_labels() -> None:
    families = _families()
    assert "sidecar_handshakes_total" in families
    documented = {name: row for name, row in _rows("metrics.md").items()
                  if name.startswith(("sidecar_", "process_", "python_"))}
    assert sorted(set(families) - set(documented)) == [], "families missing from metrics.md"
    assert sorted(set(documented) - set(families)) == [], "metrics.md documents unknown ones"
    objects = _metric_objects()
    for name, row in documented.items():
        cells = [c.strip() for c in row.split("|")]
        assert cells[0] == families[name], f"{name}: documented as {cells[0]}"
        if name in objects:
            labels = tuple(re.findall(r"`([a-z_]+)`", cells[1]))
            assert labels == objects[name]._labelnames, f"{name}: labels {labels}"


def _sections(page: str) -> dict[str, str]:
    text = (DOCS / page).read_text()
    parts = re.split(r"^## `([a-z_]+)`\s*$", text, flags=re.M)
    return {name: " ".join(body.split()) for name, body in zip(parts[1::2], parts[2::2],
                                                                 strict=True)}


def test_every_failure_reason_is_documented_in_the_codes_words() -> None:
    sections = _sections("failure-reasons.md")
    assert sorted(sections) == sorted(r.value for r in Reason)
    for reason in Reason:
        body = sections[reason.value]
        assert f"**Means:** {reason.explanation}." in body, reason
        assert f"**Fix:** {reason.fix}." in body, reason
        turned = reason.words(by_peer=True)
        if turned != (reason.explanation, reason.fix):
            assert f"**When it refused us:** {turned[0]}." in body, reason
            assert f"**Our fix:** {turned[1]}." in body, reason
    listed = " ".join((DOCS / "failure-reasons.md").read_text().split("## ")[0].split())
    assert all(f"`{r.value}`" in listed for r in Reason), "the list at the top is incomplete"


def test_the_readme_links_every_page_and_the_docs_stay_in_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert {"configuration.md", "policy.md", "metrics.md", "failure-reasons.md", "admin.md",
            "operations.md"} <= set(pages)
    for page in pages:
        assert f"](docs/{page})" in readme, f"README.md does not link docs/{page}"
    for path in _user_facing():
        text = path.read_text()
        for outside in ("SPEC.md", "NOTES.md", "STYLE.md", "../shared", "/work/"):
            assert outside not in text, f"{path.relative_to(REPO)} points to {outside}"
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (path.parent / target).exists(), f"{path.name} links {target}, not found"


def _user_facing() -> list[Path]:
    """What a user reads: the READMEs, docs/, and the example configs."""
    return [REPO / "README.md", *DOCS.glob("*.md"), *(REPO / "config").glob("*.yaml"),
            *(REPO / "examples").rglob("README.md"), *(REPO / "examples").rglob("*.yaml")]
