"""NVIDIA GPUs on the node: the inventory, exclusive allocation by UUID, and the Docker request.

Everything is keyed on the GPU UUID: CUDA's device order can differ from NVML's index order,
and indices restart at 0 inside a container. The inventory sits behind one small interface
(`GpuInventory`): `NvmlInventory` asks the driver through NVML (the `nvidia-ml-py` package),
`RecordedInventory` reads a JSON file of the same shape (the operator setting
`gpu_inventory_file`) so machines without a GPU run the same allocation code.

Assignments are checkpointed to a JSON file with a checksum, as the kubelet's device manager
does, so an agent restart hands no GPU out twice. An instance asks either for whole GPUs
(`metadata.gpu`) or for a share of one (`metadata.gpu_memory`): shares are packed best fit by
booked memory (total minus the shares handed out) onto GPUs no instance holds whole, and a GPU
with a share is never handed out whole (agent/gpu_share.py has the rest of sharing).

`python -m agent.gpus` prints the inventory as JSON, in the recorded-inventory format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bootstrap.errors import CommandFailed, UsageError

if TYPE_CHECKING:
    import docker.types
    from docker.models.containers import Container

log = logging.getLogger("berth.agent.gpus")

CHECKPOINT_VERSION = 2  # 2 added "shares"; a version 1 file (whole GPUs only) is still read
# nvidia-smi is mounted into every container that gets a GPU through the NVIDIA Container
# Toolkit (capability "utility" is in its default set), so the check needs nothing in the image.
GPU_PROBE_COMMAND = ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"]
NVIDIA_TOOLKIT_HINT = (
    "install the NVIDIA Container Toolkit on this node, run `nvidia-ctk runtime configure --runtime=docker` "
    "and restart dockerd; on a node without GPUs, deploy with metadata.gpu = 0"
)


# --- the inventory ----------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuProcess(_Frozen):
    pid: int = Field(description="host PID, as NVML reports it")
    used_memory_bytes: int | None = None


class Gpu(_Frozen):
    uuid: str = Field(pattern=r"^(GPU|MIG)-[0-9a-fA-F-]+$")
    index: int = Field(ge=0, description="NVML's index; never use it to address the GPU")
    name: str
    memory_total_bytes: int = Field(ge=0)
    memory_used_bytes: int = Field(ge=0)
    utilization_percent: int | None = Field(None, ge=0, le=100)
    processes: tuple[GpuProcess, ...] = ()


class InventoryRecord(_Frozen):
    """What `python -m agent.gpus` prints and `gpu_inventory_file` holds."""

    driver_version: str | None = None
    gpus: tuple[Gpu, ...]


class GpuInventory(Protocol):
    """The node's GPUs, read fresh on every call (memory, utilization and processes change)."""

    def gpus(self) -> list[Gpu]: ...

    def describe(self) -> str:
        """Where the inventory comes from, for logs and `berth node`."""
        ...


class NvmlInventory:
    """The driver's view through NVML. A node without the NVIDIA driver has no GPUs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialized = False
        self._driver_version: str | None = None
        self._missing: str | None = None

    def describe(self) -> str:
        if self._missing:
            return f"NVML ({self._missing})"
        return f"NVML, driver {self._driver_version}" if self._driver_version else "NVML"

    def gpus(self) -> list[Gpu]:
        import pynvml

        if not self._init():
            return []
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                Gpu(
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=memory.total,
                    memory_used_bytes=memory.used,
                    utilization_percent=_optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    processes=_processes(handle),
                )
            )
        return found

    def record(self) -> InventoryRecord:
        gpus = self.gpus()
        return InventoryRecord(driver_version=self._driver_version, gpus=tuple(gpus))

    def _init(self) -> bool:
        import pynvml

        with self._lock:
            if self._initialized:
                return True
            try:
                pynvml.nvmlInit()
            except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded) as exc:
                # No driver is a node without GPUs, not a failure: deploys asking for GPUs are refused.
                self._missing = str(exc)
                return False
            self._initialized = True
            self._driver_version = _optional(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
            return True


def _processes(handle: object) -> tuple[GpuProcess, ...]:
    import pynvml

    seen: dict[int, GpuProcess] = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for process in _optional(lambda: query(handle)) or []:
            used = process.usedGpuMemory  # None where the driver cannot tell (NVML_VALUE_NOT_AVAILABLE)
            seen.setdefault(process.pid, GpuProcess(pid=process.pid, used_memory_bytes=used))
    return tuple(seen.values())


def _optional(read):  # noqa: ANN001, ANN202 - a tiny wrapper around one NVML query
    """NVML's answer, or None where this GPU or driver does not support the query."""
    import pynvml

    try:
        return read()
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission, pynvml.NVMLError_NotFound):
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older nvidia-ml-py returned bytes


