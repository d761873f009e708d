"""`berth render k8s`: the manifests pass the API server's schemas and berth's own checks, and say
what they leave out. The pod they describe is booted for real in tests/test_render_k8s_boot.py."""

from __future__ import annotations

import base64
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.k8s import checks
from agent.k8s.model import Manifest, Options
from agent.k8s.render import load_stream, render_files, to_stream
from bootstrap.spec import SpecError
from tests.harness.k8s import CORE_KINDS, KUBERNETES_VERSION, REPO, validate

EXAMPLES = REPO / "examples"
TOKEN = "svc-token-never-elsewhere"
ENV_SECRET = "sk-live-0123456789"
DOCKER_AUTH = base64.b64encode(b"robot:registry-password-42").decode()

FULL = {
    "metadata": {
        "name": "big_llm", "instance": 3, "cpu": 8, "memory": 32768, "gpu": 2, "shm_size": 4,
        "rolling_strategy": {"max_surge": 0, "max_unavailable": 1}, "eas": {"termination_grace_period": 90},
    },
    "containers": [{
        "image": "registry.example.com:5000/team/llm:2.1", "command": "python serve.py", "port": 8000,
        "env": [{"name": "MODEL", "value": "llama"}, {"name": "HF_TOKEN", "value": ENV_SECRET}],
        "startup_check": {"http_get": {"path": "/health"}, "period_seconds": 10, "failure_threshold": 120},
    }],
    "storage": [
        {"mount_path": "/mnt/weights", "oss": {"path": "oss://models/llama/", "readOnly": True}},
        {"mount_path": "/mnt/out", "s3": {"path": "s3://results/run/", "mode": "fuse"}},
        {"mount_path": "/mnt/nas", "nfs": {"server": "10.0.0.5", "path": "/export/data", "readOnly": True}},
        {"mount_path": "/mnt/local", "local": {"path": "/data/local"}},
        {"mount_path": "/mnt/scratch", "empty_dir": {"medium": "memory", "size_limit": "2Gi"}},
    ],
    "features": {"eas.aliyun.com/extra-ephemeral-storage": "100Gi"},
    "autoscaler": {"min": 0, "max": 6, "scaleStrategies": [
        {"metricName": "qps", "threshold": 20}, {"metricName": "concurrency", "threshold": 8},
        {"metricName": "cpu", "threshold": 70}, {"metricName": "gpu[util]", "threshold": 80},
        {"metricName": "custom[vllm:num_requests_waiting]", "threshold": 3}],
        "behavior": {"scaleUp": {"stabilizationWindowSeconds": 30}, "scaleDown": {"stabilizationWindowSeconds": 600},
                     "onZero": {"scaleDownGracePeriodSeconds": 900}}},
    "cronscaler": {"ScaleJobs": [
        {"Name": "day", "Schedule": "0 0 8 * * 1-5", "TargetSize": 4, "TimeZone": "Asia/Shanghai"},
        {"Name": "night", "Schedule": "0 20 * * 1-5", "TargetSize": 1, "TimeZone": "Asia/Shanghai"}],
        "ExcludeDates": ["* * 1 10 *"]},
    "token": TOKEN,
    "dockerAuth": DOCKER_AUTH,
}
GROUP = {"name": "llm", "token": "group-token-never-elsewhere", "routes": [
    {"service": "big_llm", "weight": 80}, {"service": "other", "weight": 20, "mirror_weight": 10},
    {"service": "other", "match": {"headers": {"x-tier": "gold", "user-agent": "~curl/"}}}]}


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def berth(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootstrap.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def full(tmp_path):
    rendered = render_files([write(tmp_path, "big.json", FULL)], [write(tmp_path, "llm.group.json", GROUP)], Options())
    objects = {(m.kind, m.name): m.obj for m in rendered.manifests}
    return rendered, objects


def example_files() -> tuple[list[str], list[str]]:
    groups = sorted(str(p) for p in EXAMPLES.glob("*.group.json"))
    services = sorted(str(p) for p in EXAMPLES.glob("*.json") if not p.name.endswith(".group.json"))
    return services, groups


def test_every_example_renders_through_the_cli_and_its_core_objects_pass_kubernetes_strict_schema():
    services, groups = example_files()
    assert len(services) >= 3 and groups  # hello, qwen-vllm, its second revision; the canary group
    result = berth("render", "k8s", *services, *[arg for g in groups for arg in ("--group", g)])
    assert result.returncode == 0, result.stderr
    objects = load_stream(result.stdout)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HTTPRoute", "ScaledObject"} <= kinds
    for obj in objects:
        if obj["kind"] in CORE_KINDS:
            validate(obj)
    # the canary group: one route over both revisions, mirror and header match
    group = next(o for o in objects if o["kind"] == "HTTPRoute" and o["metadata"]["name"] == "qwen")
    weighted = group["spec"]["rules"][-1]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in weighted] == [("qwen-chat", 90), ("qwen-chat-v2", 10)]


