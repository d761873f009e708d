"""GPU sharing by memory without a GPU: the spec fields, best-fit packing and its checkpoint,
the launch (environment, labels, MPS), the vLLM flag, one vLLM start at a time, and the soft
memory watch. The GPUs are the recorded inventory (tests/data/gpu-inventory.json: four H100s);
NVML's process list is recorded the same way. The end-to-end test runs a real agent with the
process runtime. What needs a real GPU is in tests/test_gpu_share_device.py (marker `gpu`).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from agent import launch
from agent.config import AgentConfig
from agent.gpu_share import (
    GPU_MEMORY_EXCEEDED,
    MemoryWatch,
    Mps,
    Placement,
    StartQueue,
    detect_mps,
    enforcement_note,
    is_vllm,
    share_issues,
    used_by_instance,
)
from agent.gpus import CHECKPOINT_VERSION, Gpu, GpuAllocator, GpuProcess, GpuRequestRefused, GpuShare, GpusPending, RecordedInventory
from agent.runtime import LABEL_GPU_MEMORY, LABEL_GPUS
from bootstrap.errors import CommandFailed
from bootstrap.spec import SpecError, parse_spec
from serving.vllm import VllmCommand, engine_argv, share_fraction

RECORDED = Path(__file__).parent / "data" / "gpu-inventory.json"
UUIDS = [gpu["uuid"] for gpu in json.loads(RECORDED.read_text())["gpus"]]
GIB = 2**30
TOTAL = 85520809984  # one H100 80GB: 79.6 GiB


def spec(**metadata) -> dict:
    return {"metadata": {"name": "small", **metadata}, "containers": [{"image": "python:3.11", "command": "python app.py"}]}


def errors_of(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return [str(issue) for issue in caught.value.issues]


@pytest.fixture
def allocator(tmp_path: Path) -> GpuAllocator:
    return GpuAllocator(RecordedInventory(RECORDED), tmp_path / "gpu-checkpoint.json")


# --- the spec ---------------------------------------------------------------------------------


def test_the_share_fields_are_accepted_in_gib_without_a_warning() -> None:
    parsed = parse_spec(spec(gpu_memory=20, gpu_core_percentage=30))
    assert parsed.warnings == []
    metadata = parsed.spec.metadata
    assert metadata.gpu == 0 and metadata.gpu_memory_bytes == 20 * GIB and metadata.gpu_core_percentage == 30
    assert parse_spec(spec(gpu_memory=0.5)).spec.metadata.gpu_memory_bytes == GIB // 2


def test_a_share_with_whole_gpus_is_an_error_naming_the_fields() -> None:
    # EAS ignores gpu_memory when gpu > 0; a config that passed berth before now fails.
    (error,) = errors_of(spec(gpu=1, gpu_memory=20))
    assert error.startswith("metadata: gpu_memory ask for a share of one GPU, gpu = 1 for whole GPUs")
    (error,) = errors_of(spec(gpu=2, gpu_memory=20, gpu_core_percentage=50))
    assert "gpu_memory and gpu_core_percentage" in error and "gpu = 2" in error


def test_core_percentage_needs_gpu_memory_and_lies_in_1_to_100() -> None:
    assert errors_of(spec(gpu_core_percentage=50)) == [
        "metadata: gpu_core_percentage needs gpu_memory (the share of one GPU it applies to)"]
    assert errors_of(spec(gpu_memory=8, gpu_core_percentage=0))[0].startswith("metadata.gpu_core_percentage:")
    assert errors_of(spec(gpu_memory=8, gpu_core_percentage=101))[0].startswith("metadata.gpu_core_percentage:")
    assert errors_of(spec(gpu_memory=0))[0].startswith("metadata.gpu_memory:")


def test_a_share_no_gpu_of_the_node_can_hold_is_a_deploy_error() -> None:
    gpus = RecordedInventory(RECORDED).gpus()
    assert share_issues(parse_spec(spec(gpu_memory=79)).spec.metadata, gpus) == []
    (issue,) = share_issues(parse_spec(spec(gpu_memory=100)).spec.metadata, gpus)
    assert str(issue) == "metadata.gpu_memory: 100 GiB asked; the largest GPU of this node has 79.6 GiB"
    (issue,) = share_issues(parse_spec(spec(gpu_memory=1)).spec.metadata, [])
    assert "this node has no GPU" in str(issue)


# --- packing ----------------------------------------------------------------------------------


def test_shares_pack_best_fit_by_booked_memory(allocator: GpuAllocator) -> None:
    assert allocator.allocate_share("a", 30 * GIB).uuid == UUIDS[0]
    assert allocator.allocate_share("b", 20 * GIB).uuid == UUIDS[0]  # the fullest GPU that still fits
    assert allocator.allocate_share("c", 40 * GIB).uuid == UUIDS[1]  # 29.6 GiB left on GPU 0: too little
    assert allocator.allocate_share("d", 25 * GIB).uuid == UUIDS[0]  # 29.6 left beats 39.6 left on GPU 1
    assert allocator.allocate_share("a", 30 * GIB) == GpuShare(uuid=UUIDS[0], memory_bytes=30 * GIB)  # kept
    booked = {gpu["uuid"]: gpu["booked_bytes"] for gpu in allocator.node_view()}
    assert booked == {UUIDS[0]: 75 * GIB, UUIDS[1]: 40 * GIB, UUIDS[2]: 0, UUIDS[3]: 0}
    (first,) = [gpu for gpu in allocator.node_view() if gpu["uuid"] == UUIDS[0]]
    assert [share["instance"] for share in first["shares"]] == ["a", "b", "d"] and first["instance"] is None


def test_shares_and_whole_gpus_never_mix_and_pending_says_the_numbers(allocator: GpuAllocator) -> None:
    allocator.allocate_share("a", 60 * GIB)
    assert allocator.allocate("whole", 3) == tuple(UUIDS[1:])  # the shared GPU is not handed out whole
    with pytest.raises(GpusPending, match="needs 1 GPU, 0 of 4 free"):
        allocator.allocate("more", 1)
    with pytest.raises(GpusPending) as caught:
        allocator.allocate_share("b", 20 * GIB)
    assert str(caught.value) == ("needs 20 GiB of one GPU; free: GPU-14a03569 19.6 GiB, GPU-096d3737 0, GPU-9623d7cf 0, "
                                 "GPU-bc1e3ac1 0; waits until an instance releases GPU memory")
    allocator.release("whole")
    assert allocator.allocate_share("b", 20 * GIB).uuid == UUIDS[1]
    with pytest.raises(GpuRequestRefused, match="largest GPU of this node has 79.6 GiB"):
        allocator.allocate_share("huge", 80 * GIB)


def test_shares_survive_a_restart_through_the_checkpoint_and_labels(tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpu-checkpoint.json"
    inventory = RecordedInventory(RECORDED)
    before = GpuAllocator(inventory, checkpoint)
    before.allocate_share("a", 30 * GIB)
    before.allocate("whole", 1)
    assert json.loads(checkpoint.read_text())["version"] == CHECKPOINT_VERSION

    after = GpuAllocator(inventory, checkpoint)  # a restarted agent
    assert after.share_of("a") == GpuShare(uuid=UUIDS[0], memory_bytes=30 * GIB)
    assert after.allocate_share("b", 50 * GIB).uuid == UUIDS[2]  # GPU 0 has 49.6 left, GPU 1 is held whole
    after.retain_only({"b"})
    assert GpuAllocator(inventory, checkpoint).share_of("a") is None

    checkpoint.unlink()  # lost: rebuilt from what runs (labels or process records)
    rebuilt = GpuAllocator(inventory, checkpoint)
    rebuilt.adopt_share("b", GpuShare(uuid=UUIDS[2], memory_bytes=50 * GIB))
    rebuilt.adopt("whole", [UUIDS[1]])
    with pytest.raises(CommandFailed, match="holds whole"):
        rebuilt.adopt_share("c", GpuShare(uuid=UUIDS[1], memory_bytes=GIB))
    with pytest.raises(CommandFailed, match="assigned to b"):
        rebuilt.adopt("d", [UUIDS[2]])
    assert rebuilt.allocate_share("e", 25 * GIB).uuid == UUIDS[2]  # best fit: 29.6 GiB left there


def test_a_version_1_checkpoint_is_still_read(tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpu-checkpoint.json"
    GpuAllocator(RecordedInventory(RECORDED), checkpoint).allocate("whole", 1)
    body = json.loads(checkpoint.read_text())
    from agent.gpus import _checksum

    checkpoint.write_text(json.dumps({"version": 1, "assignments": body["assignments"],
                                      "checksum": _checksum(body["assignments"])}))
    assert GpuAllocator(RecordedInventory(RECORDED), checkpoint).assignments() == {"whole": (UUIDS[0],)}


# --- the launch -------------------------------------------------------------------------------


def test_the_instance_gets_its_share_in_env_and_labels_and_mps_limits_when_mps_runs(tmp_path: Path) -> None:
    service = parse_spec(spec(gpu_memory=20, gpu_core_percentage=25)).spec
    config = AgentConfig(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    share = GpuShare(uuid=UUIDS[0], memory_bytes=20 * GIB)
    request = launch.build_request(service, "r1", 0, config, gpus=[UUIDS[0]], host_ports=False,
                                   share=Placement(share, TOTAL, None))
    assert request.env["BERTH_GPU_MEMORY_BYTES"] == str(20 * GIB)
    assert request.env["BERTH_GPU_MEMORY_TOTAL_BYTES"] == str(TOTAL)
    assert request.labels[LABEL_GPU_MEMORY] == str(20 * GIB) and request.labels[LABEL_GPUS] == UUIDS[0]
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in request.env and not request.ipc_host

    pipes = tmp_path / "mps"
    pipes.mkdir()
    assert detect_mps(str(pipes)) is None  # no daemon: no control pipe
    os.mkfifo(pipes / "control")
    mps = detect_mps(str(pipes))
    assert mps == Mps(str(pipes))
    request = launch.build_request(service, "r1", 0, config, gpus=[UUIDS[0]], host_ports=False,
                                   share=Placement(share, TOTAL, mps))
    assert request.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20480M"
    assert request.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert request.env["CUDA_MPS_PIPE_DIRECTORY"] == str(pipes)
    assert request.ipc_host and any(mount.target == str(pipes) and mount.source == str(pipes) for mount in request.mounts)


def test_core_percentage_without_mps_is_said_to_be_unenforced() -> None:
    metadata = parse_spec(spec(gpu_memory=20, gpu_core_percentage=25)).spec.metadata
    assert "gpu_core_percentage 25 is NOT enforced" in enforcement_note(metadata, None)
    assert "capped by MPS" in enforcement_note(metadata, Mps("/tmp/nvidia-mps"))


# --- vLLM -------------------------------------------------------------------------------------


def test_vllm_gets_its_share_as_gpu_memory_utilization_unless_the_command_sizes_memory() -> None:
    env = {"BERTH_GPU_MEMORY_BYTES": str(20 * GIB), "BERTH_GPU_MEMORY_TOTAL_BYTES": str(TOTAL)}
    fraction = share_fraction(env)
    assert fraction == 0.2511  # 20 GiB / 79.6 GiB, rounded down
    argv = engine_argv(VllmCommand("/m"), port=8000, served_name="m", visible_gpus=1, shutdown_timeout_s=10, python="py",
                       memory_fraction=fraction)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.2511"
    for own in (("--gpu-memory-utilization", "0.5"), ("--kv-cache-memory-bytes", "4000000000"), ("--gpu_memory_utilization=0.3",)):
        argv = engine_argv(VllmCommand("/m", own), port=8000, served_name="m", visible_gpus=1, shutdown_timeout_s=10,
                           python="py", memory_fraction=fraction)
        assert argv.count("--gpu-memory-utilization") == (1 if own[0] == "--gpu-memory-utilization" else 0)
    assert share_fraction({}) is None and share_fraction({"BERTH_GPU_MEMORY_BYTES": "x", "BERTH_GPU_MEMORY_TOTAL_BYTES": "1"}) is None


def test_vllm_commands_are_told_apart() -> None:
    def with_command(command: str):
        raw = spec(gpu_memory=8)
        raw["containers"][0]["command"] = command
        return parse_spec(raw).spec

    assert is_vllm(with_command("vllm serve /models/qwen --max-model-len 4096"))
    assert is_vllm(with_command("python -m vllm.entrypoints.openai.api_server --model /m"))
    assert not is_vllm(with_command("python app.py"))


def test_vllm_engines_on_one_gpu_start_one_after_another() -> None:
    async def scenario() -> list[str]:
        queue = StartQueue(poll_s=0.01)
        states = {"a": "Starting", "b": "Starting", "c": "Starting"}
        log: list[str] = []

        async def start(key: str, uuid: str, timeout_s: float = 60) -> None:
            await queue.wait_turn(uuid, key, timeout_s=timeout_s, settled=lambda: states[key] in ("Ready", "BackOff"),
                                  waiting=lambda holder: log.append(f"{key} waits for {holder}"))
            log.append(f"{key} starts")

        first = asyncio.create_task(start("a", "GPU-0"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(start("b", "GPU-0"))
        other = asyncio.create_task(start("c", "GPU-1"))  # another GPU: no wait
        await asyncio.sleep(0.1)
        assert not second.done() and other.done() and first.done()
        states["a"] = "Ready"
        await asyncio.wait_for(second, 1)
        third = asyncio.create_task(start("d", "GPU-0", 0.2))
        await asyncio.sleep(0.05)
        assert not third.done()
        states["b"] = "BackOff"  # a failed start frees the GPU too
        await asyncio.wait_for(third, 1)
        states["d"] = "Starting"
        fourth = asyncio.create_task(start("e", "GPU-0"))
        await asyncio.wait_for(fourth, 1)  # d never settles: its start timeout (0.2 s) lets e go
        return log

    log = asyncio.run(scenario())
    assert log[:3] == ["a starts", "b waits for a", "c starts"]
    assert log[3:] == ["b starts", "d waits for b", "d starts", "e waits for d", "e starts"]


# --- the soft memory watch --------------------------------------------------------------------


def test_an_instance_over_its_share_by_more_than_5_percent_twice_in_a_row_is_evicted() -> None:
    watch = MemoryWatch()
    shares = {"a": GpuShare(uuid=UUIDS[0], memory_bytes=20 * GIB), "b": GpuShare(uuid=UUIDS[0], memory_bytes=10 * GIB)}
    assert watch.check(shares, {"a": int(20.9 * GIB), "b": 11 * GIB}) == []  # a within 5%; b over once
    assert watch.check(shares, {"a": 20 * GIB, "b": 9 * GIB}) == []  # b back under: starts counting again
    assert watch.check(shares, {"b": 11 * GIB}) == []
    (excess,) = watch.check(shares, {"b": 11 * GIB})
    assert (excess.key, excess.used_bytes, excess.share_bytes) == ("b", 11 * GIB, 10 * GIB)
    assert excess.message.startswith(f"uses 11.00 GiB of GPU {UUIDS[0]}, 10% over its share of 10.00 GiB")
    assert watch.check(shares, {"b": 11 * GIB}) == []  # evicted: counted afresh


def test_nvml_processes_are_summed_per_instance() -> None:
    gpu = Gpu(uuid=UUIDS[0], index=0, name="x", memory_total_bytes=TOTAL, memory_used_bytes=0,
              processes=(GpuProcess(pid=10, used_memory_bytes=GIB), GpuProcess(pid=11, used_memory_bytes=2 * GIB),
                         GpuProcess(pid=12, used_memory_bytes=None), GpuProcess(pid=13, used_memory_bytes=GIB)))
    runtime_ids = {10: "container-a", 11: "container-a", 12: "container-b", 13: None}
    used = used_by_instance([gpu], {"container-a": "a@r1", "container-b": "b@r1"}, runtime_ids.get)
    assert used == {"a@r1": 3 * GIB}


# --- end to end: a real agent, process runtime, recorded GPUs ---------------------------------


def test_the_agent_packs_shares_keeps_them_across_a_restart_and_evicts_over_its_share(tmp_path: Path) -> None:
    from tests.harness.agent import TIMINGS, Agent, unique, wait_state
    from tests.harness.parts import free_port, wait_until

    record = json.loads(RECORDED.read_text())
    record["gpus"] = [{**gpu, "processes": []} for gpu in record["gpus"][:2]]
    inventory = tmp_path / "gpus.json"
    inventory.write_text(json.dumps(record))
    config = {"runtime": "process", "gpu_inventory_file": str(inventory),
              "timings": {**TIMINGS, "gpu_watch_period_s": 0.3}}
    agent = Agent(tmp_path, **config).start()

    def service(prefix: str, **metadata) -> dict:
        port = free_port()
        return {"metadata": {"name": unique(prefix), "eas": {"termination_grace_period": 5}, **metadata},
                "containers": [{"image": "ignored", "command": f"python3 -m http.server {port} --bind 127.0.0.1", "port": port}]}

    def events(name: str) -> list[dict]:
        lines = agent.api("GET", f"/v1/events?follow=false&service={name}").text.splitlines()
        return [json.loads(line) for line in lines]

    def node_gpus() -> dict[str, dict]:
        return {gpu["uuid"]: gpu for gpu in agent.api("GET", "/v1/node").json()["gpus"]}

    small, large, whole, waiting = (service("small", gpu_memory=30), service("large", gpu_memory=40),
                                    service("whole", gpu=1), service("waiting", gpu_memory=20))
    try:
        for raw in (small, large, whole):
            result = agent.deploy(raw, "--wait")
            assert result.returncode == 0, result.stderr
        gpus_of = {raw["metadata"]["name"]: agent.service(raw["metadata"]["name"])["instances"][0]["gpus"]
                   for raw in (small, large, whole)}
        assert gpus_of == {small["metadata"]["name"]: [UUIDS[0]], large["metadata"]["name"]: [UUIDS[0]],
                           whole["metadata"]["name"]: [UUIDS[1]]}
        assert any(event["kind"] == "GpuShare" and "memory watched through NVML" in event["message"]
                   for event in events(small["metadata"]["name"]))

        assert agent.deploy(waiting).returncode == 0
        name = waiting["metadata"]["name"]
        pending = wait_state(agent, name, lambda s: s["instances"][0]["state"] == "Pending", 30, "Pending")
        assert pending["instances"][0]["reason"].startswith("needs 20 GiB of one GPU; free: GPU-14a03569 9.6 GiB, GPU-096d3737 0")
        too_big = agent.deploy(service("huge", gpu_memory=100))
        assert too_big.returncode == 2 and "metadata.gpu_memory: 100 GiB asked" in too_big.stderr

        agent.kill9()
        (agent.state_dir / "gpu-checkpoint.json").unlink()  # rebuilt from the process records' labels
        agent = Agent(tmp_path, port=agent.port, **config).start()
        wait_state(agent, small["metadata"]["name"], lambda s: s["ready"] == 1, 30, "re-adoption")
        shared = node_gpus()[UUIDS[0]]
        assert sorted(share["memory_bytes"] for share in shared["shares"]) == [30 * GIB, 40 * GIB]
        assert node_gpus()[UUIDS[1]]["instance"] == f"{whole['metadata']['name']}-0"
        assert agent.service(name)["instances"][0]["state"] == "Pending"  # still no room after the restart

        assert agent.cli("rm", whole["metadata"]["name"]).returncode == 0
        wait_state(agent, name, lambda s: s["ready"] == 1 and s["instances"][0]["gpus"] == [UUIDS[1]], 30, "placed")

        # NVML's process list, recorded: small's process uses 35 GiB of its 30 GiB share, large's 10 GiB of 40.
        pid_of = {}
        for raw in (small, large):
            (path,) = (agent.state_dir / "processes").glob(f"berth-{raw['metadata']['name']}-0-*[!s].json")
            pid_of[raw["metadata"]["name"]] = json.loads(path.read_text())["pid"]
        record["gpus"][0]["processes"] = [{"pid": pid_of[small["metadata"]["name"]], "used_memory_bytes": 35 * GIB},
                                          {"pid": pid_of[large["metadata"]["name"]], "used_memory_bytes": 10 * GIB}]
        inventory.write_text(json.dumps(record))
        node = agent.cli("node")
        assert f"share {large['metadata']['name']}-0: 40.0 GiB, 10.0 GiB used (NVML)" in node.stdout, node.stdout

        small_name = small["metadata"]["name"]
        wait_until(lambda: any(event["kind"] == GPU_MEMORY_EXCEEDED for event in events(small_name)), 20, "eviction")
        (evicted,) = [event for event in events(small_name) if event["kind"] == GPU_MEMORY_EXCEEDED]
        assert evicted["message"].startswith(f"uses 35.00 GiB of GPU {UUIDS[0]}, 17% over its share of 30.00 GiB")
        after = wait_state(agent, small_name, lambda s: s["ready"] == 1 and s["instances"][0]["restarts"] == 1, 30, "restart")
        assert after["instances"][0]["last_exit"]["reason"] == GPU_MEMORY_EXCEEDED
        assert after["instances"][0]["gpus"] == [UUIDS[0]]  # the same share after the restart
        assert not any(event["kind"] == GPU_MEMORY_EXCEEDED for event in events(large["metadata"]["name"]))
    finally:
        for raw in (small, large, whole, waiting):
            agent.cli("rm", raw["metadata"]["name"])
        agent.stop()


# --- scripts/gpu-check ------------------------------------------------------------------------


def test_gpu_check_runs_here_and_says_plainly_that_there_is_no_gpu(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: there scripts/gpu-check runs the gpu tests instead")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
    done = subprocess.run([sys.executable, str(script), "--wheels", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    for fact in ("python ", "driver ", "nvml ", "torch ", "vllm ", "docker ", "mps "):
        assert f"] {fact}" in done.stdout, done.stdout
    assert "NO GPU: neither NVML nor torch sees a GPU on this machine; the gpu tests were NOT run" in done.stdout


def test_vllm_engines_sharing_a_gpu_start_one_at_a_time_sized_to_their_share(tmp_path: Path) -> None:
    """Two vLLM services on one shared GPU, deployed together: the second engine starts only once
    the first is Ready, and each gets --gpu-memory-utilization from its share (a stand-in engine
    that records its command line: tests/apps/fake_vllm)."""
    from tests.harness.agent import TIMINGS, Agent, unique, wait_state
    from tests.harness.parts import free_port

    repo = Path(__file__).resolve().parents[1]
    record = json.loads(RECORDED.read_text())
    record["gpus"] = record["gpus"][:1]
    inventory = tmp_path / "gpus.json"
    inventory.write_text(json.dumps(record))
    engine_log = tmp_path / "engines.jsonl"
    agent = Agent(tmp_path, runtime="process", gpu_inventory_file=str(inventory), timings=TIMINGS).start()

    def service(share_gib: int) -> dict:
        env = {"PYTHONPATH": f"{repo / 'tests' / 'apps' / 'fake_vllm'}:{repo}", "FAKE_VLLM_LOG": str(engine_log),
               "FAKE_VLLM_DELAY": "2"}
        return {"metadata": {"name": unique("llm"), "gpu_memory": share_gib, "eas": {"termination_grace_period": 5}},
                "containers": [{"image": "ignored", "port": free_port(), "command": f"vllm serve /models/m{share_gib}",
                                "env": [{"name": key, "value": value} for key, value in env.items()]}]}

    first, second = service(10), service(20)
    try:
        for raw in (first, second):
            result = agent.deploy(raw)
            assert result.returncode == 0, result.stderr
        waited = wait_state(agent, second["metadata"]["name"], lambda s: s["instances"][0]["state"] == "Pending", 30, "waiting")
        assert waited["instances"][0]["reason"].startswith(f"waits for the vLLM engine of {first['metadata']['name']}-0 to start "
                                                           f"on GPU {UUIDS[0]}")
        for raw in (first, second):
            wait_state(agent, raw["metadata"]["name"], lambda s: s["ready"] == 1, 60, "Ready")
        events = [json.loads(line) for line in engine_log.read_text().splitlines()]
        starts = [event for event in events if event["event"] == "start"]
        listening = [event for event in events if event["event"] == "listening"]
        assert [event["argv"][event["argv"].index("--model") + 1] for event in starts] == ["/models/m10", "/models/m20"]
        assert starts[1]["at"] >= listening[0]["at"], events  # the second engine began after the first listened
        utilization = [event["argv"][event["argv"].index("--gpu-memory-utilization") + 1] for event in starts]
        assert utilization == ["0.1255", "0.2511"]  # 10 and 20 GiB of 79.6 GiB
    finally:
        for raw in (first, second):
            agent.cli("rm", raw["metadata"]["name"])
        agent.stop()


def test_docker_gets_the_one_gpu_by_uuid_the_share_env_and_mps_ipc(docker_client, base_image: str, tmp_path: Path) -> None:
    """What the engine is asked for an instance on a share under MPS. Without the NVIDIA runtime
    the start fails and the container is kept, so `docker inspect` shows the request."""
    from agent.docker_runtime import DockerRuntime
    from agent.runtime import LaunchError

    if "nvidia" in docker_client.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime: the start would succeed (scripts/gpu-check covers GPU machines)")
    pipes = tmp_path / "mps"
    pipes.mkdir()
    os.mkfifo(pipes / "control")
    raw = spec(gpu_memory=20, gpu_core_percentage=40)
    raw["metadata"]["name"] = f"share-{os.urandom(3).hex()}"
    raw["containers"][0].update(image=base_image, command="true", bootstrap=False)
    config = AgentConfig(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    placement = Placement(GpuShare(uuid=UUIDS[2], memory_bytes=20 * GIB), TOTAL, detect_mps(str(pipes)))
    request = launch.build_request(parse_spec(raw).spec, "r1", 0, config, gpus=[UUIDS[2]], host_ports=False, share=placement)
    runtime = DockerRuntime(config)
    with pytest.raises(LaunchError) as caught:
        runtime.start(request)
    assert caught.value.reason == "GpuRuntimeMissing" and caught.value.instance_id
    try:
        inspected = docker_client.api.inspect_container(caught.value.instance_id)
        host = inspected["HostConfig"]
        assert [request["DeviceIDs"] for request in host["DeviceRequests"]] == [[UUIDS[2]]]
        assert host["IpcMode"] == "host"
        env = dict(item.split("=", 1) for item in inspected["Config"]["Env"])
        assert env["BERTH_GPU_MEMORY_BYTES"] == str(20 * GIB)
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20480M" and env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
        assert inspected["Config"]["Labels"][LABEL_GPU_MEMORY] == str(20 * GIB)
        assert any(mount["Destination"] == str(pipes) for mount in inspected["Mounts"])
    finally:
        docker_client.api.remove_container(caught.value.instance_id, force=True)


# --- berth render k8s --gpu-share -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "limits", "warned"),
    [
        ("none", {"nvidia.com/gpu": 1}, ["metadata.gpu_memory: 20.5 GiB of one GPU rendered as a whole nvidia.com/gpu: 1"]),
        ("hami", {"nvidia.com/gpu": 1, "nvidia.com/gpumem": 20992, "nvidia.com/gpucores": 30}, []),
        ("ack", {"aliyun.com/gpu-mem": 21}, ["metadata.gpu_memory: 20.5 GiB rounded up to aliyun.com/gpu-mem 21",
                                             "metadata.gpu_core_percentage: left out: ACK's aliyun.com/gpu-mem shares memory only"]),
    ],
)
def test_render_k8s_maps_a_share_for_each_gpu_sharing_plugin(tmp_path: Path, mode: str, limits: dict, warned: list[str]) -> None:
    from agent.k8s.model import Options
    from agent.k8s.render import render_files
    from tests.harness.k8s import validate

    raw = spec(gpu_memory=20.5, gpu_core_percentage=30, memory=8192)
    (tmp_path / "small.json").write_text(json.dumps(raw))
    rendered = render_files([str(tmp_path / "small.json")], [], Options(gpu_share=mode))
    (deployment,) = [m.obj for m in rendered.manifests if m.kind == "Deployment"]
    validate(deployment)
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"memory": "8192Mi", **limits}  # 20.5 GiB = 20992 MiB for HAMi
    assert resources["requests"] == {"memory": "8192Mi"}  # extended resources in limits only
    for warning in warned:
        assert any(warning in line for line in rendered.warnings), rendered.warnings
    assert len([line for line in rendered.warnings if "gpu" in line]) == len(warned)


def test_render_k8s_cli_takes_gpu_share(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "small.json").write_text(json.dumps(spec(gpu_memory=8)))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "bootstrap.cli", "render", "k8s", str(tmp_path / "small.json"), "--gpu-share", "hami"],
                          capture_output=True, text=True, cwd=repo, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "nvidia.com/gpumem: 8192" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "bootstrap.cli", "render", "k8s", str(tmp_path / "small.json"), "--gpu-share", "mig"],
                         capture_output=True, text=True, cwd=repo, timeout=60)
    assert bad.returncode == 2 and "--gpu-share: invalid choice: 'mig'" in bad.stderr
