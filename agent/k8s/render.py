"""Every object for a set of service files and group files, and their YAML.

Same input, same bytes: objects come in a fixed order per service (Secrets, ConfigMap, claims,
Deployment, Service, PodDisruptionBudget, ScaledObject, HTTPRoute), then one route per group,
and every mapping's keys are sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.k8s import checks, route, scaling, secrets, storage, workload
from agent.k8s.model import Manifest, Options, Warnings, object_name
from bootstrap.errors import CommandFailed, UsageError
from bootstrap.group import GroupRoute, GroupSpec, load_group_file
from bootstrap.spec import NOT_ON_ONE_NODE, ServiceSpec, SpecIssue, load_spec_file


@dataclass(frozen=True)
class Rendered:
    manifests: list[Manifest]
    warnings: list[str]


def render_files(service_files: list[str], group_files: list[str], options: Options) -> Rendered:
    """Read and validate every file (SpecError names the file and JSON path), then render them all."""
    warnings = Warnings()
    services: list[tuple[str, ServiceSpec]] = []
    for path in service_files:
        parsed = load_spec_file(path)
        for issue in parsed.warnings:
            _spec_warning(str(path), issue, warnings)
        services.append((str(path), parsed.spec))
    groups: list[tuple[str, GroupSpec]] = []
    for path in group_files:
        group, issues = load_group_file(path)
        for issue in issues:
            warnings.add(str(path), issue.path, issue.message)
        groups.append((str(path), group))
    return render(services, groups, options, warnings)


def _spec_warning(source: str, issue: SpecIssue, warnings: Warnings) -> None:
    """The spec's warnings speak of one node; say what they mean for the manifests."""
    parent, _, field = issue.path.rpartition(".")
    if field in NOT_ON_ONE_NODE.get(parent, {}):
        warnings.add(source, issue.path, f"left out: {NOT_ON_ONE_NODE[parent][field]} has no Kubernetes form here")
    else:
        warnings.add(source, issue.path, issue.message)


def render(services: list[tuple[str, ServiceSpec]], groups: list[tuple[str, GroupSpec]], options: Options,
           warnings: Warnings | None = None) -> Rendered:
    warnings = warnings or Warnings()
    _distinct_names(services, groups)
    manifests: list[Manifest] = []
    for source, spec in services:
        manifests.extend(render_service(spec, options, source, warnings))
    known = {spec.name for _, spec in services}
    for source, group in _with_members(groups, services):
        manifests.append(route.group_route(group, options, source, known, warnings))
    problems = checks.check_all(manifests)
    if problems:
        raise CommandFailed("the rendered manifests fail berth's own checks (a bug in berth; please report it):\n  "
                            + "\n  ".join(problems))
    return Rendered(manifests, warnings.items)


def _distinct_names(services: list[tuple[str, ServiceSpec]], groups: list[tuple[str, GroupSpec]]) -> None:
    """Services and groups share one URL space and one namespace of object names."""
    owners: dict[str, str] = {}
    named = [(source, spec.name) for source, spec in services] + [(source, group.name) for source, group in groups]
    for source, name in named:
        key = object_name(name)
        if key in owners:
            raise UsageError(f"{source}: the name {name!r} is also used in {owners[key]}; each service and group needs "
                             "its own (Kubernetes names read '_' as '-')")
        owners[key] = source


def render_service(spec: ServiceSpec, options: Options, source: str, warnings: Warnings) -> list[Manifest]:
    if object_name(spec.name) != spec.name:
        warnings.add(source, "metadata.name", f"Kubernetes names cannot hold '_': the objects are named "
                     f"{object_name(spec.name)!r}; the URL and the model name keep {spec.name!r}")
    pod_storage = storage.pod_storage(spec, options)
    pod_secrets = secrets.pod_secrets(spec, options, source)
    scaled = scaling.scaled_object(spec, options, source, warnings)
    config = workload.config_map(spec, pod_storage, options)
    out = [*pod_secrets.secrets, config, *pod_storage.claims,
           workload.deployment(spec, config, pod_storage, pod_secrets, options, autoscaled=scaled is not None,
                               source=source, warnings=warnings),
           workload.service(spec, options), workload.disruption_budget(spec, options)]
    if scaled is not None:
        out.append(scaled)
    out.append(route.service_route(spec.name, options))
    return out


def _with_members(groups: list[tuple[str, GroupSpec]], services: list[tuple[str, ServiceSpec]]) -> list[tuple[str, GroupSpec]]:
    """Group files, joined by services naming the group in metadata.group (weight 100 unless the file names them),
    and groups named only by their members."""
    members: dict[str, list[str]] = {}
    for _, spec in services:
        if spec.metadata.group:
            members.setdefault(spec.metadata.group, []).append(spec.name)
    result = []
    for source, group in groups:
        named = {r.service for r in group.routes}
        extra = [GroupRoute(service=name) for name in members.pop(group.name, []) if name not in named]
        result.append((source, group.model_copy(update={"routes": [*group.routes, *extra]}) if extra else group))
    for name, services_in in members.items():
        source = next(src for src, spec in services if spec.metadata.group == name)
        result.append((source, GroupSpec(name=name, routes=[GroupRoute(service=s) for s in services_in])))
    return result


# --- YAML -----------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, no anchors; multi-line strings (the spec JSON) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _string)


def _dump(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=1000, allow_unicode=True)


def to_yaml(manifest: Manifest) -> str:
    comment = manifest.comment
    if manifest.commented is not None:
        comment += "\n---\n" + _dump(manifest.commented)
    return "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) + _dump(manifest.obj)


def to_stream(manifests: list[Manifest]) -> str:
    """One multi-document YAML stream."""
    return "".join(f"---\n{to_yaml(manifest)}" for manifest in manifests)


def file_name(manifest: Manifest) -> str:
    return f"{manifest.kind.lower()}-{manifest.name}.yaml"


def write_files(manifests: list[Manifest], directory: Path) -> list[Path]:
    """One file per object; files already in `directory` under other names are left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for manifest in manifests:
        path = directory / file_name(manifest)
        path.write_text(to_yaml(manifest), encoding="utf-8")
        written.append(path)
    return written


def load_stream(text: str) -> list[dict[str, Any]]:
    """The objects of a rendered stream (what `kubectl apply -f -` would read)."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]