def test_examples_scaled_object_and_routes_pass_the_released_crd_schemas():
    services, groups = example_files()
    rendered = render_files(services, groups, Options())
    crds = [m.obj for m in rendered.manifests if m.kind not in CORE_KINDS]
    assert {o["kind"] for o in crds} == {"HTTPRoute", "ScaledObject"}
    for obj in crds:
        validate(obj)


def test_full_spec_core_objects_pass_kubernetes_strict_schema(full):
    rendered, _ = full
    core = [m.obj for m in rendered.manifests if m.kind in CORE_KINDS]
    assert {o["kind"] for o in core} == CORE_KINDS
    for obj in core:
        validate(obj)


def test_full_spec_scaled_object_and_routes_pass_the_released_crd_schemas(full):
    rendered, _ = full
    crds = [m.obj for m in rendered.manifests if m.kind not in CORE_KINDS]
    assert sorted(o["kind"] for o in crds) == ["HTTPRoute", "HTTPRoute", "ScaledObject"]
    for obj in crds:
        validate(obj)


def test_crd_validation_is_strict_and_catches_what_a_gateway_would_refuse(full):
    import jsonschema

    _, objects = full
    route = copy.deepcopy(objects[("HTTPRoute", "llm")])
    route["spec"]["rules"][0]["filters"][0]["type"] = "Rewrite"
    with pytest.raises(jsonschema.ValidationError):
        validate(route)
    scaled = copy.deepcopy(objects[("ScaledObject", "big-llm")])
    scaled["spec"]["minReplicas"] = 1  # a misspelt field is refused, as the API server's strict validation does
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


