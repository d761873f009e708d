"""`berth spec check` as a user runs it: a real process, real files, exit codes 0 and 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def berth(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootstrap.cli", *args], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_check_prints_the_normalized_seed_spec():
    result = berth("spec", "check", "examples/hello.json")
    assert result.returncode == 0, result.stderr
    normalized = json.loads(result.stdout)
    assert normalized["metadata"]["eas"]["termination_grace_period"] == 30
    assert normalized["storage"][0]["mount_path"] == "/mnt/data"
    assert result.stderr == ""


def test_check_lists_every_error_with_its_path_and_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({
        "metadata": {"name": "svc", "workspace_id": "9"},
        "containers": [{"image": "img", "port": 8080, "env": [{"name": "API_TOKEN", "value": "tok-secret-1"}]}],
        "storage": [{"mount_path": "/x", "oss": {"path": "oss://b/p/"}, "local": {"path": "/y"}}],
    }))
    result = berth("spec", "check", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert f"{bad}: 2 error(s):" in lines
    assert "error: containers[0].port: 8080 is reserved for the serving proxy; use another port, e.g. 8000" in lines
    assert "error: storage[0]: give exactly one of oss, s3, nfs, local or empty_dir (found oss, local)" in lines
    assert "warning: metadata.workspace_id: ignored: PAI workspaces does not apply on one node" in lines
    assert "tok-secret-1" not in result.stderr


def test_check_reads_stdin_and_redacts_secrets():
    spec = {"metadata": {"name": "svc"}, "containers": [{"image": "img", "env": [{"name": "OSS_ACCESS_KEY_SECRET", "value": "abc123"}]}], "token": "t0ken-val"}
    result = berth("spec", "check", "-", stdin=json.dumps(spec))
    assert result.returncode == 0, result.stderr
    assert "abc123" not in result.stdout and "t0ken-val" not in result.stdout
    assert json.loads(result.stdout)["token"] == "***"


def test_unreadable_file_and_bad_usage_exit_2(tmp_path: Path):
    missing = berth("spec", "check", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "nope.json" in missing.stderr and "No such file" in missing.stderr
    usage = berth("spec")
    assert usage.returncode == 2
    assert "usage: berth spec" in usage.stderr


def test_help_explains_the_commands():
    result = berth("--help")
    assert result.returncode == 0
    assert "spec" in result.stdout and "Exit codes" in result.stdout