class RecordedInventory:
    """A recorded inventory from a JSON file, for machines without a GPU (tests, dry runs).

    The file is read again when it changes, so a recorded NVML process list can change under a
    running agent (the GPU memory watch is tested that way); a rewrite that is not valid keeps
    the last good record.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._record = load_inventory_file(self.path)
        self._stamp = self._mtime()

    def describe(self) -> str:
        return f"recorded inventory {self.path}"

    def gpus(self) -> list[Gpu]:
        stamp = self._mtime()
        if stamp != self._stamp:
            try:
                self._record, self._stamp = load_inventory_file(self.path), stamp
            except UsageError as exc:
                log.warning("%s; the previous record is kept", exc)
        return list(self._record.gpus)

    def _mtime(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None


def load_inventory_file(path: Path) -> InventoryRecord:
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"gpu_inventory_file {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"gpu_inventory_file {path}: not JSON ({exc})") from None
    try:
        record = InventoryRecord.model_validate(raw)
    except ValidationError as exc:
        issues = "; ".join(f"{'.'.join(map(str, error['loc'])) or '(top)'}: {error['msg']}" for error in exc.errors())
        raise UsageError(
            f"gpu_inventory_file {path}: {issues} (write it with `python -m agent.gpus` on a GPU node)"
        ) from None
    uuids = [gpu.uuid for gpu in record.gpus]
    if len(set(uuids)) != len(uuids):
        raise UsageError(f"gpu_inventory_file {path}: a GPU UUID appears twice; each GPU must be listed once")
    return record


def open_inventory(gpu_inventory_file: str | Path | None) -> GpuInventory:
    """The recorded inventory where the operator names one, else NVML."""
    return RecordedInventory(gpu_inventory_file) if gpu_inventory_file else NvmlInventory()


# --- allocation -------------------------------------------------------------------------------


class GpusPending(Exception):
    """Too few GPUs are free right now: the instance waits in Pending with this reason."""


class GpuRequestRefused(UsageError):
    """The request can never be met on this node: the deploy is refused."""

    field = "metadata.gpu"


class GpuShare(_Frozen):
    """Part of one GPU's memory booked for one instance."""

    uuid: str
    memory_bytes: int = Field(gt=0)


