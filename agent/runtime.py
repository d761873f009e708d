"""The one narrow interface between the agent and what runs instances (Docker, or local processes).

Like Nomad's driver plugins: the supervisor says what to run (`LaunchRequest`) and learns
what runs (`Handle`) and how it ended (`ExitInfo`); nothing above this module knows which
runtime it talks to. Every method is blocking; the supervisor calls them in threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol

if TYPE_CHECKING:
    from agent.disk import DiskUsage
    from agent.gpus import GpuCheck
    from agent.imagegc import GcResult

# Labels on every instance (Docker labels, or the process runtime's record).
LABEL_SERVICE = "berth.service"
LABEL_INSTANCE = "berth.instance"
LABEL_REVISION = "berth.revision"
LABEL_GPUS = "berth.gpus"
LABEL_GPU_MEMORY = "berth.gpu-memory"  # bytes of the GPU in berth.gpus booked for a share of it
LABEL_GRACE = "berth.grace"
LABEL_PROXY_PORT = "berth.proxy-port"
LABEL_ADMIN_PORT = "berth.admin-port"
LABEL_APP_PORT = "berth.app-port"  # host mode without the proxy: clients reach the app here
LABEL_AGENT = "berth.agent"  # the state directory of the agent that runs the instance
LABEL_SPEC = "berth.spec"  # the spec, secrets left out (as in BERTH_SPEC): what --recover-from-runtime rebuilds from

PROXY_PORT = 8080
ADMIN_PORT = 9090


@dataclass(frozen=True)
class Mount:
    target: str
    source: str | None = None  # host path (bind); None for an empty_dir
    kind: str = "bind"  # bind | volume (empty_dir) | tmpfs (in-memory empty_dir) | nfs
    read_only: bool = False
    size_bytes: int | None = None
    nfs_server: str | None = None


@dataclass(frozen=True)
class LaunchRequest:
    """Everything an instance needs, already checked against the operator's policy."""

    service: str
    slot: int
    name: str  # the container (or process record) name
    image: str
    argv: list[str]  # the whole command line, `berth boot -- ...` included when bootstrapped
    env: dict[str, str]
    labels: dict[str, str]
    mounts: list[Mount]
    secret_files: dict[str, bytes]  # container path -> content, delivered read-only
    cpu: float | None
    memory_bytes: int | None
    shm_bytes: int | None
    gpus: list[str]
    grace_s: int
    network: str  # bridge | host
    host_ip: str
    app_port: int
    bootstrap: bool
    proxy: bool = True  # false: `berth boot --no-proxy`, the app's port is published instead of the proxy's
    proxy_port: int | None = None  # host mode: the ports the agent chose
    admin_port: int | None = None
    fuse: bool = False
    disk_limit_bytes: int | None = None  # a hard quota where the runtime can enforce one
    storage_paths: tuple[str, ...] = ()  # every spec mount_path: what the process runtime undoes at removal
    ipc_host: bool = False  # the host's IPC namespace (MPS clients need it)


@dataclass
class ExitInfo:
    code: int | None
    oom: bool = False
    reason: str = "Error"  # Completed | Error | OOMKilled | LivenessProbeFailed | ContainerCannotRun ...
    at: float = field(default_factory=time.time)
    message: str = ""
    log_tail: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"code": self.code, "oom": self.oom, "reason": self.reason, "at": self.at, "message": self.message,
                "log_tail": self.log_tail}

    @classmethod
    def from_json(cls, data: dict) -> "ExitInfo":
        return cls(**{key: data[key] for key in ("code", "oom", "reason", "at", "message", "log_tail") if key in data})


@dataclass
class Handle:
    """One instance as the runtime sees it."""

    id: str
    labels: dict[str, str]
    running: bool
    created_at: float
    host_ip: str
    proxy_port: int | None  # None when not published (bootstrap off: app_port is)
    admin_port: int | None
    app_port: int | None = None
    exit: ExitInfo | None = None

    @property
    def service(self) -> str:
        return self.labels.get(LABEL_SERVICE, "")

    @property
    def slot(self) -> int:
        return int(self.labels.get(LABEL_INSTANCE, "-1"))

    @property
    def revision(self) -> str:
        return self.labels.get(LABEL_REVISION, "")


class LaunchError(Exception):
    """A runtime operation failed. `permanent` errors are not retried (a missing `berth`, bad config).

    `instance_id`: an instance created but not started, kept so the operator can inspect it.
    """

    def __init__(self, message: str, *, permanent: bool = False, reason: str = "ContainerCannotRun",
                 instance_id: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.reason = reason
        self.instance_id = instance_id


class Runtime(Protocol):
    name: str
    # What this runtime cannot enforce, said plainly at start and in `berth node`.
    limitations: list[str]

    def ensure_image(self, image: str, *, always: bool, auth: str | None, progress: Callable[[str], None]) -> None:
        """Make `image` present (pull when absent, or `always`). Raises PullError."""

    def has_image(self, image: str) -> bool: ...

    def start(self, request: LaunchRequest) -> Handle:
        """Create and start one instance. Raises LaunchError."""

    def list(self) -> list[Handle]:
        """Every berth instance this runtime knows, running or exited."""

    def inspect(self, instance_id: str) -> Handle | None: ...

    def stop(self, instance_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; returns once it has exited."""

    def remove(self, instance_id: str) -> None: ...

    def remove_service(self, service: str) -> None:
        """Remove what the runtime made for a service beyond its instances (once all are removed)."""

    def logs(self, instance_id: str, *, tail: int | None, follow: bool) -> Iterator[bytes]: ...

    def watch_exits(self, on_exit: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        """Block, calling `on_exit(instance_id)` within a second of each exit, until `stopped()`."""

    def node_info(self) -> dict: ...

    def disk_usage(self, instance_id: str, empty_dir_paths: list[str]) -> "DiskUsage | None":
        """What the instance occupies on the node's disk; None where this runtime cannot measure it."""

    def instance_of_pid(self, pid: int) -> str | None:
        """The instance a host PID (as NVML reports it) runs in, or None."""

    def check_gpus(self, instance_id: str, uuids: list[str]) -> "GpuCheck | None":
        """Whether the running instance still sees its GPUs; None where this runtime cannot tell."""

    def collect_images(self, keep: Iterable[str]) -> "GcResult | None":
        """Image GC when the image filesystem is past its threshold; None where there are no images."""

    def close(self) -> None: ...
