"""The fault matrix (docs/reliability.md), one test per row, with real parts: the S3 server,
a filesystem that fills, real `berth agent` and `berth boot` processes, the registry.
The state database rows are in tests/test_reliability_agent.py."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bootstrap.prepare import PrepareError
from tests.harness.agent import Agent, unique, wait_state
from tests.harness.parts import free_port, unavailable, wait_until
from tests.prepare_support import assert_tree, endpoint_env, model_tree, object_spec, run_prepare


@pytest.fixture
def model(s3_server, tmp_path: Path):
    bucket = s3_server.new_bucket()
    files = model_tree(tmp_path / "src")
    s3_server.upload_tree(bucket, "model", tmp_path / "src")
    return f"s3://{bucket}/model/", files


def _visible(cache: Path) -> list[Path]:
    """What a service could see of the cache: built trees' files (not staging, locks or leases)."""
    return [path for path in cache.rglob("trees/*/**/*") if path.is_file()]


def test_s3_endpoint_down_at_prepare_retries_names_the_endpoint_and_leaves_nothing_half_made(
        model, s3_server, fault_proxy, tmp_path: Path):
    url, files = model
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = fault_proxy(host, int(port))
    proxy.faults.refuse = True
    env = endpoint_env(s3_server.env(), proxy.endpoint)
    started = time.monotonic()
    with pytest.raises(PrepareError, match=rf"after 3 tries: .* from {proxy.endpoint}"):
        run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)
    assert time.monotonic() - started > 0.04  # backed off between tries
    assert proxy.connections == 0 and not _visible(tmp_path / "cache") and not (tmp_path / "mnt").exists()
    proxy.faults.refuse = False
    run_prepare(object_spec(url, tmp_path / "mnt"), tmp_path / "cache", env)
    assert_tree(tmp_path / "mnt", files)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs made for the test and removed after it."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable("a tmpfs mount (root)", made.stderr.strip())
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_node_cache_disk_full_names_the_directory_and_bytes_needed_and_harms_no_one(
        model, s3_server, small_disk: Path, tmp_path: Path):
    url, _ = model
    cache = small_disk / "cache"
    small = s3_server.new_bucket()
    small_files = model_tree(tmp_path / "small-src", big_size=100_000)
    s3_server.upload_tree(small, "model", tmp_path / "small-src")
    # Another service's model is in the cache already and must stay whole.
    run_prepare(object_spec(f"s3://{small}/model/", tmp_path / "other", name="other"), cache, s3_server.env())
    with pytest.raises(PrepareError, match=rf"the node cache {cache} needs \d+ bytes .* for {url}, and its disk has \d+ bytes"):
        run_prepare(object_spec(url, tmp_path / "mnt"), cache, s3_server.env())
    assert not list(cache.rglob("*.partial")), "a download began on a disk that could not hold it"
    assert_tree(tmp_path / "other", small_files)
    run_prepare(object_spec(f"s3://{small}/model/", tmp_path / "other-again", name="other"), cache, s3_server.env())
    assert_tree(tmp_path / "other-again", small_files)


# --- the agent's lifecycle, under the process runtime (real `berth boot` process groups) ------

def _service_processes(name: str) -> list:
    """Live processes of any instance of `name` (their environment carries its spec)."""
    import psutil

    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if f'"name": "{name}"'.encode() in Path(f"/proc/{process.pid}/environ").read_bytes():
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def _versioned(name: str, port: int, version: str, start_delay: float = 0) -> dict:
    command = f"sleep {start_delay}; exec python3 -m http.server {port} --bind 127.0.0.1"
    return {"metadata": {"name": name, "eas": {"termination_grace_period": 6}},
            "containers": [{"image": "ignored", "command": command, "port": port,
                            "env": [{"name": "VERSION", "value": version}]}]}


