"""The service spec: EAS configs accepted as they are, every error named by its JSON path."""

from __future__ import annotations

import copy
import json

import pytest

from bootstrap.spec import REDACTED, SpecError, parse_spec

SEED = {
    "metadata": {"name": "hello", "instance": 1},
    "containers": [
        {
            "image": "python-inference:3.11",
            "command": "python /mnt/data/app.py",
            "port": 8000,
            "prepare": {"pythonRequirements": ["flask"]},
        }
    ],
    "storage": [{"mount_path": "/mnt/data/", "oss": {"path": "oss://examplebucket/code/", "readOnly": True}}],
}


def with_changes(**paths):
    """The seed with dotted paths set, e.g. with_changes(**{"containers.0.port": 8080})."""
    spec = copy.deepcopy(SEED)
    for dotted, value in paths.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return spec


def errors_of(raw) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return [str(issue) for issue in caught.value.issues]


def test_seed_quick_start_passes_with_defaults_filled_in():
    parsed = parse_spec(SEED)
    spec = parsed.spec
    assert parsed.warnings == []
    assert spec.name == "hello"
    assert spec.container.argv == ["sh", "-c", "python /mnt/data/app.py"]
    assert spec.container.prepare.python_requirements == ["flask"]
    store = spec.storage[0].object_store
    assert (store.bucket, store.prefix, store.effective_mode) == ("examplebucket", "code/", "cache")
    assert spec.metadata.grace_s == 30
    assert spec.metadata.request_timeout_s == 600
    # Kubernetes' probe defaults where a check is given without them
    probe = parse_spec(with_changes(**{"containers.0.readiness_check": {"http_get": {"path": "health"}}})).spec.container.readiness_check
    assert (probe.initial_delay_seconds, probe.period_seconds, probe.timeout_seconds) == (0, 10, 1)
    assert (probe.failure_threshold, probe.success_threshold, probe.http_get.path) == (3, 1, "/health")


def test_normalized_output_reparses_to_the_same_spec():
    spec = parse_spec(SEED).spec
    again = parse_spec(spec.to_json(reveal_secrets=True)).spec
    assert again == spec


def test_units_are_pinned():
    spec = parse_spec(
        with_changes(**{
            "metadata.memory": 512,
            "metadata.shm_size": 0.5,
            "metadata.rpc": {"keepalive": 5000},
            "features": {"eas.aliyun.com/extra-ephemeral-storage": "100Gi"},
        })
    ).spec
    assert spec.metadata.memory_bytes == 536870912
    assert spec.metadata.shm_bytes == 512 * 1024**2
    assert spec.metadata.request_timeout_s == 5.0
    assert spec.features.disk_limit_bytes == 100 * 1024**3


@pytest.mark.parametrize(
    ("surge", "unavailable", "instances", "expected"),
    [("2%", 0, 2, (1, 0)), ("50%", "50%", 3, (2, 1)), (3, 1, 4, (3, 1)), (0, "25%", 4, (1, 1))],
)
def test_rolling_strategy_counts(surge, unavailable, instances, expected):
    strategy = parse_spec(
        with_changes(**{"metadata.rolling_strategy": {"max_surge": surge, "max_unavailable": unavailable}})
    ).spec.metadata.rolling_strategy
    assert (strategy.surge(instances), strategy.unavailable(instances)) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"containers.0.port": 8080}, "containers[0].port: 8080 is reserved for the serving proxy"),
        ({"containers.0.port": 9090}, "containers[0].port: 9090 is reserved for the admin endpoint"),
        ({"containers.0.comand": "x"}, "containers[0].comand: unknown field; did you mean 'command'?"),
        ({"metadata.name": "Hello World"}, "metadata.name: 'Hello World' is not a valid service name"),
        ({"metadata.instance": -1}, "metadata.instance: Input should be greater than or equal to 0"),
        ({"metadata.memory": "lots"}, "metadata.memory: Input should be a valid integer"),
        ({"metadata.rolling_strategy": {"max_surge": "200%"}}, "metadata.rolling_strategy.max_surge: '200%' is neither"),
        ({"containers.0.script": "echo hi"}, "containers[0]: give command or script, not both"),
        ({"storage.0.mount_path": "data"}, "storage[0].mount_path: 'data' must be an absolute path"),
        ({"storage.0.oss": {"path": "s3://bucket/x"}}, "storage[0].oss.path: 's3://bucket/x' must look like 'oss://bucket/prefix/'"),
        ({"storage.0.nfs": {"server": "n", "path": "/x"}}, "storage[0]: give exactly one of oss, s3, nfs, local or empty_dir (found oss, nfs)"),
        ({"storage.0.oss": {"path": "oss://b/p/", "mode": "cache"}}, "storage[0].oss: mode 'cache' is read-only"),
        ({"containers.0.liveness_check": {"period_seconds": 5}}, "containers[0].liveness_check: give exactly one of http_get, tcp_socket or exec"),
        ({"features": {"ephemeral": "1Gi"}}, "features.ephemeral: unknown field"),
        ({"features": {"eas.aliyun.com/extra-ephemeral-storage": "lots"}}, "features.eas.aliyun.com/extra-ephemeral-storage: 'lots' is not a size"),
        ({"containers.0.env": [{"name": "1BAD", "value": "x"}]}, "containers[0].env[0].name: '1BAD' is not a valid environment variable name"),
    ],
)
def test_malformed_configs_name_the_json_path(changes, expected):
    errors = errors_of(with_changes(**changes))
    assert any(error.startswith(expected) for error in errors), errors


