"""Host paths and listeners under the Docker runtime (issue 16): bind sources resolved before the
allow-list check and mounted read-only by default; with host networking the instance's proxy and
admin ports bind the agent's host IP. A real agent, the real engine."""

from __future__ import annotations

import psutil
import pytest

from tests.harness.agent import Agent, service_spec, unique

pytestmark = pytest.mark.docker


def test_bind_sources_are_resolved_confined_and_read_only(tmp_path, docker_client, python_inference_image):
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    (allowed / "data" / "model.txt").write_text("weights\n")
    (allowed / "escape").symlink_to("/etc")
    (allowed / "inner").symlink_to(allowed / "data")
    agent = Agent(tmp_path, allow_host_paths=[str(allowed)], network="host").start()
    try:
        name = unique("binds")
        spec = service_spec(name, python_inference_image, command="python3 -m http.server 8000 --bind 127.0.0.1")
        spec["storage"] = [{"mount_path": "/mnt/host-etc", "local": {"path": str(allowed / "escape")}}]
        refused = agent.deploy(spec)
        # A string comparison passed this, and the container read the host's /etc/passwd.
        assert refused.returncode == 2 and "storage[0].local.path" in refused.stderr, refused.stderr
        assert "once symlinks are resolved" in refused.stderr

        spec["storage"] = [{"mount_path": "/mnt/data", "local": {"path": str(allowed / "inner")}}]
        result = agent.deploy(spec, "--wait")
        assert result.returncode == 0, result.stderr
        container = docker_client.containers.get(agent.service(name)["instances"][0]["runtime_id"])
        (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == "/mnt/data"]
        assert mount["Source"] == str((allowed / "data").resolve()) and mount["RW"] is False
        assert container.exec_run(["cat", "/mnt/data/model.txt"]).output == b"weights\n"
        written = container.exec_run(["touch", "/mnt/data/new"])
        assert written.exit_code != 0 and b"Read-only file system" in written.output
        assert not (allowed / "data" / "new").exists()

        labels = container.labels
        ports = {int(labels["berth.admin-port"]), int(labels["berth.proxy-port"])}
        listening = {conn.laddr.ip for conn in psutil.net_connections("tcp")
                     if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports}
        assert listening == {"127.0.0.1"}, listening  # was 0.0.0.0: /status and /metrics open to the network
        assert agent.cli("rm", name).returncode == 0
    finally:
        for svc in agent.api("GET", "/v1/services").json():
            agent.cli("rm", svc["name"])
        agent.stop()
