"""Hostile and careless spec input (issue 16): each input here once escaped validation (a 500,
a traceback, or a spec that deployed anyway). Each is now refused by its JSON path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bootstrap.spec import SpecError, parse_spec
from tests.test_spec import SEED, with_changes

REPO = Path(__file__).resolve().parents[1]


def errors_of(raw) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return [str(issue) for issue in caught.value.issues]


def seed_text(**replace: str) -> str:
    """The seed as JSON text with raw JSON spliced in: `metadata.cpu='1e999'` gives `"cpu": 1e999`."""
    spec = copy.deepcopy(SEED)
    markers = {}
    for index, dotted in enumerate(replace):
        marker = f"@@{index}@@"
        markers[f'"{marker}"'] = replace[dotted]
        spec = with_changes_on(spec, dotted, marker)
    text = json.dumps(spec)
    for marker, raw in markers.items():
        text = text.replace(marker, raw)
    return text


def with_changes_on(spec: dict, dotted: str, value) -> dict:
    node = spec
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(leaf) if leaf.isdigit() else leaf] = value
    return spec


@pytest.mark.parametrize(("where", "literal", "expected"), [
    ("metadata.cpu", "1e999", "metadata.cpu: the number is too large (infinite once read)"),
    ("metadata.shm_size", "Infinity", "metadata.shm_size: Infinity is not a number JSON allows"),
    ("metadata.memory", "NaN", "metadata.memory: NaN is not a number JSON allows"),
    ("containers.0.env", '[{"name": "X", "value": -Infinity}]', "containers[0].env[0].value: -Infinity is not a number"),
])
def test_nan_and_infinities_are_refused_by_name(where, literal, expected):
    errors = errors_of(seed_text(**{where: literal}))
    assert any(error.startswith(expected) for error in errors), errors


@pytest.mark.parametrize(("changes", "expected"), [
    ({"metadata.memory": 10**18}, "metadata.memory: Input should be less than or equal to 16777216"),
    ({"metadata.eas": {"termination_grace_period": 10**12}},
     "metadata.eas.termination_grace_period: Input should be less than or equal to 86400"),
    ({"metadata.cpu": 1e300}, "metadata.cpu: Input should be less than or equal to 1024"),
    ({"metadata.instance": 10**9}, "metadata.instance: Input should be less than or equal to 1000"),
    ({"metadata.gpu": 4096}, "metadata.gpu: Input should be less than or equal to 64"),
    ({"containers.0.readiness_check": {"tcp_socket": {}, "period_seconds": 1e15}},
     "containers[0].readiness_check.period_seconds: Input should be less than or equal to 86400"),
    ({"features": {"eas.aliyun.com/extra-ephemeral-storage": "9" * 400}},
     "features.eas.aliyun.com/extra-ephemeral-storage: " + "9" * 64 + " is too large: at most 1Pi"),
    ({"storage.0": {"mount_path": "/scratch", "empty_dir": {"size_limit": "2Ei"}}},
     "storage[0].empty_dir.size_limit: 2Ei is too large: at most 1Pi"),
])
def test_upper_bounds_are_stated_in_the_error(changes, expected):
    errors = errors_of(with_changes(**changes))
    assert any(error.startswith(expected) for error in errors), errors


def test_deep_nesting_is_refused_without_a_recursion_error():
    deep = '{"metadata": {"name": "x"}, "containers": [{"image": "i"}], "labels": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert errors_of(deep) == ["nested too deeply; a spec nests at most 32 levels"]
    # Deep enough to pass the decoder, still too deep for a spec.
    errors = errors_of(seed_text(**{"metadata.rpc": "[" * 40 + "]" * 40}))
    assert errors == ["metadata.rpc" + "[0]" * 31 + ": nested too deeply; a spec nests at most 32 levels"]


def test_only_utf8_is_read_and_the_api_decoder_is_the_files_decoder(tmp_path):
    text = seed_text()
    utf16 = text.encode("utf-16")
    # The API once accepted UTF-16 (json.loads guesses encodings of bytes) that `spec check` refused.
    assert errors_of(utf16) == ["not UTF-8 (byte 0xff at offset 0); save the spec as UTF-8, JSON's encoding"]
    latin1 = text.replace("hello", "h\u00e9llo").encode("latin-1")
    assert errors_of(latin1)[0].startswith("not UTF-8 (byte 0xe9 at offset")
    spec_file = tmp_path / "utf16.json"
    spec_file.write_bytes(utf16)
    check = subprocess.run([sys.executable, "-m", "bootstrap.cli", "spec", "check", str(spec_file)], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
    assert check.returncode == 2 and "Traceback" not in check.stderr
    assert "error: not UTF-8 (byte 0xff at offset 0)" in check.stderr


@pytest.mark.parametrize(("changes", "expected"), [
    ({"containers.0.env": [{"name": "A", "value": "x\x00y"}]}, "containers[0].env[0].value: holds a NUL byte"),
    ({"containers.0.command": "python\x00 app.py"}, "containers[0].command: holds a NUL byte"),
    ({"storage.0.mount_path": "/mnt/da\x00ta"}, "storage[0].mount_path: holds a NUL byte"),
    ({"containers.0.env": [{"name": "A", "value": "x\nB=y"}]}, "containers[0].env[0].value: the value holds a line break"),
    ({"containers.0.env": [{"name": "A", "value": "x\r"}]}, "containers[0].env[0].value: the value holds a line break"),
    ({"containers.0.readiness_check": {"http_get": {"path": "/health HTTP/1.1\r\nHost: x\r\n\r\nGET /admin"}}},
     "containers[0].readiness_check.http_get.path: '/health HTTP/1.1\\r\\nHost"),
])
def test_nul_bytes_line_breaks_and_crlf_injection_are_refused(changes, expected):
    errors = errors_of(with_changes(**changes))
    assert any(error.startswith(expected) for error in errors), errors


def test_a_secret_value_with_a_line_break_is_not_echoed():
    errors = errors_of(with_changes(**{"containers.0.env": [{"name": "DB_PASSWORD", "value": "hunter2\n"}]}))
    assert errors and not any("hunter2" in error for error in errors)


def test_duplicate_keys_are_refused_not_last_one_wins():
    text = '{"metadata": {"name": "svc", "instance": 1, "instance": 50}, "containers": [{"image": "a", "image": "b"}]}'
    assert sorted(errors_of(text)) == [
        "containers[0].image: given more than once; keep one (each reader would see a different one)",
        "metadata.instance: given more than once; keep one (each reader would see a different one)",
    ]


@pytest.mark.parametrize(("mount_path", "expected"), [
    ("//", "is not normalised"),
    ("/mnt//data", "is not normalised"),
    ("/mnt/./data", "is not normalised"),
    ("/etc", "is (or is under) the system directory /etc"),
    ("/proc/self", "is (or is under) the system directory /proc"),
    ("/lib64", "the system directory /lib64"),
    ("/var/lib/docker/volumes", "the system directory /var/lib/docker"),
    ("/run", "the system directory /run"),
])
def test_mount_paths_are_normalised_and_keep_off_system_directories(mount_path, expected):
    errors = errors_of(with_changes(**{"storage.0.mount_path": mount_path}))
    assert any(error.startswith("storage[0].mount_path: ") and expected in error for error in errors), errors


def test_mount_paths_that_stay_accepted():
    for path, normalised in (("/mnt/data/", "/mnt/data"), ("/home/admin/model", "/home/admin/model"),
                             ("/library", "/library"), ("/etcetera", "/etcetera")):
        assert parse_spec(with_changes(**{"storage.0.mount_path": path})).spec.storage[0].mount_path == normalised


def test_local_mounts_are_read_only_unless_the_spec_says_otherwise():
    local = {"mount_path": "/data", "local": {"path": "/srv/data"}}
    assert parse_spec(with_changes(**{"storage": [local]})).spec.storage[0].local.read_only is True
    writable = {"mount_path": "/data", "local": {"path": "/srv/data", "readOnly": False}}
    assert parse_spec(with_changes(**{"storage": [writable]})).spec.storage[0].local.read_only is False


@pytest.mark.parametrize("name", ["BERTH_MAX_BODY", "BERTH_SERVICE_TOKEN", "berth_spec"])
def test_berth_variables_are_refused_in_a_spec(name):
    errors = errors_of(with_changes(**{"containers.0.env": [{"name": name, "value": "bogus"}]}))
    assert errors == [f"containers[0].env[0].name: {name}: BERTH_* variables are berth's own settings, set by the agent "
                      "and its operator; a spec cannot set them (use the spec's fields, or ask the operator for env_for "
                      "in the agent config)"]


def test_older_eas_configs_name_the_service_at_the_top_level():
    older = {"name": "qwen", "containers": [{"image": "registry/qwen:1", "port": 8000}], "metadata": {"instance": 1}}
    spec = parse_spec(older).spec
    assert spec.name == "qwen" and "name" not in spec.to_json_dict()
    assert parse_spec({"name": "qwen", "containers": [{"image": "i"}]}).spec.name == "qwen"
    assert parse_spec({**older, "metadata": {"name": "qwen"}}).spec.name == "qwen"
    assert errors_of({**older, "metadata": {"name": "other"}}) == [
        "name: 'qwen' differs from metadata.name 'other'; give one name (metadata.name in current EAS configs)"]


def test_spec_check_exits_2_without_a_traceback_on_each_hostile_input(tmp_path):
    for index, text in enumerate((seed_text(**{"metadata.cpu": "1e999"}), "[" * 100_000,
                                  seed_text(**{"features": '{"eas.aliyun.com/extra-ephemeral-storage": "' + "9" * 400 + '"}'}))):
        path = tmp_path / f"bad{index}.json"
        path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "bootstrap.cli", "spec", "check", str(path)], capture_output=True,
                                text=True, cwd=REPO, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr and "error: " in result.stderr, result.stderr
