"""The agent under faults, with real parts: idle log followers, the state database, disk full,
half-made virtualenvs, `deploy --wait` of zero instances. The process runtime runs the
instances (real `berth boot` process groups); no engine is needed."""

from __future__ import annotations

import json
import signal
import threading
import time

import psutil
import requests

from tests.harness.agent import TIMINGS, Agent, unique, wait_state
from tests.harness.parts import free_port, wait_until


def http_service(name: str, port: int | None = None, **metadata) -> dict:
    port = port or free_port()
    return {"metadata": {"name": name, "eas": {"termination_grace_period": 5}, **metadata},
            "containers": [{"image": "ignored", "command": f"python3 -m http.server {port} --bind 127.0.0.1", "port": port}]}


def test_twenty_idle_log_followers_starve_nothing_and_the_agent_exits_within_2_s(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name = unique("quiet")
    followers: list[requests.Response] = []
    try:
        assert agent.deploy(http_service(name), "--wait").returncode == 0
        token = (agent.state_dir / "token").read_text().strip()
        for _ in range(20):
            response = requests.get(f"{agent.url}/v1/services/{name}/logs?follow=true", stream=True, timeout=10,
                                    headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            followers.append(response)
        started = time.monotonic()
        node = agent.cli("node", "--json")
        assert node.returncode == 0, node.stderr
        second = agent.deploy(http_service(unique("beside")), "--wait", "--timeout", "60")
        assert second.returncode == 0, second.stderr
        assert time.monotonic() - started < 30
        agent.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        agent.process.wait(timeout=20)
        assert time.monotonic() - stopped < 2.0, "the agent took more than 2 s to exit with 20 idle followers"
    finally:
        for response in followers:
            response.close()
        _remove_everything(agent)


def _remove_everything(agent: Agent) -> None:
    """Start the agent again if needed, remove every service, stop it."""
    if agent.process.poll() is not None:
        agent.start("--recover-from-runtime")
    try:
        for svc in agent.api("GET", "/v1/services").json():
            agent.cli("rm", svc["name"])
    finally:
        agent.stop()


def _boot_pid(agent: Agent, name: str) -> int:
    (record,) = [path for path in (agent.state_dir / "processes").glob(f"berth-{name}-0-*.json")
                 if not path.name.endswith(".status.json")]
    return json.loads(record.read_text())["pid"]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_lost_or_damaged_state_database_stops_the_agent_touching_nothing_until_recovered(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name = unique("keep")
    try:
        assert agent.deploy(http_service(name), "--wait").returncode == 0
        pid = _boot_pid(agent, name)
        agent.stop()
        database = agent.state_dir / "state.db"
        kept = database.read_bytes()
        for damage, expected in (
            (lambda: None, "is missing, but 1 instance(s) of this agent exist"),
            (lambda: database.write_bytes(b"this is not a database" * 100), "is unreadable or corrupt"),
            (lambda: database.mkdir(), "cannot read the state database"),
        ):
            for side in ("-wal", "-shm"):
                (agent.state_dir / f"state.db{side}").unlink(missing_ok=True)
            database.unlink()
            damage()
            result = agent.cli("agent", "--config", str(agent.config_path))
            assert result.returncode == 1, result.stderr
            assert str(database) in result.stderr and expected in result.stderr
            assert "--recover-from-runtime" in result.stderr
            assert _running(pid), "an instance was touched"
            if database.is_dir():
                database.rmdir()
            database.write_bytes(b"garbage")  # the next damage starts from a file
        database.unlink()
        database.write_bytes(b"corrupt again")
        agent.start("--recover-from-runtime")
        recovered = wait_state(agent, name, lambda s: s["ready"] == 1, 30, "recovered and adopted")
        assert recovered["instances"][0]["restarts"] == 0 and _boot_pid(agent, name) == pid and _running(pid)
        assert list(agent.state_dir.glob("state.db.damaged-*")), "the damaged database was not kept aside"
        assert kept  # the original was a real database
    finally:
        _remove_everything(agent)


def test_deploy_wait_of_zero_instances_returns_at_once(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    try:
        started = time.monotonic()
        result = agent.deploy(http_service(unique("none"), instance=0), "--wait", "--timeout", "30")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 10 and "0/0 ready" in result.stderr
    finally:
        _remove_everything(agent)


class SmallDisk:
    """A tmpfs of `size` mounted at `path` for one test (root only), removed afterwards."""

    def __init__(self, path, size: str) -> None:
        import subprocess

        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            from tests.harness.parts import unavailable

            unavailable("a tmpfs mount (root)", result.stderr.strip())
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remove(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.path)], check=False)


def test_state_disk_full_answers_json_keeps_instances_supervised_and_removal_finishes_when_space_returns(tmp_path):
    disk = SmallDisk(tmp_path / "state", "8m")
    agent = Agent(tmp_path, runtime="process").start()
    kept, removed = unique("kept"), unique("gone")
    try:
        assert agent.deploy(http_service(kept), "--wait").returncode == 0
        assert agent.deploy(http_service(removed), "--wait").returncode == 0
        removed_pid = _boot_pid(agent, removed)
        disk.fill()
        refused = agent.api("POST", "/v1/services", data=json.dumps(http_service(unique("late"))))
        assert refused.status_code == 507, refused.text
        assert "the state directory's disk is full" in refused.json()["detail"] and "bytes free on" in refused.json()["detail"]
        cli = agent.deploy(http_service(unique("late")))
        assert cli.returncode == 1 and "disk is full" in cli.stderr
        rm = agent.api("DELETE", f"/v1/services/{removed}")
        assert rm.status_code in (202, 507), rm.text
        if rm.status_code == 507:
            assert "disk is full" in rm.json()["detail"]
        time.sleep(2)  # several probe periods on a full disk
        assert agent.service(kept)["instances"][0]["state"] == "Ready"
        disk.free()
        if rm.status_code == 507:
            assert agent.api("DELETE", f"/v1/services/{removed}").status_code == 202
        wait_until(lambda: agent.api("GET", f"/v1/services/{removed}").status_code == 404, 30, "removal after space returned")
        assert not _running(removed_pid)
        assert agent.service(kept)["instances"][0]["state"] == "Ready"
    finally:
        disk.free()
        _remove_everything(agent)
        disk.remove()


def test_a_half_made_virtualenv_is_made_again_and_rm_removes_what_deploy_made(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    agent = Agent(tmp_path, runtime="process", allow_host_paths=[str(shared)],
                  process_mount_roots=[str(tmp_path / "mounts"), str(tmp_path / "scratch")])
    name = unique("venv")
    link = tmp_path / "mounts" / name / "data"
    scratch = tmp_path / "scratch" / name / "tmp"
    spec = http_service(name)
    spec["storage"] = [{"mount_path": str(link), "local": {"path": str(shared)}},
                       {"mount_path": str(scratch), "empty_dir": {}}]
    # What a kill (or a full disk) while the virtualenv was made leaves: bin/python, no berth .pth.
    half = agent.state_dir / "venvs" / name
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "python").symlink_to(psutil.Process().exe())
    agent.start()
    try:
        result = agent.deploy(spec, "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stderr
        assert list(half.glob("lib/python*/site-packages/berth-agent.pth"))
        assert link.is_symlink() and scratch.is_dir()
        assert list((agent.state_dir / "logs").glob(f"berth-{name}-*.log"))
        assert agent.cli("rm", name).returncode == 0
        assert not half.exists(), "rm left the service's virtualenv"
        assert not list((agent.state_dir / "logs").glob(f"berth-{name}-*")), "rm left its logs"
        assert not link.is_symlink() and not scratch.exists(), "rm left the host link or directory it made"
        assert shared.is_dir(), "rm must never remove a host path it did not make"
        assert not list((agent.state_dir / "venvs").glob(".*building*"))
    finally:
        _remove_everything(agent)


def test_process_runtime_logs_rotate_like_json_file(tmp_path):
    max_size, max_files = 64 * 1024, 3
    agent = Agent(tmp_path, runtime="process", log_max_size_bytes=max_size, log_max_files=max_files).start()
    name = unique("chatty")
    port = free_port()
    # About 2 MB of output, paced so rotation keeps up, then it serves.
    chatty = ("python3 -c \"import time\nfor i in range(1, 40001):\n    print(f'line {i} of a chatty service', flush=True)\n"
              "    i % 2000 or time.sleep(0.3)\" && exec python3 -m http.server " + f"{port} --bind 127.0.0.1")
    spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 5}},
            "containers": [{"image": "ignored", "command": chatty, "port": port}]}
    try:
        assert agent.deploy(spec, "--wait", "--timeout", "120").returncode == 0
        files = sorted((agent.state_dir / "logs").glob(f"berth-{name}-*.log*"))
        assert len(files) == max_files, files  # rotated, no more files than allowed
        assert sum(path.stat().st_size for path in files) <= max_files * max_size * 2
        logs = agent.cli("logs", name, "--tail", str(2000 * max_files)).stdout
        assert "line 40000 of a chatty service" in logs
    finally:
        _remove_everything(agent)


def test_a_state_database_deleted_under_the_running_agent_is_written_back(tmp_path):
    agent = Agent(tmp_path, runtime="process", timings={**TIMINGS, "state_check_period_s": 0.5}).start()
    name = unique("kept")
    try:
        assert agent.deploy(http_service(name), "--wait").returncode == 0
        pid = _boot_pid(agent, name)
        for suffix in ("", "-wal", "-shm"):
            (agent.state_dir / f"state.db{suffix}").unlink(missing_ok=True)
        wait_until(lambda: (agent.state_dir / "state.db").exists(), 10, "the database written back")
        agent.stop()
        agent.start()  # the next start finds the service and adopts its instance
        after = wait_state(agent, name, lambda s: s["ready"] == 1, 30, "adopted after the restart")
        assert after["instances"][0]["restarts"] == 0 and _boot_pid(agent, name) == pid and _running(pid)
    finally:
        _remove_everything(agent)
