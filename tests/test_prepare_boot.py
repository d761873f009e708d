"""prepare() through `berth boot`: the prefix is in place before the child runs, timed in /status."""

from __future__ import annotations

import json
from pathlib import Path

from tests.apps.runner import Boot
from tests.prepare_support import FAST, assert_tree, model_tree


def test_berth_boot_mounts_the_cached_prefix_and_reports_the_step(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.new_bucket()
    files = model_tree(tmp_path / "src", big_size=1024 * 1024)
    s3_server.upload_tree(bucket, "model", tmp_path / "src")
    mount = tmp_path / "mnt" / "data"
    spec = {"metadata": {"name": "svc"}, "containers": [{"image": "img"}],
            "storage": [{"mount_path": str(mount), "oss": {"path": f"oss://{bucket}/model/", "readOnly": True}}]}
    boot = Boot(tmp_path, env={**s3_server.env(), **FAST, "BERTH_SPEC": json.dumps(spec)})
    try:
        boot.wait_ready()
        assert_tree(mount, files)
        assert Path(mount.readlink()).is_relative_to(tmp_path / "cache")  # BERTH_CACHE_DIR
        assert f"storage {mount}" in boot.status()["prepare_steps"]
        output = boot.output()
        assert "download oss://" in output
        assert s3_server.secret_key not in output and s3_server.access_key not in output
    finally:
        boot.close()