def test_a_child_that_ignores_sigterm_is_killed_at_the_stop_timeout_and_its_exit_code_reported(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name, port = unique("deaf"), free_port()
    spec = _versioned(name, port, "1")
    spec["containers"][0]["command"] = f"trap '' TERM; exec python3 -m http.server {port} --bind 127.0.0.1"
    try:
        assert agent.deploy(spec, "--wait").returncode == 0
        started = time.monotonic()
        assert agent.cli("rm", name).returncode == 0
        took = time.monotonic() - started
        assert took < 6 + 3, f"rm took {took:.1f} s, past the grace period"
        events = [json.loads(line) for line in agent.api("GET", f"/v1/events?service={name}&follow=false").text.splitlines()]
        stopped = next(event for event in events if event["kind"] == "Stopped")
        assert "exit code 137" in stopped["message"], stopped  # 128 + SIGKILL, as a shell reports it
        assert not _service_processes(name)
    finally:
        agent.stop()


def test_agent_kill9_mid_rollout_resumes_after_restart_without_duplicates_or_orphans(tmp_path):
    agent = Agent(tmp_path, runtime="process").start()
    name, port = unique("roll"), free_port()
    try:
        assert agent.deploy(_versioned(name, port, "1"), "--wait").returncode == 0
        update = agent.api("PUT", f"/v1/services/{name}", data=json.dumps(_versioned(name, port, "2", start_delay=3)))
        assert update.status_code == 202, update.text
        # Killed once the new revision's process runs and is being probed (its record written).
        wait_state(agent, name, lambda s: any(i["revision"] == s["revision"] and i["reason"] == "waiting for /ready"
                                              for i in s["instances"]), 60, "the new revision starting")
        agent.kill9()
        agent.start()
        # Resumed: every instance on the new revision and Ready, no rollout left under way (a
        # restarted agent may find the new instance already running and simply adopt it).
        done = wait_state(agent, name, lambda s: s["ready"] == 1 and (s["rollout"] or {}).get("state") in (None, "Complete")
                          and all(i["revision"] == s["revision"] for i in s["instances"]), 120, "the rollout resumed")
        assert [inst["revision"] for inst in done["instances"]] == [done["revision"]]
        def apps() -> list:
            return [p for p in _service_processes(name) if p.cmdline()[1:3] == ["-m", "http.server"]]

        wait_until(lambda: len(apps()) == 1, 30, "exactly one app process")
        boots = [p for p in _service_processes(name) if "bootstrap.cli" in " ".join(p.cmdline())]
        assert len(boots) == 1, [p.cmdline() for p in boots]
        apps = apps()
        assert b"VERSION=2\0" in Path(f"/proc/{apps[0].pid}/environ").read_bytes()
        records = [path for path in (agent.state_dir / "processes").glob(f"berth-{name}-*.json")
                   if not path.name.endswith(".status.json")]
        assert len(records) == 1, records
    finally:
        agent.cli("rm", name)
        agent.stop()


# --- the image registry, through the Docker engine ---------------------------------------------

@pytest.mark.docker
def test_registry_down_during_a_pull_backs_off_naming_the_pull_then_pulls_when_it_is_back(
        tmp_path, docker_client, registry, python_inference_image, fault_proxy):
    path = f"berth-test/down-{uuid.uuid4().hex[:6]}"
    docker_client.images.get(python_inference_image).tag(f"{registry}/{path}", "1")
    docker_client.images.push(f"{registry}/{path}", "1")
    docker_client.images.remove(f"{registry}/{path}:1")
    host, port = registry.split(":")
    proxy = fault_proxy(host, int(port))
    proxy.faults.refuse = True
    image = f"127.0.0.1:{proxy.port}/{path}:1"
    agent = Agent(tmp_path).start()
    name = unique("pull")
    try:
        spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 5}},
                "containers": [{"image": image, "command": "python3 -m http.server 8000"}]}
        assert agent.deploy(spec).returncode == 0
        down = wait_state(agent, name, lambda s: s["instances"][0]["state"] == "BackOff", 60, "BackOff on the pull")
        reason = down["instances"][0]["reason"]
        assert "ErrImagePull" in reason and image in reason, reason
        proxy.faults.refuse = False
        wait_state(agent, name, lambda s: s["ready"] == 1, 90, "Ready once the registry is back")
    finally:
        agent.remove_all(docker_client)
        agent.stop()
        for tag in (image, f"{registry}/{path}:1"):
            try:
                docker_client.images.remove(tag)
            except Exception:  # noqa: BLE001 - absent already
                pass


# --- dockerd restarted under the agent: a second engine of the test's own, never the suite's ----

