"""Validation of rendered manifests: kubernetes-validate for core kinds, the released CRD schemas for the rest.

The CRD files are not the project's: they are read in place from `../shared/k8s-schemas/`
beside the repository (BERTH_K8S_SCHEMAS overrides the directory, e.g. for a git worktree);
where it is absent a test skips with that reason, and fails under CI=true.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.harness.parts import unavailable

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.35.0"  # the newest minor the large managed services (EKS, GKE, AKS, ACK) all offer
CORE_KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"}
CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-v2.20.2-scaledobjects.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway-api-v1.6.1-standard-httproutes.yaml",
}


def schema_dir() -> Path:
    directory = Path(os.environ.get("BERTH_K8S_SCHEMAS") or REPO.parent / "shared" / "k8s-schemas")
    if not directory.is_dir():
        unavailable("the released CRD schemas", f"{directory} is absent (it lies beside the project as ../shared/k8s-schemas; "
                    "set BERTH_K8S_SCHEMAS to its path)")
    return directory


def _strict(schema: Any) -> Any:
    """The API server's strict field validation: an object that lists its properties takes no others."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    crd = yaml.safe_load((schema_dir() / CRD_FILES[(api_version, kind)]).read_text())
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # checked by the API server, not the CRD
    return schema


def validate(obj: dict[str, Any]) -> None:
    """Raise with the reason when `obj` would not pass the API server's schema."""
    if obj["kind"] in CORE_KINDS:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    else:
        jsonschema.validate(obj, crd_schema(obj["apiVersion"], obj["kind"]))
