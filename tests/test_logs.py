"""Log rotation: a chatty container's json-file logs stay under max-size x max-file."""

from __future__ import annotations

import uuid

import pytest

from agent.disk import measure_instance_disk
from agent.logs import log_config, log_files
from tests.harness.parts import wait_until

MAX_SIZE = 64 * 1024
MAX_FILES = 3


def test_rotation_caps_a_chatty_containers_logs(docker_client, base_image: str) -> None:
    # About 2.6 MB of log lines (more as json-file entries): forty times the cap.
    chatty = "for i in $(seq 1 40000); do echo \"line $i of a chatty service\"; done"
    container = docker_client.containers.run(
        base_image, ["sh", "-c", chatty], name=f"berth-test-logs-{uuid.uuid4().hex[:8]}", detach=True,
        log_config=log_config(max_size_bytes=MAX_SIZE, max_files=MAX_FILES),
    )
    try:
        wait_until(lambda: docker_client.api.inspect_container(container.id)["State"]["Status"] == "exited", 60, "the chatty container")
        attrs = docker_client.api.inspect_container(container.id)
        assert attrs["HostConfig"]["LogConfig"] == {
            "Type": "json-file", "Config": {"max-size": str(MAX_SIZE), "max-file": str(MAX_FILES)}
        }
        files = log_files(attrs)
        assert files[0].name == f"{container.id}-json.log"
        assert len(files) == MAX_FILES  # rotated, and no more files than allowed
        on_disk = sum(path.stat().st_size for path in files)
        assert on_disk <= MAX_FILES * (MAX_SIZE + 4096)  # a rotation happens after the line that crosses it
        assert measure_instance_disk(docker_client, container.id).logs <= MAX_FILES * (MAX_SIZE + 8192)
        assert container.logs(tail=1).strip() == b"line 40000 of a chatty service"  # the newest lines survive
    finally:
        container.remove(force=True)


def test_bad_rotation_settings_name_the_setting() -> None:
    with pytest.raises(ValueError, match="log_max_size"):
        log_config(max_size_bytes=0)
    with pytest.raises(ValueError, match="log_max_files"):
        log_config(max_files=0)