class OwnEngine:
    """A dockerd of this test's own: its socket, data root, exec root and pidfile under one short
    directory, a bridge of its own and no iptables rules (instances use the host network).
    Stopped by its PID; the bridge and the directory (and anything mounted under it) removed at
    the end. Never `--bridge none`: dockerd then deletes docker0, the suite engine's bridge."""

    def __init__(self) -> None:
        import shutil
        import tempfile

        if shutil.which("dockerd") is None:
            unavailable("dockerd", "not installed (apt-get install docker.io)")
        self.root = Path(tempfile.mkdtemp(prefix="bdd-", dir="/tmp"))  # short: containerd's socket path has a limit
        self.socket = self.root / "d.sock"
        self.process: subprocess.Popen | None = None
        self.bridge = "bdd" + uuid.uuid4().hex[:8]
        subnet = 100 + uuid.uuid4().int % 150
        for command in (["ip", "link", "add", self.bridge, "type", "bridge"],
                        ["ip", "addr", "add", f"10.213.{subnet}.1/24", "dev", self.bridge]):
            made = subprocess.run(command, capture_output=True, text=True)
            if made.returncode != 0:
                self.remove()
                unavailable("a bridge of the test's own (root)", made.stderr.strip())

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> "docker.DockerClient":  # noqa: F821
        import docker

        log = open(self.root / "dockerd.log", "ab")
        self.process = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "x"),
             "--pidfile", str(self.root / "d.pid"), "--bridge", self.bridge, "--iptables=false", "--ip6tables=false",
             "--ip-forward=false", "--ip-masq=false"],
            stdout=log, stderr=log, start_new_session=True)
        clients = []

        def answers() -> bool:
            try:
                clients.append(docker.DockerClient(base_url=self.host, timeout=120))
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return self.process.poll() is not None

        wait_until(answers, 60, "the test's own dockerd")
        assert self.process.poll() is None and clients, (self.root / "dockerd.log").read_text()[-2000:]
        return clients[-1]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        import shutil

        self.stop()
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


@pytest.mark.docker
def test_dockerd_restarted_under_running_instances_restores_each_services_count_without_duplicates(
        tmp_path, docker_client, registry, python_inference_image):
    bridges_before = Path("/sys/class/net/docker0").exists()
    path = f"berth-test/engine-{uuid.uuid4().hex[:6]}"
    image = f"{registry}/{path}:1"
    docker_client.images.get(python_inference_image).tag(f"{registry}/{path}", "1")
    docker_client.images.push(f"{registry}/{path}", "1")
    docker_client.images.remove(image)
    engine = OwnEngine()
    agent = None
    try:
        own = engine.start()
        own.images.pull(f"{registry}/{path}", "1")
        agent = Agent(tmp_path, network="host").start(env={"DOCKER_HOST": engine.host})
        names = [unique("eng"), unique("eng")]
        for name in names:
            port = free_port()
            spec = {"metadata": {"name": name, "eas": {"termination_grace_period": 5}},
                    "containers": [{"image": image, "port": port,
                                    "command": f"python3 -m http.server {port} --bind 127.0.0.1"}]}
            result = agent.deploy(spec, "--wait", "--timeout", "120")
            assert result.returncode == 0, result.stderr
        before = {name: agent.service(name)["instances"][0]["runtime_id"] for name in names}

        engine.stop()  # no live-restore: its containers die with it
        own = engine.start()
        back = time.monotonic()
        for name in names:
            wait_state(agent, name, lambda s: s["instances"][0]["runtime_id"] != before[name] or not s["instances"][0]["ready"],
                       5, "the agent noticing the restart within 5 s")
        for name in names:
            wait_state(agent, name, lambda s: s["ready"] == 1, 90, "the service restored")
        assert time.monotonic() - back < 90
        for name in names:
            running = own.containers.list(filters={"label": f"berth.service={name}", "status": "running"})
            assert len(running) == 1, f"{name}: {len(running)} running instances"
            assert agent.service(name)["instances"][0]["state"] == "Ready"
    finally:
        if agent is not None:
            try:
                agent.remove_all(docker_client)
            finally:
                agent.stop()
        engine.remove()
        try:
            docker_client.images.remove(image)
        except Exception:  # noqa: BLE001 - absent already
            pass
    assert Path("/sys/class/net/docker0").exists() or not bridges_before, "the suite engine's bridge was touched"