def test_every_error_is_reported_at_once():
    raw = with_changes(**{"containers.0.port": 8080, "metadata.name": "X", "storage.0.mount_path": "rel", "bogus": 1})
    errors = errors_of(raw)
    assert len(errors) == 4
    assert errors[0].startswith("bogus: unknown field; valid fields here: autoscaler, containers, cronscaler, dockerAuth")


def test_missing_parts_and_container_count():
    assert errors_of({"containers": [{"image": "a"}]}) == ["metadata: required field is missing"]
    assert "containers[0].image: required field is missing" in errors_of(with_changes(**{"containers": [{}]}))
    two = with_changes(**{"containers": [SEED["containers"][0], SEED["containers"][0]]})
    assert errors_of(two) == ["containers: berth runs one container per service for now; found 2"]
    assert errors_of("[1, 2]") == ["the spec must be a JSON object, not list"]
    assert errors_of('{"metadata": ') [0].startswith("not valid JSON: Expecting value at line 1")


def test_cluster_only_eas_fields_are_accepted_with_a_warning_each():
    raw = with_changes(**{
        "cloud": {"computing": {"instance_type": "ecs.gn6i"}},
        "metadata.workspace_id": "123",
        "metadata.rpc": {"worker_threads": 4, "max_queue_size": 64},
        "features": {"eas.aliyun.com/gpu-driver-version": "550"},
    })
    parsed = parse_spec(raw)
    paths = sorted(warning.path for warning in parsed.warnings)
    assert paths == [
        "cloud", "features.eas.aliyun.com/gpu-driver-version",
        "metadata.rpc.worker_threads", "metadata.workspace_id",
    ]
    assert parsed.spec.metadata.rpc.max_queue_size == 64


def test_lenient_parsing_warns_about_fields_newer_than_this_berth():
    raw = with_changes(**{"containers.0.future_field": True, "brand_new": {}})
    with pytest.raises(SpecError):
        parse_spec(raw)
    parsed = parse_spec(raw, lenient=True)
    assert sorted(w.path for w in parsed.warnings) == ["brand_new", "containers[0].future_field"]
    assert all("unknown to this version of berth" in w.message for w in parsed.warnings)


def test_secrets_are_redacted_unless_revealed():
    raw = with_changes(**{
        "token": "tok-123456",
        "dockerAuth": "dXNlcjpwYXNz",
        "containers.0.env": [
            {"name": "OSS_ACCESS_KEY_SECRET", "value": "hunter2"},
            {"name": "hf_token", "value": "hf-abc"},
            {"name": "DB_Password", "value": "pw"},
            {"name": "MODEL", "value": "qwen"},
        ],
    })
    spec = parse_spec(raw).spec
    shown = spec.to_json()
    for secret in ("tok-123456", "dXNlcjpwYXNz", "hunter2", "hf-abc", '"pw"'):
        assert secret not in shown
    assert shown.count(REDACTED) == 5 and '"qwen"' in shown
    assert "tok-123456" not in repr(spec) and "tok-123456" not in str(spec)
    revealed = json.loads(spec.to_json(reveal_secrets=True))
    assert revealed["token"] == "tok-123456" and revealed["containers"][0]["env"][0]["value"] == "hunter2"
    bare = spec.to_json_dict(reveal_secrets=True, exclude_secrets=True)
    assert "token" not in bare and "dockerAuth" not in bare


def test_errors_never_echo_secret_values():
    raw = with_changes(**{"token": 12345678, "dockerAuth": ["s3cr3t-auth"]})
    errors = errors_of(raw)
    assert errors and not any("s3cr3t-auth" in error for error in errors)
