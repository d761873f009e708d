"""Gateway API HTTPRoutes: `/api/predict/<name>` rewritten to `/`, the node gateway's URL.

A service gets its own route; a service group (a group file, or members named by their
metadata.group) gets one route whose backendRefs are weighted like the node gateway's split,
whose header routes become header matches, and whose mirror weights become RequestMirror
filters with `percent` (Standard since Gateway API v1.3).
"""

from __future__ import annotations

from typing import Any

from agent.k8s.model import Manifest, Options, Warnings, metadata, object_name
from agent.k8s.workload import SERVICE_PORT
from bootstrap.group import GroupSpec

API_PREFIX = "/api/predict/"


def _rewrite() -> dict[str, Any]:
    return {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}


def _path(name: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": API_PREFIX + name}}


def _route(name: str, options: Options, rules: list[dict[str, Any]], service: str | None) -> Manifest:
    return Manifest({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                     "metadata": metadata(name, options, service),
                     "spec": {"parentRefs": [{"name": options.gateway}], "rules": rules}})


def service_route(name: str, options: Options) -> Manifest:
    rule = {"matches": [_path(name)], "filters": [_rewrite()], "backendRefs": [_backend(name)]}
    return _route(object_name(name), options, [rule], object_name(name))


def _backend(service: str, **extra: int) -> dict[str, Any]:
    return {"name": object_name(service), "port": SERVICE_PORT, **extra}


def header_value(wanted: str) -> tuple[str, str]:
    """The group file's header value as a Gateway API match: Exact, or RegularExpression for '~'.

    berth searches a '~' pattern anywhere in the value; gateways differ (Envoy matches the
    whole value), so the pattern is wrapped to mean the same on both.
    """
    if wanted.startswith("~"):
        return "RegularExpression", f".*(?:{wanted[1:]}).*"
    return "Exact", wanted


def group_route(group: GroupSpec, options: Options, source: str, known: set[str], warnings: Warnings) -> Manifest:
    if group.token is not None:
        warnings.add(source, "token", "left out: an HTTPRoute cannot check tokens; each member's proxy still checks its own")
    for index, route in enumerate(group.routes):
        if route.service not in known:
            warnings.add(source, f"routes[{index}].service", f"{route.service!r} is not among the rendered files; "
                         "the route refers to its Service by name")

    def filters() -> list[dict[str, Any]]:  # the same filters on every rule: mirroring copies all of the group's requests
        return [_rewrite(), *({"type": "RequestMirror", "requestMirror": {"backendRef": _backend(route.service),
                                                                          "percent": route.mirror_weight}}
                              for route in group.routes if route.mirror_weight > 0)]

    rules = []
    for route in group.routes:
        if route.match is None:
            continue
        headers = []
        for header, wanted in sorted(route.match.headers.items()):
            kind, value = header_value(wanted)
            headers.append({"type": kind, "name": header, "value": value})
        rules.append({"matches": [{**_path(group.name), "headers": headers}], "filters": filters(),
                      "backendRefs": [_backend(route.service)]})
    weights: dict[str, int] = {}
    for route in group.routes:
        if route.match is None:
            weights[route.service] = weights.get(route.service, 0) + route.share
    if weights:
        rules.append({"matches": [_path(group.name)], "filters": filters(),
                      "backendRefs": [_backend(service, weight=weight) for service, weight in weights.items()]})
    return _route(object_name(group.name), options, rules, None)
