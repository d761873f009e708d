"""Sharing one GPU by memory (`metadata.gpu_memory`, `gpu_core_percentage`): what the instance
is told, MPS where the node runs it, one-at-a-time vLLM starts, and the soft memory watch.

The allocator (agent/gpus.py) books the shares; this module is the rest. Enforcement is soft
unless an MPS control daemon runs on the node: every `gpu_watch_period_s` the agent sums NVML's
per-process memory of each instance, and one above its share by more than 5% for two periods
in a row is evicted (`GpuMemoryExceeded`) and restarted with backoff, like the disk limit. Under
MPS the CUDA driver itself caps the memory (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT) and the compute
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). MIG and HAMi-core give hard limits too; berth does not
drive them (see README, "GPU sharing").
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from agent.gpus import Gpu, GpuAllocator, GpuShare
from bootstrap.spec import Metadata, ServiceSpec, SpecIssue

GPU_MEMORY_EXCEEDED = "GpuMemoryExceeded"
# Allocators round up and CUDA contexts add a few hundred MiB: a little over is not a runaway.
OVER_SHARE_TOLERANCE = 0.05
PERIODS_OVER_TO_EVICT = 2
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's default


# --- deploy-time check ------------------------------------------------------------------------


def share_issues(metadata: Metadata, gpus: list[Gpu]) -> list[SpecIssue]:
    """What makes a share impossible on this node at all (a deploy error, not a Pending)."""
    need = metadata.gpu_memory_bytes
    if need is None:
        return []
    if not gpus:
        return [SpecIssue("metadata.gpu_memory", "this node has no GPU; deploy to a GPU node")]
    largest = max(gpu.memory_total_bytes for gpu in gpus)
    if need > largest:
        return [SpecIssue("metadata.gpu_memory", f"{metadata.gpu_memory:g} GiB asked; the largest GPU of this node has "
                                                 f"{largest / 2**30:.1f} GiB")]
    return []


# --- what the instance is told ----------------------------------------------------------------


@dataclass(frozen=True)
class Mps:
    """An MPS control daemon on the node, found by its control pipe."""

    pipe_directory: str


def detect_mps(pipe_directory: str | None = None) -> Mps | None:
    """The MPS daemon whose control pipe is in `pipe_directory` (CUDA_MPS_PIPE_DIRECTORY, else
    /tmp/nvidia-mps, as nvidia-cuda-mps-control uses), or None."""
    folder = pipe_directory or os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIRECTORY
    try:
        control = os.stat(Path(folder) / "control")
    except OSError:
        return None
    return Mps(folder) if stat.S_ISFIFO(control.st_mode) or stat.S_ISSOCK(control.st_mode) else None


@dataclass(frozen=True)
class Placement:
    """An instance's share as its launch needs it: the share, its GPU's size, and MPS if any."""

    share: GpuShare
    total_bytes: int
    mps: Mps | None

    def env(self, core_percentage: int | None) -> dict[str, str]:
        """Its size for the engine (serving/vllm.py sizes vLLM's cache from it) and, under MPS,
        the driver's limits. The one GPU the instance sees is its index 0."""
        env = {"BERTH_GPU_MEMORY_BYTES": str(self.share.memory_bytes), "BERTH_GPU_MEMORY_TOTAL_BYTES": str(self.total_bytes)}
        if self.mps is not None:
            env["CUDA_MPS_PIPE_DIRECTORY"] = self.mps.pipe_directory
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={self.share.memory_bytes // 2**20}M"
            if core_percentage is not None:
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(core_percentage)
        return env


def placement(allocator: GpuAllocator, key: str, mps_pipe_directory: str | None) -> Placement | None:
    """The placement of `key`'s share, or None when it holds whole GPUs (or none)."""
    share = allocator.share_of(key)
    if share is None:
        return None
    total = next((gpu.memory_total_bytes for gpu in allocator.inventory.gpus() if gpu.uuid == share.uuid), 0)
    return Placement(share, total, detect_mps(mps_pipe_directory))


def enforcement_note(metadata: Metadata, mps: Mps | None) -> str:
    """How the share is held to, said once when the instance gets it."""
    if mps is not None:
        return f"memory and compute capped by MPS ({mps.pipe_directory}); NVML watched as well"
    note = "memory watched through NVML (soft: evicted when over its share by more than 5% for two periods)"
    if metadata.gpu_core_percentage is not None:
        note += f"; gpu_core_percentage {metadata.gpu_core_percentage} is NOT enforced (no MPS control daemon on this node)"
    return note


def is_vllm(spec: ServiceSpec) -> bool:
    """Whether `berth boot` runs vLLM for this spec (its command runs vLLM's server)."""
    from serving.vllm import VllmCommandError, parse_command

    container = spec.container
    if not container.bootstrap or not container.command:
        return False
    try:
        return parse_command(container.command) is not None
    except VllmCommandError:
        return False


# --- one vLLM start at a time per GPU ---------------------------------------------------------


@dataclass
class _Turn:
    key: str
    settled: Callable[[], bool]
    granted_at: float | None = None
    timeout_s: float = 0.0


@dataclass
class StartQueue:
    """vLLM engines sharing a GPU start one after another: vLLM sizes its KV cache from the free
    memory it sees at start, so two starting together both count the other's memory as free
    (vLLM issue 55827). The next starts once the previous is Ready, has failed, or has had its
    start timeout. Waiting is first come, first served per GPU."""

    poll_s: float = 0.1
    _queues: dict[str, list[_Turn]] = field(default_factory=dict)

    async def wait_turn(self, uuid: str, key: str, *, settled: Callable[[], bool], timeout_s: float,
                        waiting: Callable[[str], None]) -> None:
        """Return when `key` may start on GPU `uuid`; `waiting(holder)` once while it waits.
        `settled()` says when this start no longer holds the others back."""
        queue = self._queues.setdefault(uuid, [])
        queue[:] = [turn for turn in queue if turn.key != key]  # a restart's earlier turn is over
        mine = _Turn(key, settled, timeout_s=timeout_s)
        queue.append(mine)
        told = False
        try:
            while True:
                now = time.monotonic()
                queue[:] = [turn for turn in queue if turn is mine or not _over(turn, now)]
                if queue[0] is mine:
                    mine.granted_at = now
                    return
                if not told:
                    waiting(queue[0].key)
                    told = True
                await asyncio.sleep(self.poll_s)
        except BaseException:
            if mine in queue:
                queue.remove(mine)
            raise


def _over(turn: _Turn, now: float) -> bool:
    return turn.granted_at is not None and (turn.settled() or now - turn.granted_at > turn.timeout_s)


# --- the soft memory watch --------------------------------------------------------------------


@dataclass(frozen=True)
class Excess:
    key: str
    used_bytes: int
    share_bytes: int
    uuid: str

    @property
    def message(self) -> str:
        over = self.used_bytes / self.share_bytes - 1
        return (f"uses {self.used_bytes / 2**30:.2f} GiB of GPU {self.uuid}, {over:.0%} over its share of "
                f"{self.share_bytes / 2**30:.2f} GiB (metadata.gpu_memory) for {PERIODS_OVER_TO_EVICT} checks in a row; "
                "raise gpu_memory or lower the engine's memory use")


def used_by_instance(gpus: Iterable[Gpu], owners: Mapping[str, str], owner_of_pid: Callable[[int], str | None]
                     ) -> dict[str, int]:
    """NVML's per-process used memory summed per holder: `owners` maps a runtime id (container
    or process record) to its holder key, `owner_of_pid` a host PID to a runtime id."""
    used: dict[str, int] = {}
    for gpu in gpus:
        for process in gpu.processes:
            holder = owners.get(owner_of_pid(process.pid) or "")
            if holder is not None and process.used_memory_bytes is not None:
                used[holder] = used.get(holder, 0) + process.used_memory_bytes
    return used


@dataclass
class MemoryWatch:
    """Counts, per holder, the checks in a row its NVML-measured use was over its share."""

    _over: dict[str, int] = field(default_factory=dict)

    def check(self, shares: Mapping[str, GpuShare], used: Mapping[str, int]) -> list[Excess]:
        """The holders to evict now; a holder evicted (or back under) starts counting again."""
        evict = []
        for key, share in shares.items():
            measured = used.get(key, 0)
            if measured > share.memory_bytes * (1 + OVER_SHARE_TOLERANCE):
                self._over[key] = self._over.get(key, 0) + 1
            else:
                self._over.pop(key, None)
            if self._over.get(key, 0) >= PERIODS_OVER_TO_EVICT:
                evict.append(Excess(key, measured, share.memory_bytes, share.uuid))
                del self._over[key]
        for key in [key for key in self._over if key not in shares]:
            del self._over[key]
        return evict