class GpuAllocator:
    """Whole GPUs handed to instances by UUID, each to one instance at a time, and shares of
    GPUs packed by memory; both checkpointed."""

    def __init__(self, inventory: GpuInventory, checkpoint_path: str | Path) -> None:
        self.inventory = inventory
        self.checkpoint_path = Path(checkpoint_path)
        self._lock = threading.Lock()
        self._assignments: dict[str, tuple[str, ...]] = {}
        self._shares: dict[str, GpuShare] = {}
        self._restore()

    def check_request(self, count: int) -> None:
        """Refuse a deploy that asks for more GPUs than the node has at all."""
        gpus = self.inventory.gpus()
        if count > len(gpus):
            names = ", ".join(sorted({gpu.name for gpu in gpus})) or "none"
            raise GpuRequestRefused(
                f"metadata.gpu: asks for {count} GPU{'s' * (count != 1)} but this node has {len(gpus)} "
                f"({names}; from {self.inventory.describe()}); lower metadata.gpu or deploy to a node with more GPUs"
            )

    def allocate(self, instance_id: str, count: int) -> tuple[str, ...]:
        """UUIDs for the instance: its existing assignment, else `count` free GPUs in index order.

        Raises GpuRequestRefused when the node has fewer than `count` GPUs, GpusPending when
        enough exist but too few are free now.
        """
        if count == 0:
            return ()
        with self._lock:
            held = self._assignments.get(instance_id)
            if held is not None and len(held) == count:
                return held
            self.check_request(count)
            gpus = self.inventory.gpus()
            taken = self._holders()
            shared = {share.uuid: holder for holder, share in self._shares.items()}
            taken.update({uuid: holder for uuid, holder in shared.items() if uuid not in taken})
            free = [gpu.uuid for gpu in sorted(gpus, key=lambda gpu: gpu.index) if taken.get(gpu.uuid, instance_id) == instance_id]
            if len(free) < count:
                holders = sorted({holder for holder in taken.values() if holder != instance_id})
                raise GpusPending(
                    f"needs {count} GPU{'s' * (count != 1)}, {len(free)} of {len(gpus)} free "
                    f"(held by {', '.join(holders)}); waits until an instance releases its GPUs"
                )
            chosen = tuple(free[:count])
            self._assignments[instance_id] = chosen
            self._save()
            log.info("GPUs %s assigned to %s", ", ".join(chosen), instance_id)
            return chosen

    def allocate_share(self, instance_id: str, memory_bytes: int) -> GpuShare:
        """A share of one GPU: the instance's existing one, else the best fit by booked memory.

        Best fit (the GPU with the least room that still fits) keeps large holes for large
        requests. Raises GpuRequestRefused when no GPU of the node is that large, GpusPending
        with each GPU's free memory when none has room now.
        """
        with self._lock:
            held = self._shares.get(instance_id)
            if held is not None and held.memory_bytes == memory_bytes:
                return held
            gpus = sorted(self.inventory.gpus(), key=lambda gpu: gpu.index)
            largest = max((gpu.memory_total_bytes for gpu in gpus), default=0)
            if memory_bytes > largest:
                raise GpuRequestRefused(
                    f"metadata.gpu_memory: asks for {_gib(memory_bytes)} of one GPU but the largest GPU of this node has "
                    f"{_gib(largest)} ({self.inventory.describe()}); lower metadata.gpu_memory or deploy to a node with larger GPUs"
                )
            room = self._share_room(gpus, besides=instance_id)
            fits = [gpu for gpu in gpus if room[gpu.uuid] >= memory_bytes]
            if not fits:
                free = ", ".join(f"{_short(gpu.uuid)} {_gib(room[gpu.uuid])}" for gpu in gpus)
                raise GpusPending(f"needs {_gib(memory_bytes)} of one GPU; free: {free}; waits until an instance releases GPU memory")
            chosen = min(fits, key=lambda gpu: room[gpu.uuid])
            share = GpuShare(uuid=chosen.uuid, memory_bytes=memory_bytes)
            self._shares[instance_id] = share
            self._save()
            log.info("%s of GPU %s assigned to %s", _gib(memory_bytes), chosen.uuid, instance_id)
            return share

    def _share_room(self, gpus: Sequence[Gpu], *, besides: str) -> dict[str, int]:
        """Memory not yet booked on each GPU (0 on one held whole), leaving out `besides`'s own share."""
        whole = set(self._holders())
        room = {gpu.uuid: 0 if gpu.uuid in whole else gpu.memory_total_bytes for gpu in gpus}
        for holder, share in self._shares.items():
            if holder != besides and share.uuid in room:
                room[share.uuid] = max(0, room[share.uuid] - share.memory_bytes)
        return room

    def adopt_share(self, instance_id: str, share: GpuShare) -> None:
        """Record a share found on a running instance (its `berth.gpus` and `berth.gpu-memory` labels)."""
        with self._lock:
            whole = self._holders().get(share.uuid)
            if whole is not None and whole != instance_id:
                raise CommandFailed(
                    f"{instance_id} runs on a share of GPU {share.uuid}, which {whole} holds whole; "
                    "stop one of them (`berth rm`) so shares and whole GPUs do not mix"
                )
            self._shares[instance_id] = share
            self._save()

    def share_of(self, instance_id: str) -> GpuShare | None:
        with self._lock:
            return self._shares.get(instance_id)

    def adopt(self, instance_id: str, uuids: Sequence[str]) -> None:
        """Record an assignment found on a running container (its `berth.gpus` label)."""
        with self._lock:
            taken = self._holders()
            taken.update({share.uuid: holder for holder, share in self._shares.items()})
            clash = [uuid for uuid in uuids if taken.get(uuid, instance_id) != instance_id]
            if clash:
                raise CommandFailed(
                    f"{instance_id} runs on GPU {', '.join(clash)}, which is assigned to {taken[clash[0]]}; "
                    "stop one of them (`berth rm`) so each GPU has one holder"
                )
            self._assignments[instance_id] = tuple(uuids)
            self._save()

    def release(self, instance_id: str) -> None:
        with self._lock:
            whole, share = self._assignments.pop(instance_id, None), self._shares.pop(instance_id, None)
            if whole is not None or share is not None:
                self._save()
                log.info("GPUs of %s released", instance_id)

    def retain_only(self, instance_ids: Iterable[str]) -> None:
        """Drop assignments of instances that no longer exist (after re-adoption at start)."""
        keep = set(instance_ids)
        with self._lock:
            gone = [instance for instance in {*self._assignments, *self._shares} if instance not in keep]
            for instance in gone:
                self._assignments.pop(instance, None)
                self._shares.pop(instance, None)
            if gone:
                self._save()
                log.info("GPUs released from instances that no longer exist: %s", ", ".join(gone))

    def assignments(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self._assignments)

    def holder_of(self, uuid: str) -> str | None:
        with self._lock:
            return self._holders().get(uuid)

    def node_view(self) -> list[dict[str, object]]:
        """Each GPU for `GET /v1/node`: the inventory, the instance holding it whole or the shares
        booked on it, and the container of each process on it (NVML's host PIDs mapped through
        /proc/PID/cgroup)."""
        with self._lock:
            holders = self._holders()
            shares = dict(self._shares)
        view = []
        for gpu in self.inventory.gpus():
            on_gpu = [{"instance": holder, "memory_bytes": share.memory_bytes}
                      for holder, share in sorted(shares.items()) if share.uuid == gpu.uuid]
            booked = sum(share["memory_bytes"] for share in on_gpu)
            view.append({**_with_containers(gpu), "instance": holders.get(gpu.uuid), "shares": on_gpu,
                         "booked_bytes": booked})
        return view

    def _holders(self) -> dict[str, str]:
        return {uuid: instance for instance, uuids in self._assignments.items() for uuid in uuids}

    def _save(self) -> None:
        data = {instance: list(uuids) for instance, uuids in sorted(self._assignments.items())}
        shares = {instance: share.model_dump() for instance, share in sorted(self._shares.items())}
        body = {"version": CHECKPOINT_VERSION, "assignments": data, "shares": shares,
                "checksum": _checksum({"assignments": data, "shares": shares})}
        _write_atomically(self.checkpoint_path, json.dumps(body, indent=2) + "\n")

    def _restore(self) -> None:
        try:
            body = json.loads(self.checkpoint_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError) as exc:
            return self._set_aside(f"unreadable ({exc})")
        data = body.get("assignments") if isinstance(body, dict) else None
        shares = body.get("shares", {}) if isinstance(body, dict) else None
        summed = data if isinstance(body, dict) and body.get("version") == 1 else {"assignments": data, "shares": shares}
        if not isinstance(data, dict) or not isinstance(shares, dict) or body.get("checksum") != _checksum(summed):
            return self._set_aside("its checksum does not match its content")
        try:
            restored_shares = {instance: GpuShare.model_validate(share) for instance, share in shares.items()}
        except ValidationError:
            return self._set_aside("a share in it is malformed")
        known = {gpu.uuid for gpu in self.inventory.gpus()}
        for instance, uuids in [*data.items(), *((holder, [share.uuid]) for holder, share in restored_shares.items())]:
            missing = [uuid for uuid in uuids if uuid not in known]
            if missing:
                log.warning("%s held GPU %s, which this node no longer has; its assignment is dropped", instance, ", ".join(missing))
            elif instance in restored_shares:
                self._shares[instance] = restored_shares[instance]
            else:
                self._assignments[instance] = tuple(uuids)

    def _set_aside(self, why: str) -> None:
        # Like the kubelet: carry on with no assignments rather than refuse to start; the agent
        # rebuilds them from its containers' `berth.gpus` labels (`adopt`).
        corrupt = self.checkpoint_path.with_name(self.checkpoint_path.name + ".corrupt")
        os.replace(self.checkpoint_path, corrupt)
        log.warning("GPU checkpoint %s is %s; moved to %s, assignments rebuilt from running containers", self.checkpoint_path, why, corrupt)


