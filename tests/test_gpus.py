"""GPU inventory, allocation by UUID with a checkpoint, the Docker DeviceRequest, PID mapping, lost-GPU check.

Without a GPU the inventory is the recorded one (tests/data/gpu-inventory.json: four H100s);
everything Docker does here runs on the real engine. The NVML path runs under marker `gpu`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.gpus import (
    GpuAllocator,
    GpuRequestRefused,
    GpuRuntimeMissing,
    GpusPending,
    InventoryRecord,
    NvmlInventory,
    RecordedInventory,
    check_container_gpus,
    container_of_pid,
    device_request,
    explain_start_error,
    gpu_probe_verdict,
)
from bootstrap.errors import CommandFailed, UsageError

RECORDED = Path(__file__).parent / "data" / "gpu-inventory.json"
UUIDS = [gpu["uuid"] for gpu in json.loads(RECORDED.read_text())["gpus"]]


@pytest.fixture
def inventory() -> RecordedInventory:
    return RecordedInventory(RECORDED)


@pytest.fixture
def allocator(inventory: RecordedInventory, tmp_path: Path) -> GpuAllocator:
    return GpuAllocator(inventory, tmp_path / "gpu-checkpoint.json")


@pytest.fixture
def container_name(docker_client):
    """A unique container name, its container removed after the test."""
    name = f"berth-test-gpus-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        docker_client.api.remove_container(name, force=True)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass


# --- the recorded inventory -------------------------------------------------------------------


def test_recorded_inventory_lists_the_gpus_in_the_file(inventory: RecordedInventory) -> None:
    gpus = inventory.gpus()
    assert [gpu.uuid for gpu in gpus] == UUIDS
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert gpus[0].memory_total_bytes == 85520809984
    assert gpus[0].processes[0].pid == 4242
    assert "gpu-inventory.json" in inventory.describe()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not JSON"),
        ('{"gpus": [{"uuid": "GPU-1", "index": 0}]}', "gpus.0.name"),
        ('{"gpus": [{"uuid": "0", "index": 0, "name": "x", "memory_total_bytes": 1, "memory_used_bytes": 0}]}', "gpus.0.uuid"),
    ],
)
def test_a_bad_inventory_file_names_the_file_and_the_field(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "inventory.json"
    path.write_text(content)
    with pytest.raises(UsageError) as caught:
        RecordedInventory(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_an_inventory_listing_a_gpu_twice_is_refused(tmp_path: Path) -> None:
    record = json.loads(RECORDED.read_text())
    record["gpus"][1]["uuid"] = record["gpus"][0]["uuid"]
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(record))
    with pytest.raises(UsageError, match="appears twice"):
        RecordedInventory(path)


def test_the_command_prints_a_recorded_inventory_it_can_read_back(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.gpus", "--inventory-file", str(RECORDED)], capture_output=True, text=True, check=True
    ).stdout
    copy = tmp_path / "copy.json"
    copy.write_text(out)
    assert [gpu.uuid for gpu in RecordedInventory(copy).gpus()] == UUIDS


# --- allocation -------------------------------------------------------------------------------


def test_instances_get_distinct_gpus_in_index_order(allocator: GpuAllocator) -> None:
    first = allocator.allocate("svc-a-0", 2)
    second = allocator.allocate("svc-b-0", 1)
    assert first == tuple(UUIDS[:2])
    assert second == (UUIDS[2],)
    assert allocator.allocate("svc-a-0", 2) == first  # asking again keeps the assignment
    assert allocator.holder_of(UUIDS[0]) == "svc-a-0"
    assert allocator.allocate("svc-c-0", 0) == ()


def test_too_few_free_gpus_is_pending_with_a_reason(allocator: GpuAllocator) -> None:
    allocator.allocate("svc-a-0", 2)
    allocator.allocate("svc-b-0", 1)
    with pytest.raises(GpusPending) as caught:
        allocator.allocate("svc-c-0", 2)
    assert "needs 2 GPUs, 1 of 4 free" in str(caught.value)
    assert "svc-a-0" in str(caught.value) and "svc-b-0" in str(caught.value)
    assert "svc-c-0" not in allocator.assignments()

    allocator.release("svc-a-0")
    assert set(allocator.allocate("svc-c-0", 2)) == {UUIDS[0], UUIDS[1]}


def test_more_gpus_than_the_node_has_is_refused(allocator: GpuAllocator) -> None:
    with pytest.raises(GpuRequestRefused) as caught:
        allocator.allocate("svc-big-0", 5)
    message = str(caught.value)
    assert message.startswith("metadata.gpu: asks for 5 GPUs but this node has 4")
    assert "NVIDIA H100 80GB HBM3" in message
    assert allocator.assignments() == {}
    allocator.check_request(4)  # the whole node is fine


def test_assignments_survive_a_restart_through_the_checkpoint(inventory: RecordedInventory, tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpu-checkpoint.json"
    before = GpuAllocator(inventory, checkpoint)
    held = before.allocate("svc-a-0", 3)

    after = GpuAllocator(inventory, checkpoint)  # a restarted agent
    assert after.assignments() == {"svc-a-0": held}
    assert after.allocate("svc-b-0", 1) == (UUIDS[3],)
    with pytest.raises(GpusPending):
        after.allocate("svc-c-0", 1)

    after.retain_only({"svc-b-0"})  # svc-a-0's container was not found at re-adoption
    assert GpuAllocator(inventory, checkpoint).assignments() == {"svc-b-0": (UUIDS[3],)}


def test_a_tampered_checkpoint_is_set_aside_and_rebuilt_by_adoption(inventory: RecordedInventory, tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpu-checkpoint.json"
    GpuAllocator(inventory, checkpoint).allocate("svc-a-0", 1)
    body = json.loads(checkpoint.read_text())
    body["assignments"]["svc-a-0"] = [UUIDS[1]]  # edited by hand: the checksum no longer matches
    checkpoint.write_text(json.dumps(body))

    restarted = GpuAllocator(inventory, checkpoint)
    assert restarted.assignments() == {}
    assert (tmp_path / "gpu-checkpoint.json.corrupt").exists()

    restarted.adopt("svc-a-0", [UUIDS[0]])  # from the running container's berth.gpus label
    assert restarted.allocate("svc-b-0", 1) == (UUIDS[1],)
    with pytest.raises(CommandFailed, match="assigned to svc-a-0"):
        restarted.adopt("svc-x-0", [UUIDS[0]])


def test_an_assignment_to_a_gpu_the_node_lost_is_dropped(inventory: RecordedInventory, tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpu-checkpoint.json"
    GpuAllocator(inventory, checkpoint).allocate("svc-a-0", 4)
    smaller = json.loads(RECORDED.read_text())
    smaller["gpus"] = smaller["gpus"][:3]
    (tmp_path / "three.json").write_text(json.dumps(smaller))
    assert GpuAllocator(RecordedInventory(tmp_path / "three.json"), checkpoint).assignments() == {}


# --- Docker -----------------------------------------------------------------------------------


def test_the_device_request_reaches_the_engine_and_start_explains_the_missing_runtime(
    docker_client, base_image: str, allocator: GpuAllocator, container_name: str
) -> None:
    import docker.errors

    assigned = allocator.allocate(container_name, 2)
    container = docker_client.containers.create(
        base_image, ["true"], name=container_name, device_requests=[device_request(assigned)]
    )
    requests = docker_client.api.inspect_container(container.id)["HostConfig"]["DeviceRequests"]
    assert requests == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": list(assigned), "Capabilities": [["gpu"]], "Options": {}}
    ]
    if "nvidia" in docker_client.info().get("Runtimes", {}):
        pytest.skip("this engine has the NVIDIA runtime: the start would succeed")
    with pytest.raises(docker.errors.APIError) as caught:
        container.start()
    explained = explain_start_error(caught.value)
    assert isinstance(explained, GpuRuntimeMissing)
    assert 'could not select device driver "nvidia"' in str(explained)
    assert "NVIDIA Container Toolkit" in str(explained)
    assert explain_start_error(docker.errors.APIError("port is already allocated")) is None


def test_a_host_pid_maps_to_its_container(docker_client, base_image: str, container_name: str) -> None:
    container = docker_client.containers.run(base_image, ["sleep", "30"], name=container_name, detach=True)
    pid = docker_client.api.inspect_container(container.id)["State"]["Pid"]
    assert container_of_pid(pid) == container.id
    assert container_of_pid(os.getpid()) is None or Path("/.dockerenv").exists()
    assert container_of_pid(2**22 + 1) is None  # no such process


def test_the_node_view_names_holders_and_the_containers_of_gpu_processes(
    docker_client, base_image: str, container_name: str, tmp_path: Path
) -> None:
    container = docker_client.containers.run(base_image, ["sleep", "30"], name=container_name, detach=True)
    record = json.loads(RECORDED.read_text())
    record["gpus"][1]["processes"] = [{"pid": docker_client.api.inspect_container(container.id)["State"]["Pid"], "used_memory_bytes": 2**30}]
    (tmp_path / "inventory.json").write_text(json.dumps(record))
    allocator = GpuAllocator(RecordedInventory(tmp_path / "inventory.json"), tmp_path / "checkpoint.json")
    allocator.allocate("svc-a-0", 2)

    view = allocator.node_view()

    assert [gpu["uuid"] for gpu in view] == UUIDS
    assert [gpu["instance"] for gpu in view] == ["svc-a-0", "svc-a-0", None, None]
    assert view[1]["processes"] == [{"pid": record["gpus"][1]["processes"][0]["pid"], "used_memory_bytes": 2**30, "container": container.id}]
    assert view[0]["name"] == "NVIDIA H100 80GB HBM3" and view[0]["memory_total_bytes"] == 85520809984


def test_cgroup_paths_of_the_common_layouts(tmp_path: Path) -> None:
    cid = "0123456789abcdef" * 4
    for layout in (
        f"12:memory:/docker/{cid}",
        f"0::/system.slice/docker-{cid}.scope",
        f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{cid}.scope",
    ):
        (tmp_path / "7").mkdir(exist_ok=True)
        (tmp_path / "7" / "cgroup").write_text(f"1:name=systemd:/\n{layout}\n")
        assert container_of_pid(7, proc=tmp_path) == cid, layout
    (tmp_path / "7" / "cgroup").write_text("0::/user.slice/user-0.slice/session-3.scope\n")
    assert container_of_pid(7, proc=tmp_path) is None


# --- the lost-GPU check -----------------------------------------------------------------------

FAKE_NVIDIA_SMI = {  # the GPU test double: what nvidia-smi prints in each situation
    "ok": "printf '%s\\n' " + " ".join(UUIDS[:2]),
    "lost": "echo 'Failed to initialize NVML: Unknown Error'; exit 255",
    "one-missing": f"echo {UUIDS[0]}",
}


def test_the_in_container_check_tells_ok_lost_and_unknown(docker_client, base_image: str, container_name: str) -> None:
    container = docker_client.containers.run(base_image, ["sleep", "60"], name=container_name, detach=True)
    expected = UUIDS[:2]
    assert check_container_gpus(container, expected).state == "unknown"  # no nvidia-smi in the image
    for case, body in FAKE_NVIDIA_SMI.items():
        script = f"printf '#!/bin/sh\\n%s\\n' \"{body}\" > /usr/local/bin/nvidia-smi && chmod +x /usr/local/bin/nvidia-smi"
        assert container.exec_run(["sh", "-c", script]).exit_code == 0
        verdict = check_container_gpus(container, expected)
        assert verdict.state == ("ok" if case == "ok" else "lost"), (case, verdict)
        if case == "lost":
            assert "Unknown Error" in verdict.reason
        if case == "one-missing":
            assert UUIDS[1] in verdict.reason


def test_probe_verdicts() -> None:
    assert gpu_probe_verdict(0, f"{UUIDS[0]}\n", [UUIDS[0]]).state == "ok"
    assert gpu_probe_verdict(255, "Failed to initialize NVML: Unknown Error\n", [UUIDS[0]]).state == "lost"
    assert gpu_probe_verdict(9, "NVIDIA-SMI has failed", [UUIDS[0]]).state == "lost"
    assert gpu_probe_verdict(127, "sh: nvidia-smi: not found", [UUIDS[0]]).state == "unknown"


# --- the real NVML path -----------------------------------------------------------------------


@pytest.mark.gpu
def test_nvml_reports_the_nodes_gpus(tmp_path: Path) -> None:
    inventory = NvmlInventory()
    gpus = inventory.gpus()
    assert gpus, f"no GPU found through {inventory.describe()}"
    for gpu in gpus:
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_total_bytes > 0 and gpu.memory_used_bytes <= gpu.memory_total_bytes
    assert "driver" in inventory.describe()

    out = subprocess.run([sys.executable, "-m", "agent.gpus"], capture_output=True, text=True, check=True).stdout
    record = InventoryRecord.model_validate_json(out)
    assert [gpu.uuid for gpu in record.gpus] == [gpu.uuid for gpu in gpus]

    allocator = GpuAllocator(inventory, tmp_path / "checkpoint.json")
    assert allocator.allocate("svc-a-0", len(gpus)) == tuple(gpu.uuid for gpu in gpus)
    with pytest.raises(GpuRequestRefused):
        allocator.check_request(len(gpus) + 1)


@pytest.mark.gpu
def test_nvidia_smi_on_a_healthy_node_passes_the_lost_gpu_check() -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not installed")
    uuids = [gpu.uuid for gpu in NvmlInventory().gpus()]
    result = subprocess.run([smi, "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True)
    assert gpu_probe_verdict(result.returncode, result.stdout + result.stderr, uuids).state == "ok"
