"""The node operator's configuration of `berth agent`: a JSON file, then BERTH_* variables, then flags.

Every timing the agent uses lives in `Timings`, so tests and benchmarks run with short values
and an operator can tune each one. Defaults follow the kubelet and Nomad's Docker driver (see
/work/shared/anchors.md); where berth differs, the field says why.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.imagegc import DEFAULT_HIGH_THRESHOLD_PERCENT, DEFAULT_LOW_THRESHOLD_PERCENT, DEFAULT_MIN_AGE_S, ImageGcPolicy
from agent.logs import DEFAULT_LOG_MAX_FILES, DEFAULT_LOG_MAX_SIZE_BYTES
from bootstrap.errors import UsageError
from bootstrap.jsonfile import read_json_object

DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_STATE_DIR = Path("/var/lib/berth")
DEFAULT_CACHE_DIR = Path("/var/cache/berth")
ENV_PREFIX = "BERTH_"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timings(_Model):
    """Seconds, all of them."""

    start_probe_period_s: float = Field(0.1, gt=0, description="how often /ready is asked while an instance starts")
    probe_period_s: float = Field(10, gt=0, description="readiness/liveness period when the spec gives none (Kubernetes)")
    probe_timeout_s: float = Field(1, gt=0, description="probe timeout when the spec gives none (Kubernetes)")
    probe_failure_threshold: int = Field(3, ge=1, description="failures in a row when the spec gives none (Kubernetes)")
    backoff_initial_s: float = Field(10, ge=0, description="first restart delay (kubelet)")
    backoff_max_s: float = Field(300, ge=0, description="restart delay cap (kubelet)")
    backoff_reset_s: float = Field(600, ge=0, description="healthy time after which the delay starts over (kubelet)")
    stray_grace_s: float = Field(300, ge=0, description="age before an unknown berth container is removed (Nomad)")
    reaper_period_s: float = Field(300, gt=0, description="how often strays are looked for (Nomad)")
    state_check_period_s: float = Field(5, gt=0, description="how often the agent checks its state database is still on disk")
    # Nomad's 5 min overall pull timeout is too short for 20 GB LLM images on a slow link; the
    # stall timeout catches a dead pull anyway.
    pull_stall_timeout_s: float = Field(120, gt=0, description="no pull progress for this long aborts the pull (Nomad)")
    pull_timeout_s: float = Field(1800, gt=0, description="a pull taking longer than this fails")
    pull_progress_period_s: float = Field(10, gt=0, description="how often pull progress is reported (Nomad)")
    pull_retries: int = Field(3, ge=0, description="retries of a pull after a transient registry error")
    pull_retry_delay_s: float = Field(2, ge=0, description="first delay between pull retries, doubled each time")
    process_poll_s: float = Field(0.2, gt=0, description="how often the process runtime checks its processes")
    exit_log_lines: int = Field(20, ge=0, description="last log lines kept with an instance's exit")
    eviction_period_s: float = Field(10, gt=0, description="how often instances' disk use is measured (kubelet housekeeping)")
    eviction_grace_s: float = Field(1, ge=0, description="SIGTERM-to-SIGKILL grace of an evicted instance")
    image_gc_period_s: float = Field(300, gt=0, description="how often the image filesystem is checked (kubelet)")
    gpu_check_period_s: float = Field(60, gt=0, description="how often instances with GPUs check they still see them")
    gpu_watch_period_s: float = Field(5, gt=0, description="how often NVML's per-process memory is held against GPU shares")
    # Kubernetes' progressDeadlineSeconds: a new instance not Ready by then pauses the rollout.
    rollout_ready_timeout_s: float = Field(600, gt=0, description="time a new instance of a rollout has to become Ready")


class AgentConfig(_Model):
    listen: str = Field(DEFAULT_LISTEN, description="HOST:PORT, or unix:/path/to.sock")
    state_dir: Path = DEFAULT_STATE_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR
    runtime: Literal["auto", "docker", "process"] = "auto"
    network: Literal["bridge", "host"] = "bridge"
    host_ip: str = Field("127.0.0.1", description="host address the instances' ports are published on")
    insecure_listen: bool = Field(False, description="allow a TCP address off loopback without TLS (the token crosses the "
                                                     "network in clear)")
    tls_cert: Path | None = Field(None, description="PEM certificate: the API is served over HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    max_spec_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                                description="largest request body the API reads (413 beyond); EAS's gateway allows 1 MB")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every instance; wins over a "
                                                                  "spec's variable of the same name")
    env_for: dict[str, dict[str, str]] = Field(
        default_factory=dict, description='environment for one service only, e.g. {"qwen": {"OSS_ACCESS_KEY_ID": "..."}}, '
                                          "so one service's credentials are not every service's; wins over env")
    allow_host_paths: list[str] = Field(
        default_factory=list,
        description="roots under which `local` paths (and `server:/path` roots for `nfs`) may be mounted",
    )
    read_only_mounts: list[str] = Field(
        default_factory=list, description="HOST[:CONTAINER] paths mounted read-only into every instance"
    )
    process_mount_roots: list[str] = Field(
        default_factory=list,
        description="process runtime only: host directories where a spec's mount_path may be linked or mounted besides "
                    "the instance's own directory (<state_dir>/mounts/SERVICE), e.g. /mnt/data for EAS configs as they are",
    )
    registry_mirrors: dict[str, list[str]] = Field(
        default_factory=dict, description='registry -> mirrors tried first, e.g. {"docker.io": ["mirror:5000"]}'
    )
    registry_auth: dict[str, str] = Field(
        default_factory=dict, description="registry -> 'user:password' (or its base64), used when a spec has no dockerAuth"
    )
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    allow_fuse: bool = Field(False, description="allow /dev/fuse and SYS_ADMIN for `fuse` object-store mounts")
    gpu_inventory_file: Path | None = Field(
        None, description="a recorded GPU inventory (JSON, as `python -m agent.gpus` prints) instead of NVML")
    mps_pipe_directory: str | None = Field(
        None, description="the MPS control daemon's pipe directory (default: CUDA_MPS_PIPE_DIRECTORY, else /tmp/nvidia-mps); "
                          "where its control pipe exists, GPU shares are also capped by MPS")
    log_max_size_bytes: int = Field(DEFAULT_LOG_MAX_SIZE_BYTES, ge=1, description="container log size before rotation (kubelet)")
    log_max_files: int = Field(DEFAULT_LOG_MAX_FILES, ge=1, description="log files kept per container (kubelet)")
    image_gc_high_threshold_percent: float = Field(DEFAULT_HIGH_THRESHOLD_PERCENT, gt=0, le=100,
                                                   description="image filesystem use that starts image GC (kubelet)")
    image_gc_low_threshold_percent: float = Field(DEFAULT_LOW_THRESHOLD_PERCENT, ge=0, lt=100,
                                                  description="image filesystem use image GC frees down to (kubelet)")
    image_gc_min_age_s: float = Field(DEFAULT_MIN_AGE_S, ge=0, description="unused images younger than this are kept (kubelet)")
    image_gc_repositories: list[str] = Field(
        default_factory=list, description="patterns (fnmatch) of the image references GC may remove; empty: every image "
                                          "(kubelet), e.g. ['registry.local:5000/*'] on a node shared with other software")
    gateway: str = Field(
        "127.0.0.1:7080", description="HOST:PORT of the node gateway the agent starts (port 0 picks a free one), 'off', "
                                      "or 'external' (a gateway under its own unit; the agent only publishes routes)")
    gateway_admin: str = Field("127.0.0.1:7081", description="HOST:PORT of the gateway's metrics, health and routes")
    # Every 2 s, as Knative's autoscaler ticks (the HPA's loop is 15 s); metrics averaged over 30 s,
    # half of Knative's 60 s stable window: berth has no panic mode, so it reacts sooner by default.
    autoscale_period_s: float = Field(2, gt=0, description="how often autoscaled services' counts are decided, and cron jobs fired")
    metric_window_s: float = Field(30, gt=0, description="the window autoscaling metrics are averaged over")
    timings: Timings = Field(default_factory=Timings)

    @field_validator("gateway", "gateway_admin")
    @classmethod
    def _gateway(cls, value: str, info) -> str:
        if info.field_name == "gateway" and value in ("off", "external"):
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (port 0 picks a free one)"
                             + (", 'off' or 'external'" if info.field_name == "gateway" else ""))
        return value

    @property
    def gateway_managed(self) -> bool:
        """The agent starts (or finds) the gateway itself."""
        return self.gateway not in ("off", "external")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value[5:].startswith("/"):
                raise ValueError(f"{value!r}: give an absolute socket path, e.g. unix:/run/berth/agent.sock")
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:7070) or unix:/path")
        return value

    @field_validator("process_mount_roots")
    @classmethod
    def _absolute_roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if not root.startswith("/") or root.rstrip("/") == "":
                raise ValueError(f"{root!r} must be an absolute directory other than /")
        return value

    @model_validator(mode="after")
    def _listen_safely(self) -> "AgentConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give tls_cert and tls_key together (--tls-cert FILE --tls-key FILE)")
        host = self.listen.rpartition(":")[0].strip("[]")
        if not self.listen.startswith("unix:") and not is_loopback(host) and self.tls_cert is None and not self.insecure_listen:
            raise ValueError(f"listen {self.listen} is off loopback without TLS: the token (root on this node) would cross "
                             "the network in clear; give --tls-cert FILE --tls-key FILE, or --insecure-listen to accept that")
        return self

    @field_validator("allow_host_paths")
    @classmethod
    def _roots(cls, value: list[str]) -> list[str]:
        for root in value:
            path = root.split(":", 1)[1] if ":" in root and not root.startswith("/") else root
            if not path.startswith("/"):
                raise ValueError(f"{root!r} must be an absolute path (or server:/path for NFS)")
        return value

    @model_validator(mode="after")
    def _gc_thresholds(self) -> "AgentConfig":
        self.image_gc_policy  # raises ValueError naming the settings when low >= high
        return self

    @property
    def image_gc_policy(self) -> ImageGcPolicy:
        return ImageGcPolicy(self.image_gc_high_threshold_percent, self.image_gc_low_threshold_percent, self.image_gc_min_age_s,
                             tuple(self.image_gc_repositories))

    @property
    def token_path(self) -> Path:
        return self.state_dir / "token"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "state.db"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


# Flags and BERTH_* variables that map onto one config field each; lists are comma-separated
# in the environment. `env` has no variable: values may hold commas, so it comes by file or flag.
SCALAR_FIELDS = ("listen", "state_dir", "cache_dir", "runtime", "network", "host_ip", "image_pull_policy", "gpu_inventory_file",
                 "insecure_listen", "tls_cert", "tls_key", "max_spec_bytes", "gateway", "gateway_admin")
LIST_FIELDS = ("allow_host_paths", "read_only_mounts", "process_mount_roots")


def load_config(path: Path | None, overrides: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> AgentConfig:
    """The file (if any), then BERTH_* variables, then `overrides` (flags), each over the last.

    Raises UsageError naming the file or variable and the field at fault.
    """
    data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        data = read_json_object(path, "the agent config")
    for name in SCALAR_FIELDS:
        if (value := environ.get(ENV_PREFIX + name.upper())) is not None:
            data[name] = value
    for name in LIST_FIELDS:
        if value := environ.get(ENV_PREFIX + name.upper()):
            data[name] = [item for item in value.split(",") if item]
    for name, value in overrides.items():
        if value in (None, [], {}):
            continue
        if name in ("env", "allow_host_paths", "read_only_mounts") and name in data:
            value = {**data[name], **value} if isinstance(value, dict) else [*data[name], *value]
        data[name] = value
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors(include_url=False)
        )
        raise UsageError(f"agent config ({source}, BERTH_* variables, flags): {problems}") from None
