"""The spec's secrets as Kubernetes Secrets: the token file, secret-named env values, dockerAuth.

No secret value is written anywhere but in a Secret: the ConfigMap's spec leaves them out, and
the pod refers to them by name (a mounted file, secretKeyRef, imagePullSecrets).
"""

from __future__ import annotations

import base64
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from agent.k8s.model import Manifest, Options, metadata, object_name
from agent.launch import TOKEN_PATH
from bootstrap.spec import ServiceSpec, SpecError, SpecIssue, is_secret_name

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # how docker config files name Docker Hub


@dataclass
class PodSecrets:
    secrets: list[Manifest] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    image_pull_secrets: list[dict[str, str]] = field(default_factory=list)


def pod_secrets(spec: ServiceSpec, options: Options, source: str) -> PodSecrets:
    out = PodSecrets()
    if spec.token is not None:
        name = f"{object_name(spec.name)}-token"
        out.secrets.append(_secret(spec, name, options, {"token": spec.token.get_secret_value()}))
        directory, filename = posixpath.split(TOKEN_PATH)
        out.volumes.append({"name": "token", "secret": {"secretName": name, "defaultMode": 0o400,
                                                         "items": [{"key": "token", "path": filename}]}})
        out.mounts.append({"name": "token", "mountPath": directory, "readOnly": True})
        out.env.append({"name": "BERTH_SERVICE_TOKEN_FILE", "value": TOKEN_PATH})
    hidden = {var.name: var.value for var in spec.container.env if is_secret_name(var.name)}
    if hidden:
        name = f"{object_name(spec.name)}-env"
        out.secrets.append(_secret(spec, name, options, hidden))
    for var in spec.container.env:
        if var.name in hidden:
            out.env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": f"{object_name(spec.name)}-env", "key": var.name}}})
        else:
            out.env.append({"name": var.name, "value": var.value})
    if spec.docker_auth is not None:
        name = f"{object_name(spec.name)}-pull"
        config = {"auths": {_registry_key(spec.container.image): _auth_entry(spec.docker_auth.get_secret_value(), source)}}
        pull = _secret(spec, name, options, {".dockerconfigjson": json.dumps(config, sort_keys=True)})
        pull.obj["type"] = "kubernetes.io/dockerconfigjson"
        out.secrets.append(pull)
        out.image_pull_secrets.append({"name": name})
    return out


def _secret(spec: ServiceSpec, name: str, options: Options, values: dict[str, str]) -> Manifest:
    return Manifest({"apiVersion": "v1", "kind": "Secret", "metadata": metadata(name, options, object_name(spec.name)),
                     "type": "Opaque", "stringData": dict(sorted(values.items()))})


def _registry_key(image: str) -> str:
    from agent.pull import resolve

    registry = resolve(image).registry
    return DOCKER_HUB_AUTH_KEY if registry == "docker.io" else registry


def _auth_entry(value: str, source: str) -> dict[str, str]:
    from agent.pull import PullError, decode_auth

    try:
        credentials = decode_auth(value)
    except PullError as exc:
        raise SpecError([SpecIssue("dockerAuth", str(exc))], source) from None
    joined = f"{credentials['username']}:{credentials['password']}"
    return {**credentials, "auth": base64.b64encode(joined.encode()).decode()}
