"""The agent's pure parts: revision hashing, operator configuration, image names, policy checks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from agent.config import load_config
from agent.launch import build_request, check_policy, confined_path
from agent.pull import decode_auth, resolve
from agent.revision import revision
from bootstrap.errors import UsageError
from bootstrap.spec import parse_spec

BASE = {"metadata": {"name": "svc", "instance": 1}, "containers": [{"image": "reg:5000/app:1", "command": "python app.py"}]}


def spec_of(**changes):
    raw = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        target = raw
        *parents, leaf = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        target[leaf] = value
    return parse_spec(raw).spec


def test_revision_ignores_scaling_and_rollout_but_not_what_the_container_sees():
    base = revision(spec_of())
    assert base.startswith("v1-")
    assert revision(spec_of(**{"metadata.instance": 5})) == base
    assert revision(spec_of(**{"metadata.rolling_strategy": {"max_surge": 3}})) == base
    for change in ({"containers.0.image": "reg:5000/app:2"}, {"containers.0.env": [{"name": "A", "value": "1"}]},
                   {"metadata.memory": 512}, {"metadata.shm_size": 1}, {"token": "secret-token"},
                   {"containers.0.readiness_check": {"http_get": {"path": "/health"}}}):
        assert revision(spec_of(**change)) != base, change


def test_config_layers_file_then_environment_then_flags(tmp_path: Path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"listen": "127.0.0.1:1111", "network": "host", "env": {"A": "file"},
                                "timings": {"backoff_initial_s": 0.5}}))
    config = load_config(path, {"listen": "127.0.0.1:3333", "env": {"B": "flag"}},
                         environ={"BERTH_LISTEN": "127.0.0.1:2222", "BERTH_HOST_IP": "10.0.0.1",
                                  "BERTH_ALLOW_HOST_PATHS": "/data,/models"})
    assert config.listen == "127.0.0.1:3333"
    assert config.network == "host" and config.host_ip == "10.0.0.1"
    assert config.env == {"A": "file", "B": "flag"}
    assert config.allow_host_paths == ["/data", "/models"]
    assert config.timings.backoff_initial_s == 0.5 and config.timings.backoff_max_s == 300


def test_config_errors_name_the_field(tmp_path: Path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"timings": {"backoff_max_s": -1}, "listen": "nowhere"}))
    with pytest.raises(UsageError) as caught:
        load_config(path, {}, environ={})
    message = str(caught.value)
    assert str(path) in message and "timings.backoff_max_s" in message and "listen" in message


@pytest.mark.parametrize("content, expected", [
    (None, "cannot read the agent config: No such file or directory"),
    (b'{"listen": ', "not valid JSON: Expecting value at line 1"),
    (b"[1, 2]", "the agent config must be a JSON object"),
    (b'{"listen": "\xff"}', "not UTF-8 text"),
])
def test_an_unreadable_config_file_is_named_with_what_is_wrong(tmp_path: Path, content: bytes | None, expected: str):
    path = tmp_path / "agent.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError) as caught:
        load_config(path, {}, environ={})
    assert str(caught.value).startswith(f"{path}: {expected}"), caught.value


def test_image_names_resolve_as_docker_does():
    assert str(resolve("python")) == "library/python:latest"
    assert resolve("python").registry == "docker.io"
    ref = resolve("127.0.0.1:5000/team/app:1.0")
    assert (ref.registry, ref.repository, ref.reference) == ("127.0.0.1:5000", "team/app", "1.0")
    assert resolve("reg.example.com/app@sha256:" + "a" * 64).is_digest


def test_docker_auth_is_base64_or_plain():
    encoded = base64.b64encode(b"user:p4ss").decode()
    assert decode_auth(encoded) == {"username": "user", "password": "p4ss"}
    assert decode_auth("user:p4ss") == {"username": "user", "password": "p4ss"}


def test_policy_refuses_host_paths_fuse_gpus_and_port_clashes(tmp_path: Path):
    config = load_config(None, {"state_dir": str(tmp_path), "allow_host_paths": ["/data/models"]}, environ={})
    spec = parse_spec({**BASE, "metadata": {"name": "svc", "instance": 2, "gpu": 1}, "storage": [
        {"mount_path": "/mnt/ok", "local": {"path": "/data/models/llama"}},
        {"mount_path": "/mnt/bad", "local": {"path": "/data/modelsX"}},
        {"mount_path": "/mnt/oss", "oss": {"path": "oss://bucket/x/", "mode": "fuse"}},
    ]}).spec
    issues = {issue.path: issue.message for issue in check_policy(spec, config, host_ports=True,
                                                                  app_ports_in_use={8000: "other"}, gpu_capacity=0)}
    assert set(issues) == {"storage[1].local.path", "storage[2].oss.mode", "metadata.gpu", "containers[0].port"}
    assert "--allow-host-path" in issues["storage[1].local.path"]
    # Two instances on one host: each gets its own port through berth boot (PORT); without it, refused.
    bare = parse_spec({**BASE, "metadata": {"name": "svc", "instance": 2},
                       "containers": [{**BASE["containers"][0], "bootstrap": False}]}).spec
    refused = {issue.path for issue in check_policy(bare, config, host_ports=True, app_ports_in_use={}, gpu_capacity=0)}
    assert refused == {"metadata.instance"}


def test_secrets_reach_the_instance_as_files_never_in_the_spec_env_or_labels(tmp_path: Path):
    config = load_config(None, {"state_dir": str(tmp_path)}, environ={})
    spec = parse_spec({**BASE, "token": "tok-very-secret", "dockerAuth": "dXNlcjpwYXNz"}).spec
    request = build_request(spec, revision(spec), 0, config, gpus=[], host_ports=False)
    assert request.secret_files == {"/run/berth/token": b"tok-very-secret"}
    visible = json.dumps([request.env, request.labels, request.argv])
    assert "tok-very-secret" not in visible and "dXNlcjpwYXNz" not in visible
    assert request.argv == ["berth", "boot", "--", "sh", "-c", "python app.py"]


def test_with_the_gateway_on_instances_drain_1_s_and_later_ones_get_their_own_port(tmp_path: Path):
    spec = spec_of(**{"containers.0.port": 8500})
    on = load_config(None, {"state_dir": str(tmp_path)}, environ={})
    first, second = (build_request(spec, revision(spec), slot, on, gpus=[], host_ports=True) for slot in (0, 1))
    assert first.env["BERTH_DRAIN_DELAY"] == "1"  # the drain order keeps the gateway's clients off; 1 s is for direct ones
    assert "BERTH_PORT" not in first.env  # the first instance keeps the spec's port
    assert int(second.env["BERTH_PORT"]) not in (0, 8500)
    off = load_config(None, {"state_dir": str(tmp_path), "gateway": "off"}, environ={})
    assert "BERTH_DRAIN_DELAY" not in build_request(spec, revision(spec), 0, off, gpus=[], host_ports=False).env  # berth boot's 5 s
    operator = load_config(None, {"state_dir": str(tmp_path), "env": {"BERTH_DRAIN_DELAY": "3"}}, environ={})
    assert build_request(spec, revision(spec), 0, operator, gpus=[], host_ports=False).env["BERTH_DRAIN_DELAY"] == "3"


def test_off_loopback_listening_needs_tls_or_consent(tmp_path: Path):
    for listen in ("127.0.0.1:7070", "[::1]:7070", "localhost:7070", "unix:/run/berth.sock"):
        load_config(None, {"listen": listen}, environ={})
    with pytest.raises(UsageError, match="off loopback without TLS"):
        load_config(None, {"listen": "0.0.0.0:7070"}, environ={})
    with pytest.raises(UsageError, match="off loopback without TLS"):
        load_config(None, {"listen": "agent.example:7070"}, environ={})  # a name may resolve anywhere
    assert load_config(None, {"listen": "0.0.0.0:7070"}, environ={"BERTH_INSECURE_LISTEN": "1"}).insecure_listen
    tls = {"tls_cert": str(tmp_path / "c.pem"), "tls_key": str(tmp_path / "k.pem")}
    assert load_config(None, {"listen": "10.0.0.5:7070", **tls}, environ={}).tls_cert is not None
    with pytest.raises(UsageError, match="give tls_cert and tls_key together"):
        load_config(None, {"tls_cert": tls["tls_cert"]}, environ={})


def test_host_paths_are_confined_after_every_symlink_is_resolved(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "models").mkdir(parents=True)
    outside.mkdir()
    (root / "etc").symlink_to("/etc")
    (root / "inner").symlink_to(root / "models")
    (outside / "back").symlink_to(root / "models")
    (root / "out-and-back").symlink_to(outside / "back")  # leaves the root on the way, ends inside
    assert confined_path(str(root / "models"), [str(root)]) == str((root / "models").resolve())
    assert confined_path(str(root / "inner"), [str(root)]) == str((root / "models").resolve())
    assert confined_path(str(root / "not-yet"), [str(root)]) == str(root.resolve() / "not-yet")
    for escaping in ("etc", "etc/passwd", "out-and-back", "../outside"):
        assert confined_path(f"{root}/{escaping}", [str(root)]) is None, escaping