def _gib(size: int) -> str:
    """GiB as the spec's gpu_memory counts them: `20 GiB`, `12.5 GiB`, `0`."""
    return f"{round(size / 2**30, 1):g} GiB" if size else "0"


def _short(uuid: str) -> str:
    """`GPU-14a03569`: enough of a UUID to tell a node's GPUs apart in one line."""
    return uuid[:12]


def _checksum(data: object) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# --- Docker -----------------------------------------------------------------------------------


def device_request(uuids: Sequence[str]) -> "docker.types.DeviceRequest":
    """The DeviceRequest for `host_config(device_requests=[...])`: these GPUs and no others.

    Device ids, never a count: Docker treats count and device_ids together as an error, and a
    count would let the runtime pick GPUs behind the allocator's back.
    """
    import docker.types

    return docker.types.DeviceRequest(driver="nvidia", device_ids=list(uuids), capabilities=[["gpu"]])


class GpuRuntimeMissing(CommandFailed):
    """The engine cannot hand GPUs to containers."""


def explain_start_error(error: Exception) -> GpuRuntimeMissing | None:
    """An actionable error for a start that failed because the engine has no NVIDIA runtime."""
    detail = str(getattr(error, "explanation", None) or error)
    if 'device driver "nvidia"' not in detail and "nvidia-container-cli" not in detail:
        return None
    return GpuRuntimeMissing(f"the Docker engine cannot give this container its GPUs ({detail.strip()}): {NVIDIA_TOOLKIT_HINT}")


