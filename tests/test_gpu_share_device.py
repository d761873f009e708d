"""GPU sharing on a real GPU (marker `gpu`; `scripts/gpu-check` runs these on a lent machine).

Two processes under two shares of one GPU each allocate memory with torch, as two instances of
the process runtime would (each in its own session, CUDA_VISIBLE_DEVICES = the GPU's UUID, the
share's environment); NVML must list both with their sizes, and the one that allocates past its
share must be reported over it by the agent's watch. Needs torch with CUDA, NVML, and nothing
else of the agent's (no Docker, no fastapi): what a bare GPU machine has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.gpu_share import MemoryWatch, Placement, detect_mps, used_by_instance
from agent.gpus import GpuShare, NvmlInventory

pytestmark = pytest.mark.gpu

MIB = 2**20
# Allocates ALLOC_MIB MiB on the one visible GPU, says so, then holds it until stdin closes.
HOLDER = """
import os, sys, torch
block = torch.empty(int(os.environ["ALLOC_MIB"]) * 2**20, dtype=torch.uint8, device="cuda")
block.fill_(1)
torch.cuda.synchronize()
print("allocated", flush=True)
sys.stdin.read()
"""


def _start_holder(uuid: str, alloc_mib: int, env: dict[str, str]) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env, "CUDA_VISIBLE_DEVICES": uuid, "ALLOC_MIB": str(alloc_mib)}, start_new_session=True,
    )
    line = child.stdout.readline()
    if line.strip() != "allocated":
        child.kill()
        raise AssertionError(f"the torch process did not allocate {alloc_mib} MiB: {child.stderr.read()[-2000:]}")
    return child


def _session_of(pid: int) -> str | None:
    """As the process runtime maps NVML's host PIDs: the session leader's PID names the instance."""
    try:
        return str(os.getsid(pid))
    except OSError:
        return None


def test_two_shares_of_one_gpu_are_measured_through_nvml_and_the_one_past_its_share_is_reported(tmp_path: Path) -> None:
    inventory = NvmlInventory()
    gpus = inventory.gpus()
    assert gpus, f"no GPU through {inventory.describe()}"
    gpu = max(gpus, key=lambda g: g.memory_total_bytes - g.memory_used_bytes)
    share_bytes = 2048 * MIB
    shares = {"within@r": GpuShare(uuid=gpu.uuid, memory_bytes=share_bytes),
              "over@r": GpuShare(uuid=gpu.uuid, memory_bytes=share_bytes)}
    placement_env = Placement(shares["within@r"], gpu.memory_total_bytes, detect_mps()).env(None)
    # torch's CUDA context adds a few hundred MiB to each process: 1 GiB stays under 2 GiB,
    # 3 GiB is far over 2 GiB + 5%.
    within = _start_holder(gpu.uuid, 1024, placement_env)
    over = _start_holder(gpu.uuid, 3072, placement_env)
    try:
        owners = {str(within.pid): "within@r", str(over.pid): "over@r"}
        deadline = time.monotonic() + 20
        while True:
            now = {g.uuid: g for g in inventory.gpus()}[gpu.uuid]
            used = used_by_instance([now], owners, _session_of)
            if len(used) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        listed = [(process.pid, process.used_memory_bytes) for process in now.processes]
        assert now.processes, ("NVML's process list of the GPU is EMPTY although two processes hold memory on it: "
                               "this machine hides per-process GPU memory (a VM or container without the host PID "
                               "namespace?), so the agent's memory watch cannot see any instance here")
        assert set(used) == {"within@r", "over@r"}, f"NVML lists {listed}; mapped per instance: {used}"
        assert 1024 * MIB <= used["within@r"] < share_bytes, used
        assert used["over@r"] >= 3072 * MIB, used

        watch = MemoryWatch()
        assert watch.check(shares, used) == []  # over once: not yet
        (excess,) = watch.check(shares, used)
        assert excess.key == "over@r" and excess.uuid == gpu.uuid and excess.used_bytes == used["over@r"]
        print(f"NVML per process on {gpu.uuid}: {listed}; watch: {excess.message}")
    finally:
        for child in (within, over):
            child.kill()
            child.wait()


def test_under_mps_the_share_caps_what_a_process_may_allocate() -> None:
    mps = detect_mps()
    if mps is None:
        pytest.skip("no MPS control daemon on this machine (start one with `nvidia-cuda-mps-control -d` to check the cap)")
    gpu = NvmlInventory().gpus()[0]
    env = Placement(GpuShare(uuid=gpu.uuid, memory_bytes=1024 * MIB), gpu.memory_total_bytes, mps).env(None)
    with pytest.raises(AssertionError, match="did not allocate"):
        _start_holder(gpu.uuid, 2048, env).kill()