def test_deployment_maps_resources_probes_rollout_and_shm(full):
    rendered, objects = full
    deployment = objects[("Deployment", "big-llm")]
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 1}  # EAS: surge at least 1
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 90
    container = pod["containers"][0]
    assert container["command"] == ["berth", "boot", "--", "sh", "-c", "python serve.py"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "admin": 9090}
    # 32768 MiB of memory plus the 4 GiB of /dev/shm that tmpfs charges to it
    assert container["resources"]["limits"] == {"cpu": "8000m", "memory": "36864Mi", "ephemeral-storage": "100Gi",
                                                "nvidia.com/gpu": 2}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "4096Mi"}}
    startup = container["startupProbe"]
    # the spec's own startup budget (10 s x 120) plus the prepare allowance for the OSS download
    assert startup["httpGet"] == {"path": "/ready", "port": "admin"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200 + 900
    assert container["readinessProbe"]["periodSeconds"] == 1 and container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert {"app.kubernetes.io/name": "big-llm"} == deployment["spec"]["selector"]["matchLabels"]
    assert any("metadata.name" in w and "'big-llm'" in w for w in rendered.warnings)


def test_storage_mounts_only_this_services_cache_and_renders_claims_nfs_hostpath_emptydir(full):
    _, objects = full
    pod = objects[("Deployment", "big-llm")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = sorted(v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v)
    assert host_paths == ["/data/local", "/var/cache/berth/compile", "/var/cache/berth/pip",
                          "/var/cache/berth/weights/.fill.lock", "/var/cache/berth/weights/services/big_llm",
                          "/var/cache/berth/weights/shared"]  # never /var/cache/berth/weights itself
    container = pod["containers"][0]
    assert {"name": "BERTH_CACHE_DIR", "value": "/var/cache/berth"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "big-llm-storage"}}]
    assert ("Secret", "big-llm-storage") not in objects  # referenced, never rendered
    assert volumes["storage-2"]["nfs"] == {"server": "10.0.0.5", "path": "/export/data", "readOnly": True}
    assert volumes["storage-4"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["storage-3"] == {"name": "storage-3", "mountPath": "/mnt/local", "readOnly": True}  # local: read-only by default
    assert volumes["storage-1"]["persistentVolumeClaim"] == {"claimName": "big-llm-storage-1"}
    claim = objects[("PersistentVolumeClaim", "big-llm-storage-1")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["volumeName"] == "big-llm-storage-1"
    # berth boot must not mount the FUSE entry a second time; the cache entry stays for it to fill
    spec = json.loads(objects[("ConfigMap", "big-llm-spec")]["data"]["spec.json"])
    assert [entry["mount_path"] for entry in spec["storage"]] == ["/mnt/weights", "/mnt/nas", "/mnt/local", "/mnt/scratch"]


def test_claim_carries_the_csi_volume_it_expects_as_a_comment(tmp_path):
    spec = {**FULL, "storage": [{"mount_path": "/mnt/out", "oss": {"path": "oss://results/run/", "mode": "fuse"}}]}
    rendered = render_files([write(tmp_path, "a.json", spec)], [], Options())
    text = to_stream(rendered.manifests)
    claim = next(m for m in rendered.manifests if m.kind == "PersistentVolumeClaim")
    commented = text.split("# ---\n", 1)[1].split("\napiVersion: v1\nkind: PersistentVolumeClaim", 1)[0]
    volume = yaml.safe_load("\n".join(line[2:] for line in commented.splitlines()))
    assert volume == claim.commented and volume["kind"] == "PersistentVolume"
    assert volume["spec"]["csi"]["driver"] == "ossplugin.csi.alibabacloud.com"
    assert volume["spec"]["csi"]["volumeAttributes"] == {"bucket": "results", "path": "/run/"}
    assert volume["spec"]["claimRef"] == {"namespace": "default", "name": claim.name}
    assert claim.comment.startswith("This claim expects a PersistentVolume of Alibaba Cloud's OSS CSI plugin")
    kubernetes_validate.validate(volume, KUBERNETES_VERSION, strict=True)  # it applies once its Secret exists
    assert all(doc["kind"] != "PersistentVolume" for doc in load_stream(text))  # commented, not applied


def test_secrets_live_only_in_secrets_and_the_pod_refers_to_them(full):
    rendered, objects = full
    token = objects[("Secret", "big-llm-token")]
    assert token["stringData"] == {"token": TOKEN}
    env_secret = objects[("Secret", "big-llm-env")]
    assert env_secret["stringData"] == {"HF_TOKEN": ENV_SECRET}
    pull = objects[("Secret", "big-llm-pull")]
    assert pull["type"] == "kubernetes.io/dockerconfigjson"
    auths = json.loads(pull["stringData"][".dockerconfigjson"])["auths"]
    assert list(auths) == ["registry.example.com:5000"]
    assert base64.b64decode(auths["registry.example.com:5000"]["auth"]) == b"robot:registry-password-42"
    pod = objects[("Deployment", "big-llm")]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "big-llm-pull"}]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "big-llm-env", "key": "HF_TOKEN"}}
    assert env["MODEL"]["value"] == "llama"
    assert env["BERTH_SERVICE_TOKEN_FILE"]["value"] == "/run/berth/token"
    assert {"name": "token", "mountPath": "/run/berth", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    text = to_stream([m for m in rendered.manifests if m.kind != "Secret"])
    for value in (TOKEN, ENV_SECRET, DOCKER_AUTH, "registry-password-42", "group-token-never-elsewhere"):
        assert value not in text
    spec = json.loads(objects[("ConfigMap", "big-llm-spec")]["data"]["spec.json"])
    assert "token" not in spec and "dockerAuth" not in spec
    assert [e["name"] for e in spec["containers"][0]["env"]] == ["MODEL"]  # boot would put '***' over the Secret's value


def test_service_and_disruption_budget_never_block_a_drain(full):
    _, objects = full
    service = objects[("Service", "big-llm")]["spec"]
    assert service["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(80, "http"), (9090, "admin")]
    assert objects[("PodDisruptionBudget", "big-llm")]["spec"]["maxUnavailable"] == 1


def test_autoscaler_and_cronscaler_become_one_scaled_object(full):
    rendered, objects = full
    scaled = objects[("ScaledObject", "big-llm")]["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 6)  # min 0 has no KEDA form without the HTTP add-on
    assert scaled["cooldownPeriod"] == 900
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleUp": {"stabilizationWindowSeconds": 30}, "scaleDown": {"stabilizationWindowSeconds": 600}}
    prometheus = [t for t in scaled["triggers"] if t["type"] == "prometheus"]
    pods = 'namespace="default",pod=~"big-llm-[a-z0-9]+-[a-z0-9]{5}"'
    assert [t["metadata"]["query"] for t in prometheus] == [
        f"sum(rate(berth_requests_total{{{pods}}}[1m]))",
        f"sum(berth_inflight_requests_avg{{{pods}}})",
        f"sum(rate(berth_child_cpu_seconds_total{{{pods}}}[1m])) * 100 / 8",
        f"sum(DCGM_FI_DEV_GPU_UTIL{{{pods}}}) / 2",
        f"sum(vllm:num_requests_waiting{{{pods}}})",
    ]
    assert [t["metadata"]["threshold"] for t in prometheus] == ["20", "8", "70", "80", "3"]
    assert {t["metadata"]["serverAddress"] for t in prometheus} == {"http://prometheus.monitoring.svc:9090"}
    cron = [t["metadata"] for t in scaled["triggers"] if t["type"] == "cron"]
    assert cron == [
        {"timezone": "Asia/Shanghai", "start": "0 8 * * 1-5", "end": "0 20 * * 1-5", "desiredReplicas": "4"},
        {"timezone": "Asia/Shanghai", "start": "0 20 * * 1-5", "end": "0 8 * * 1-5", "desiredReplicas": "1"},
    ]
    warnings = "\n".join(rendered.warnings)
    assert "autoscaler.min: 0 rendered as minReplicaCount 1" in warnings and "HTTP add-on" in warnings
    assert "cronscaler.ExcludeDates: left out" in warnings


def test_group_renders_weights_mirror_and_header_matches(full):
    rendered, objects = full
    route = objects[("HTTPRoute", "llm")]["spec"]
    assert route["parentRefs"] == [{"name": "berth"}]
    header_rule, split_rule = route["rules"]
    assert header_rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/api/predict/llm"}
    headers = {h["name"]: h for h in header_rule["matches"][0]["headers"]}
    assert headers["x-tier"] == {"type": "Exact", "name": "x-tier", "value": "gold"}
    assert headers["user-agent"] == {"type": "RegularExpression", "name": "user-agent", "value": ".*(?:curl/).*"}
    assert [(b["name"], b["weight"]) for b in split_rule["backendRefs"]] == [("big-llm", 80), ("other", 20)]
    mirror = [f for f in split_rule["filters"] if f["type"] == "RequestMirror"]
    assert mirror == [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "other", "port": 80}, "percent": 10}}]
    rewrite = split_rule["filters"][0]["urlRewrite"]["path"]
    assert rewrite == {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
    warnings = "\n".join(rendered.warnings)
    assert "llm.group.json: token: left out: an HTTPRoute cannot check tokens" in warnings
    assert "routes[1].service: 'other' is not among the rendered files" in warnings
    own = objects[("HTTPRoute", "big-llm")]["spec"]["rules"][0]["matches"][0]["path"]
    assert own == {"type": "PathPrefix", "value": "/api/predict/big_llm"}  # the node gateway's URL keeps the berth name


def test_a_member_named_by_metadata_group_joins_with_weight_100(tmp_path):
    one = {"metadata": {"name": "a", "group": "g"}, "containers": [{"image": "x:1"}]}
    two = {"metadata": {"name": "b", "group": "g"}, "containers": [{"image": "x:1"}]}
    rendered = render_files([write(tmp_path, "a.json", one), write(tmp_path, "b.json", two)], [], Options())
    route = next(m.obj for m in rendered.manifests if (m.kind, m.name) == ("HTTPRoute", "g"))
    assert [(b["name"], b["weight"]) for b in route["spec"]["rules"][0]["backendRefs"]] == [("a", 100), ("b", 100)]


def test_output_is_the_same_bytes_every_time_and_files_hold_the_same_objects(tmp_path):
    services, groups = example_files()
    args = ["render", "k8s", *services, *[arg for g in groups for arg in ("--group", g)], "--namespace", "serving"]
    first, second = berth(*args), berth(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("---\n")
    out = tmp_path / "out"
    written = berth(*args, "-o", str(out))
    assert written.returncode == 0 and written.stdout == ""
    files = sorted(out.iterdir())
    assert "deployment-qwen-chat.yaml" in [f.name for f in files]
    from_files = sorted(json.dumps(yaml.safe_load(f.read_text()), sort_keys=True) for f in files)
    from_stream = sorted(json.dumps(obj, sort_keys=True) for obj in load_stream(first.stdout))
    assert from_files == from_stream
    assert all(obj["metadata"]["namespace"] == "serving" for obj in load_stream(first.stdout))


def test_errors_name_the_file_and_json_path_and_nothing_is_written(tmp_path):
    bad = write(tmp_path, "bad.json", {"metadata": {"name": "x", "instance": -1}, "containers": [{"image": "i:1"}]})
    out = tmp_path / "out"
    result = berth("render", "k8s", bad, "-o", str(out))
    assert result.returncode == 2 and "bad.json" in result.stderr and "metadata.instance" in result.stderr
    assert not out.exists()
    group = write(tmp_path, "g.json", {"name": "g", "routes": [{"service": "a", "mirror_weight": 300}]})
    good = write(tmp_path, "a.json", {"metadata": {"name": "a"}, "containers": [{"image": "i:1"}]})
    result = berth("render", "k8s", good, "--group", group)
    assert result.returncode == 2 and "routes[0].mirror_weight" in result.stderr and result.stdout == ""
    cpu = write(tmp_path, "cpu.json", {"metadata": {"name": "a"}, "containers": [{"image": "i:1"}],
                                       "autoscaler": {"max": 2, "scaleStrategies": [{"metricName": "cpu", "threshold": 50}]}})
    result = berth("render", "k8s", cpu)
    assert result.returncode == 2 and "autoscaler.scaleStrategies[0].metricName" in result.stderr
    auth = write(tmp_path, "auth.json", {"metadata": {"name": "a"}, "containers": [{"image": "i:1"}], "dockerAuth": "nocolon"})
    result = berth("render", "k8s", auth)
    assert result.returncode == 2 and "dockerAuth" in result.stderr and "nocolon" not in result.stderr


def test_help_explains_the_command():
    result = berth("render", "k8s", "--help")
    assert result.returncode == 0
    for word in ("--group", "--prometheus", "--storage-secret", "BERTH_SPEC", "docs/kubernetes.md"):
        assert word in result.stdout


# --- berth's own checks, each with an example that fails it -------------------------------------


@pytest.fixture
def manifests(full) -> list[Manifest]:
    rendered, _ = full
    assert checks.check_all(rendered.manifests) == []
    return copy.deepcopy(rendered.manifests)


def _find(manifests: list[Manifest], kind: str, name: str = "big-llm") -> dict:
    return next(m.obj for m in manifests if (m.kind, m.name) == (kind, name))


def _container(manifests: list[Manifest]) -> dict:
    return _find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_check_selector_matches_template_labels(manifests):
    _find(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "else"}
    assert any("does not match the pod template" in p for p in checks.selector_matches_template(manifests))
    assert any("Service/big-llm: selector" in p for p in checks.selector_matches_template(manifests))


def test_check_probe_ports_exist(manifests):
    _container(manifests)["readinessProbe"]["httpGet"]["port"] = "metrics"
    assert checks.probe_ports_exist(manifests) == ["Deployment/big-llm: readinessProbe port 'metrics' is none of the container's ports"]


def test_check_surge_and_unavailable_not_both_zero(manifests):
    _find(manifests, "Deployment")["spec"]["strategy"]["rollingUpdate"] = {"maxSurge": "0%", "maxUnavailable": 0}
    assert checks.rollout_can_progress(manifests)


def test_check_gpus_whole_and_in_limits(manifests):
    _container(manifests)["resources"]["limits"]["nvidia.com/gpu"] = 0.5
    assert checks.gpus_whole_in_limits(manifests)
    _container(manifests)["resources"]["limits"]["nvidia.com/gpu"] = 1
    _container(manifests)["resources"]["requests"]["nvidia.com/gpu"] = 1
    assert checks.gpus_whole_in_limits(manifests) == ["Deployment/big-llm: nvidia.com/gpu belongs in limits only (requests follow them)"]


def test_check_shm_counted_in_memory(manifests):
    _container(manifests)["resources"]["limits"]["memory"] = "4096Mi"  # no more than /dev/shm alone
    assert checks.shm_counted_in_memory(manifests)


def test_check_no_secret_value_outside_a_secret(manifests):
    _container(manifests)["env"].append({"name": "LEAK", "value": f"Bearer {TOKEN}"})
    assert checks.secrets_only_in_secrets(manifests) == ["Deployment/big-llm: holds a secret value; only a Secret may"]
    pulled = _find(manifests, "Secret", "big-llm-pull")
    password = "registry-password-42"
    assert password in base64.b64decode(json.loads(pulled["stringData"][".dockerconfigjson"])["auths"]["registry.example.com:5000"]["auth"]).decode()
    _find(manifests, "ConfigMap", "big-llm-spec")["data"]["note"] = password
    assert any(p.startswith("ConfigMap/") for p in checks.secrets_only_in_secrets(manifests))


def _mirror(manifests: list[Manifest]) -> dict:
    rule = _find(manifests, "HTTPRoute", "llm")["spec"]["rules"][-1]
    return next(f for f in rule["filters"] if f["type"] == "RequestMirror")["requestMirror"]


def test_check_mirror_percent_within_0_to_100(manifests):
    _mirror(manifests)["percent"] = 150
    assert checks.mirror_percent_in_range(manifests) == ["HTTPRoute/llm: RequestMirror percent 150 is not between 0 and 100"]


def test_check_mirror_percent_and_fraction_never_both(manifests):
    _mirror(manifests)["fraction"] = {"numerator": 1, "denominator": 10}
    assert checks.mirror_percent_or_fraction(manifests) == ["HTTPRoute/llm: RequestMirror gives both percent and fraction; give one"]


def test_check_names_unique(manifests):
    manifests.append(copy.deepcopy(manifests[-1]))
    assert checks.names_unique(manifests) == ["HTTPRoute/llm: rendered twice (a service and a group, or two files, share the name)"]


def test_a_service_and_a_group_with_one_name_are_refused(tmp_path):
    service = write(tmp_path, "s.json", {"metadata": {"name": "same"}, "containers": [{"image": "i:1"}]})
    group = write(tmp_path, "g.json", {"name": "same", "routes": [{"service": "same"}]})
    result = berth("render", "k8s", service, "--group", group)
    assert result.returncode == 2 and "g.json: the name 'same' is also used in" in result.stderr and result.stdout == ""
    twin = write(tmp_path, "t.json", {"metadata": {"name": "sa-me"}, "containers": [{"image": "i:1"}]})
    other = write(tmp_path, "u.json", {"metadata": {"name": "sa_me"}, "containers": [{"image": "i:1"}]})
    result = berth("render", "k8s", twin, other)
    assert result.returncode == 2 and "'sa_me' is also used in" in result.stderr


def test_a_bad_spec_raises_spec_error_in_process(tmp_path):
    with pytest.raises(SpecError) as caught:
        render_files([write(tmp_path, "x.json", {"metadata": {"name": "Bad"}, "containers": [{"image": "i:1"}]})], [], Options())
    assert caught.value.issues[0].path == "metadata.name"


def test_a_changed_spec_changes_the_pod_template_so_the_pods_roll(tmp_path):
    base = {"metadata": {"name": "a"}, "containers": [{"image": "i:1", "env": [{"name": "MODE", "value": "one"}]}]}
    changed = copy.deepcopy(base)
    changed["containers"][0]["env"][0]["value"] = "two"

    def template(spec: dict) -> dict:
        rendered = render_files([write(tmp_path, "a.json", spec)], [], Options())
        return next(m.obj for m in rendered.manifests if m.kind == "Deployment")["spec"]["template"]["metadata"]

    first, again, second = template(base), template(base), template(changed)
    assert first == again
    assert first["annotations"]["berth.dev/spec-sha256"] != second["annotations"]["berth.dev/spec-sha256"]


def test_scaling_queries_name_metrics_berth_boot_exports():
    """The proxy's metric names are the contract with the ScaledObject: a rename must fail here."""
    from agent.k8s.scaling import query
    from bootstrap.spec import ScaleStrategy, parse_spec
    from serving.metrics import Metrics
    from serving.state import BootState

    state = BootState()
    state.child_pid = os.getpid()  # the child collector reports only with a child
    metrics = Metrics(state)
    metrics.count(200)  # a labelled counter has no series before its first request
    exported = metrics.render().decode()
    spec = parse_spec({"metadata": {"name": "a", "cpu": 2}, "containers": [{"image": "i:1"}]}).spec
    for metric in ("qps", "concurrency", "cpu"):
        text = query(ScaleStrategy(metricName=metric, threshold=1), spec, Options())
        name = text.split("(")[-1].split("{")[0]
        assert f"\n{name} " in exported or f"\n{name}{{" in exported, (metric, name)


def test_seconds_in_a_cron_schedule_are_left_out_with_a_warning(tmp_path):
    spec = {"metadata": {"name": "a"}, "containers": [{"image": "i:1"}], "cronscaler": {"ScaleJobs": [
        {"Name": "up", "Schedule": "30 0 8 * * *", "TargetSize": 3}, {"Name": "down", "Schedule": "0 0 18 * * *", "TargetSize": 1}]}}
    rendered = render_files([write(tmp_path, "a.json", spec)], [], Options())
    scaled = next(m.obj for m in rendered.manifests if m.kind == "ScaledObject")["spec"]
    assert [t["metadata"]["start"] for t in scaled["triggers"]] == ["0 8 * * *", "0 18 * * *"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 3)
    assert any("ScaleJobs[0].Schedule: its seconds field is left out" in w for w in rendered.warnings)
    assert not any("ScaleJobs[1]" in w for w in rendered.warnings)


def test_without_proxy_or_without_berth_boot(tmp_path):
    no_proxy = {"metadata": {"name": "direct"}, "containers": [{"image": "i:1", "port": 8500, "proxy": False}]}
    bare = {"metadata": {"name": "bare"}, "containers": [{"image": "i:1", "command": "serve", "port": 8500, "bootstrap": False,
                                                          "readiness_check": {"tcp_socket": {}, "period_seconds": 2}}]}
    rendered = render_files([write(tmp_path, "d.json", no_proxy), write(tmp_path, "b.json", bare)], [], Options())
    containers = {m.name: m.obj["spec"]["template"]["spec"]["containers"][0] for m in rendered.manifests if m.kind == "Deployment"}
    direct = containers["direct"]
    assert direct["command"] == ["berth", "boot"]  # the image's CMD, under berth boot --no-proxy (from the spec)
    assert {p["name"]: p["containerPort"] for p in direct["ports"]} == {"http": 8500, "admin": 9090}
    plain = containers["bare"]
    assert plain["command"] == ["sh", "-c", "serve"] and plain["ports"] == [{"name": "http", "containerPort": 8500}]
    assert plain["readinessProbe"]["tcpSocket"] == {"port": 8500} and plain["readinessProbe"]["periodSeconds"] == 2
    assert "startupProbe" not in plain and "livenessProbe" not in plain
    assert any("containers[0].bootstrap: false: rendered without berth boot" in w for w in rendered.warnings)
    for manifest in rendered.manifests:
        if manifest.kind in CORE_KINDS:
            validate(manifest.obj)