# --- NVML's host PIDs -> containers -----------------------------------------------------------

# The last path component of a container's cgroup: /docker/<id> (cgroupfs), or
# docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope (systemd).
_CONTAINER_CGROUP = re.compile(r"(?:^|/)(?:[a-z]+-)*([0-9a-f]{64})(?:\.scope)?$")


def container_of_pid(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The full id of the container a host PID runs in, or None for a host process (or a gone one)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        match = _CONTAINER_CGROUP.search(path)
        if match:
            return match.group(1)
    return None


def _with_containers(gpu: Gpu) -> dict[str, object]:
    entry = gpu.model_dump(mode="json")
    for process in entry["processes"]:
        process["container"] = container_of_pid(process["pid"])
    return entry


# --- the lost-GPU check -----------------------------------------------------------------------


class GpuCheck(BaseModel):
    """The verdict of the in-container GPU check: ok, lost (recreate), or unknown (cannot tell)."""

    state: str  # "ok" | "lost" | "unknown"
    reason: str = ""


def gpu_probe_verdict(exit_code: int, output: str, expected: Sequence[str]) -> GpuCheck:
    """Read what GPU_PROBE_COMMAND printed inside a container that should see `expected`."""
    if "Unknown Error" in output:
        # After a driver or `systemctl daemon-reload`, the container's device cgroup loses the
        # GPUs: NVML fails to initialize with "Unknown Error" until the container is recreated.
        return GpuCheck(state="lost", reason=f"NVML inside the container: {output.strip()[:200]}")
    if exit_code == 127 or "executable file not found" in output or "no such file" in output.lower():
        return GpuCheck(state="unknown", reason="nvidia-smi is not in the container (started without the NVIDIA runtime?)")
    if exit_code != 0:
        return GpuCheck(state="lost", reason=f"nvidia-smi exited with {exit_code}: {output.strip()[:200]}")
    seen = {line.strip() for line in output.splitlines() if line.strip()}
    missing = [uuid for uuid in expected if uuid not in seen]
    if missing:
        return GpuCheck(state="lost", reason=f"GPU {', '.join(missing)} is not visible inside the container")
    return GpuCheck(state="ok")


def check_container_gpus(container: "Container", expected: Sequence[str]) -> GpuCheck:
    """Run the GPU check inside a running container (`docker exec`)."""
    import docker.errors

    try:
        result = container.exec_run(GPU_PROBE_COMMAND, demux=False)
    except docker.errors.APIError as exc:
        return gpu_probe_verdict(127 if "executable file not found" in str(exc) else 1, str(exc), expected)
    return gpu_probe_verdict(result.exit_code, result.output.decode(errors="replace"), expected)


# --- `python -m agent.gpus` -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m agent.gpus",
        description="Print this node's GPUs as JSON (NVML), in the format of the agent's gpu_inventory_file.",
    )
    parser.add_argument("--inventory-file", help="read a recorded inventory instead of NVML (checks the file)")
    parser.add_argument("--with-containers", action="store_true", help="also map each GPU process's host PID to its container (adds a key the inventory file does not take)")
    args = parser.parse_args(argv)
    if args.inventory_file:
        record = load_inventory_file(Path(args.inventory_file))
    else:
        inventory = NvmlInventory()
        record = inventory.record()
        if not record.gpus:
            print(f"no GPUs found: {inventory.describe()}", file=sys.stderr)
    body = record.model_dump(mode="json")
    if args.with_containers:
        body["gpus"] = [_with_containers(gpu) for gpu in record.gpus]
    print(json.dumps(body, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
