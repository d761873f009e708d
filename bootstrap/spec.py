"""The service spec: PAI-EAS's JSON service config as one pydantic model.

This module is the single source of truth for what a service config may say. The agent's
API, the CLI (`berth spec check`, `berth deploy`) and the bootstrap all parse through
`parse_spec`; nothing else reads the JSON by hand. It needs pydantic alone, so the lightest
image can import it.

Field names are EAS's own (`readOnly`, `pythonRequirements`, `dockerAuth` ...). Fields berth
adds are marked "berth extension". Unknown fields are errors that list the valid names, so a
typo never passes silently; EAS fields that mean nothing on one node are accepted with a
warning (see NOT_ON_ONE_NODE). The bootstrap parses leniently: an older image under a newer
agent warns about fields it does not know and boots anyway.
"""

from __future__ import annotations

import collections
import copy
import difflib
import json
import math
import posixpath
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    SerializationInfo,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from bootstrap import cron, units

REDACTED = "***"
DEFAULT_PORT = 8000
PROXY_PORT = 8080
ADMIN_PORT = 9090
RESERVED_PORTS = {PROXY_PORT: "the serving proxy", ADMIN_PORT: "the admin endpoint"}
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # without rpc.keepalive: LLM streams are long
DEFAULT_GRACE_S = 30
EXTRA_EPHEMERAL_STORAGE = "eas.aliyun.com/extra-ephemeral-storage"

# Upper bounds: what one node can mean. Without them `memory: 10**18` or a grace of 10**12 s
# passed validation and failed (or hung) far from the spec.
MAX_DEPTH = 32  # JSON nesting; EAS configs need 5
MAX_INSTANCES = 1000  # as the autoscaler's max
MAX_CPU = 1024  # cores
MAX_MEMORY_MB = 16 * 1024 * 1024  # 16 TiB
MAX_GPUS = 64
MAX_SHM_GB = 1024
MAX_GRACE_S = 86400  # a day
MAX_PROBE_S = 86400
MAX_THRESHOLD = 10000
MAX_QUEUE = 1_000_000
# Mount paths that would hide or expose the system a service runs on.
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
               "/boot", "/run", "/var/lib/docker")

# EAS fields that mean something only to EAS's cluster, never to one node. They are accepted,
# so configs written for EAS work unchanged, and each is named in a warning.
NOT_ON_ONE_NODE: dict[str, dict[str, str]] = {
    "": {
        "cloud": "cluster placement",
        "networking": "cluster networking",
        "sinker": "request logging to EAS's sinks",
        "labels": "EAS's service labels",
        "unit": "EAS's unit placement",
        "aimaster": "EAS's AI master",
        "confidential": "EAS's confidential computing",
        "dataset": "EAS's dataset mounts",
    },
    "metadata": {
        "workspace_id": "PAI workspaces",
        "resource": "EAS's dedicated resource groups",
        "qos": "EAS's QoS classes",
        "resource_burstable": "EAS's burstable resources",
    },
    "metadata.rpc": {
        "worker_threads": "EAS's processor threads (the proxy is asynchronous)",
    },
}

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """True for environment names whose values must never be shown."""
    return bool(SECRET_NAME.search(name))


def _reveal(info: SerializationInfo) -> bool:
    return bool(info.context and info.context.get("reveal_secrets"))


Secret = Annotated[
    SecretStr,
    PlainSerializer(
        lambda value, info: value.get_secret_value() if _reveal(info) else REDACTED,
        return_type=str,
    ),
]
def _checked_quantity(value: str | int) -> str | int:
    units.parse_quantity(value)  # raises with the accepted forms and the upper bound
    return value


Quantity = Annotated[
    Union[str, int], AfterValidator(_checked_quantity), Field(description="bytes, or a Kubernetes quantity like '100Gi'")
]
CountOrPercent = Annotated[Union[int, str], Field(description="a count, or a percentage like '25%'")]


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) != 1:
        choices = ", ".join(names[:-1]) + f" or {names[-1]}"
        raise ValueError(f"give exactly one of {choices}" + (f" (found {', '.join(given)})" if given else ""))


class SpecModel(BaseModel):
    """Base of every part of the spec: EAS names, Python names accepted in code."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", validate_default=True, allow_inf_nan=False)


# --- metadata -------------------------------------------------------------------------------


def check_name(value: str, what: str = "service") -> str:
    """A service or group name: the same rule for both, since they share one URL space."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", value):
        raise ValueError(
            f"{value!r} is not a valid {what} name: start with a lowercase letter, then use "
            "lowercase letters, digits, '-' or '_', 63 characters at most"
        )
    return value


class Rpc(SpecModel):
    keepalive: int | None = Field(None, gt=0, le=MAX_PROBE_S * 1000, description="request timeout in milliseconds")
    enable_sigterm: bool = False
    max_queue_size: int | None = Field(None, ge=0, le=MAX_QUEUE, description="requests queued beyond the concurrency limit")


class RollingStrategy(SpecModel):
    max_surge: CountOrPercent = "2%"
    max_unavailable: CountOrPercent = 0

    @field_validator("max_surge", "max_unavailable")
    @classmethod
    def _count_or_percent(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if not 0 <= value <= MAX_INSTANCES:
                raise ValueError(f"{value}: give 0 to {MAX_INSTANCES}, or a percentage like '25%'")
            return value
        if not re.fullmatch(r"\d+(\.\d+)?%", value) or float(value[:-1]) > 100:
            raise ValueError(f"{value!r} is neither a count nor a percentage between '0%' and '100%'")
        return value

    def surge(self, instances: int) -> int:
        """New instances allowed above the desired count; at least 1, as in EAS."""
        return max(1, units.resolve_count(self.max_surge, instances, round_up=True))

    def unavailable(self, instances: int) -> int:
        return units.resolve_count(self.max_unavailable, instances, round_up=False)


class EasOptions(SpecModel):
    termination_grace_period: int = Field(DEFAULT_GRACE_S, ge=0, le=MAX_GRACE_S, description="seconds from SIGTERM to SIGKILL")


class Metadata(SpecModel):
    name: str
    instance: int = Field(1, ge=0, le=MAX_INSTANCES)
    cpu: float | None = Field(None, gt=0, le=MAX_CPU, description="CPU cores")
    memory: int | None = Field(None, gt=0, le=MAX_MEMORY_MB, description="memory limit in MB (MiB)")
    gpu: int = Field(0, ge=0, le=MAX_GPUS, description="whole GPUs")
    gpu_memory: float | None = Field(
        None, gt=0, description="GB (GiB in berth, as EAS's GB) of one GPU shared with other instances; gpu then 0 or absent")
    gpu_core_percentage: int | None = Field(
        None, ge=1, le=100, description="share of that GPU's compute, 1..100; needs gpu_memory; enforced only under MPS")
    shm_size: float | None = Field(None, gt=0, le=MAX_SHM_GB, description="shared memory in GB (GiB); fractions allowed")
    rpc: Rpc = Field(default_factory=Rpc)
    rolling_strategy: RollingStrategy = Field(default_factory=RollingStrategy)
    eas: EasOptions = Field(default_factory=EasOptions)
    group: str | None = Field(None, description="service group this service joins (weight 100 unless the group's file says)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "group")

    @model_validator(mode="after")
    def _gpu_share(self) -> "Metadata":
        # EAS silently ignores the share fields when gpu > 0; here that config is an error, so
        # nobody believes an instance is limited to a share while it holds whole GPUs.
        share = [name for name in ("gpu_memory", "gpu_core_percentage") if getattr(self, name) is not None]
        if share and self.gpu > 0:
            raise ValueError(f"{' and '.join(share)} ask for a share of one GPU, gpu = {self.gpu} for whole GPUs: "
                             "give one or the other (gpu 0 or absent with a share)")
        if self.gpu_core_percentage is not None and self.gpu_memory is None:
            raise ValueError("gpu_core_percentage needs gpu_memory (the share of one GPU it applies to)")
        return self

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else units.mebibytes(self.memory)

    @property
    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else units.gibibytes(self.gpu_memory)

    @property
    def shm_bytes(self) -> int | None:
        return None if self.shm_size is None else units.gibibytes(self.shm_size)

    @property
    def request_timeout_s(self) -> float:
        return DEFAULT_REQUEST_TIMEOUT_S if self.rpc.keepalive is None else self.rpc.keepalive / 1000

    @property
    def grace_s(self) -> int:
        return self.eas.termination_grace_period


# --- containers -----------------------------------------------------------------------------


class EnvVar(SpecModel):
    name: str
    value: str = ""

    @field_validator("name")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} is not a valid environment variable name")
        if value.upper().startswith("BERTH_"):
            raise ValueError(f"{value}: BERTH_* variables are berth's own settings, set by the agent and its operator; "
                             "a spec cannot set them (use the spec's fields, or ask the operator for env_for in the agent config)")
        return value

    @field_validator("value", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        # EAS configs often carry numbers and booleans here; the environment holds strings.
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # The value itself is never echoed: it may be a secret.
        if "\n" in value or "\r" in value:
            raise ValueError("the value holds a line break, which an environment variable cannot carry safely; "
                             "put multi-line content in a file (storage) and pass its path")
        return value

    @model_serializer(mode="wrap")
    def _redact(self, handler: Any, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        if is_secret_name(self.name) and not _reveal(info):
            data["value"] = REDACTED
        return data


class Prepare(SpecModel):
    python_requirements: list[str] = Field(default_factory=list, alias="pythonRequirements")
    python_requirements_path: str | None = Field(None, alias="pythonRequirementsPath")


class HttpGet(SpecModel):
    path: str = "/"
    port: int | None = Field(None, ge=1, le=65535, description="defaults to the container's port")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        # A CR/LF here once injected a second request into the app's connection.
        if re.search(r"[\x00-\x20\x7f]", value):
            raise ValueError(f"{value!r} holds a space or a control character; give a URL path such as /health "
                             "(percent-encode what needs it)")
        return value if value.startswith("/") else "/" + value


class TcpSocket(SpecModel):
    port: int | None = Field(None, ge=1, le=65535, description="defaults to the container's port")


class ExecAction(SpecModel):
    command: list[str] | str

    @property
    def argv(self) -> list[str]:
        return ["sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)


class Probe(SpecModel):
    """One check, with Kubernetes' defaults: 0 / 10 s / 1 s / 3 failures / 1 success."""

    http_get: HttpGet | None = None
    tcp_socket: TcpSocket | None = None
    exec: ExecAction | None = None
    initial_delay_seconds: float = Field(0, ge=0, le=MAX_PROBE_S)
    period_seconds: float = Field(10, gt=0, le=MAX_PROBE_S)
    timeout_seconds: float = Field(1, gt=0, le=MAX_PROBE_S)
    failure_threshold: int = Field(3, ge=1, le=MAX_THRESHOLD)
    success_threshold: int = Field(1, ge=1, le=MAX_THRESHOLD)

    @model_validator(mode="after")
    def _one_action(self) -> "Probe":
        _exactly_one(self, ("http_get", "tcp_socket", "exec"))
        return self


PullPolicy = Literal["IfNotPresent", "Always", "Never"]


class Container(SpecModel):
    image: str
    command: str | None = None
    script: str | None = None
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    env: list[EnvVar] = Field(default_factory=list)
    prepare: Prepare = Field(default_factory=Prepare)
    startup_check: Probe | None = None
    liveness_check: Probe | None = None
    readiness_check: Probe | None = None
    # berth extensions
    image_pull_policy: PullPolicy | None = Field(None, description="berth extension; the agent's default when absent")
    bootstrap: bool = Field(True, description="berth extension; false runs the image without `berth boot`")
    proxy: bool = Field(
        True,
        description="berth extension; false runs `berth boot --no-proxy`: clients reach the app's own port "
        "(the agent publishes it instead of 8080), with readiness, warmup and drain kept",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not an image reference (e.g. 'registry:5000/team/app:1.0')")
        return value

    @field_validator("port")
    @classmethod
    def _not_reserved(cls, value: int) -> int:
        if value in RESERVED_PORTS:
            raise ValueError(f"{value} is reserved for {RESERVED_PORTS[value]}; use another port, e.g. {DEFAULT_PORT}")
        return value

    @model_validator(mode="after")
    def _command_or_script(self) -> "Container":
        if self.command is not None and self.script is not None:
            raise ValueError("give command or script, not both")
        return self

    @property
    def argv(self) -> list[str] | None:
        """The service's command line; None means the image's own CMD."""
        if self.script is not None:
            return ["sh", "-c", self.script]
        if self.command is not None:
            return ["sh", "-c", self.command]
        return None

    def env_dict(self) -> dict[str, str]:
        return {var.name: var.value for var in self.env}


# --- storage --------------------------------------------------------------------------------


class ObjectStore(SpecModel):
    """An OSS or S3 prefix. `mode` is a berth extension: cache (default when read-only) or fuse."""

    scheme: ClassVar[str] = "oss"
    path: str
    endpoint: str | None = None
    read_only: bool = Field(False, alias="readOnly")
    mode: Literal["cache", "fuse"] | None = None

    @field_validator("path")
    @classmethod
    def _url(cls, value: str) -> str:
        prefix = f"{cls.scheme}://"
        if not value.startswith(prefix) or not value[len(prefix):].split("/", 1)[0]:
            raise ValueError(f"{value!r} must look like '{prefix}bucket/prefix/'")
        return value

    @model_validator(mode="after")
    def _writable_cache(self) -> "ObjectStore":
        if self.mode == "cache" and not self.read_only:
            raise ValueError("mode 'cache' is read-only: set readOnly to true, or use mode 'fuse' to write")
        return self

    @property
    def effective_mode(self) -> str:
        return self.mode or ("cache" if self.read_only else "fuse")

    @property
    def bucket(self) -> str:
        return self.path.split("://", 1)[1].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.path.split("://", 1)[1]
        return rest.split("/", 1)[1] if "/" in rest else ""


class OssStore(ObjectStore):
    scheme: ClassVar[str] = "oss"


class S3Store(ObjectStore):
    scheme: ClassVar[str] = "s3"


class NfsMount(SpecModel):
    server: str
    path: str
    read_only: bool = Field(False, alias="readOnly")


class LocalMount(SpecModel):
    path: str
    read_only: bool = Field(True, alias="readOnly", description="a host path is mounted read-only unless this is false")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _absolute_path(value)


class EmptyDir(SpecModel):
    medium: Literal["", "memory", "Memory"] = ""
    size_limit: Quantity | None = None

    @property
    def in_memory(self) -> bool:
        return self.medium.lower() == "memory"


STORAGE_KINDS = ("oss", "s3", "nfs", "local", "empty_dir")


class Storage(SpecModel):
    mount_path: str
    oss: OssStore | None = None
    s3: S3Store | None = None
    nfs: NfsMount | None = None
    local: LocalMount | None = None
    empty_dir: EmptyDir | None = None

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        path = _absolute_path(value)
        if path == "/":
            raise ValueError("'/' cannot be a mount path; mount under a directory such as /mnt/data/")
        system = next((root for root in SYSTEM_DIRS if path == root or path.startswith(root + "/")), None)
        if system is not None:
            raise ValueError(f"{path} is (or is under) the system directory {system}, which a mount would hide or "
                             f"expose; mount under a directory such as /mnt/data/ (refused: {', '.join(SYSTEM_DIRS)})")
        return path

    @model_validator(mode="after")
    def _one_kind(self) -> "Storage":
        _exactly_one(self, STORAGE_KINDS)
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in STORAGE_KINDS if getattr(self, kind) is not None)

    @property
    def object_store(self) -> ObjectStore | None:
        return self.oss or self.s3


def _absolute_path(value: str) -> str:
    """An absolute, normalised path; a trailing '/' is dropped, nothing else is rewritten."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path (starting with '/')")
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError(f"{value!r} holds a control character")
    parts = value.rstrip("/").split("/")[1:]
    # '//' slipped past the check for '/' (POSIX keeps a leading '//'); '.' and '..' hide where a path goes.
    if value.startswith("//") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{value!r} is not normalised: write it without '//', '.' or '..'")
    return posixpath.normpath(value)


# --- the service ----------------------------------------------------------------------------


class Features(SpecModel):
    extra_ephemeral_storage: Quantity | None = Field(None, alias=EXTRA_EPHEMERAL_STORAGE)

    @property
    def disk_limit_bytes(self) -> int | None:
        value = self.extra_ephemeral_storage
        return None if value is None else units.parse_quantity(value)


class Runtime(SpecModel):
    enable_crash_block: bool = False


# --- scaling ----------------------------------------------------------------------------------

METRICS = ("qps", "concurrency", "cpu", "gpu[util]", "custom[NAME]")
METRIC_SYNONYMS = {"concurrent_requests": "concurrency"}  # the seed's name
_CUSTOM_METRIC = re.compile(r"custom\[([a-zA-Z_:][a-zA-Z0-9_:]*)\]")


class ScaleStrategy(SpecModel):
    metric_name: str = Field(alias="metricName", description="qps, concurrency, cpu, gpu[util] or custom[GAUGE]")
    threshold: float = Field(gt=0, description="target per instance: req/s, requests in flight, percent, or the gauge's value")

    @field_validator("metric_name")
    @classmethod
    def _metric(cls, value: str) -> str:
        value = METRIC_SYNONYMS.get(value, value)
        if value in METRICS[:-1] or _CUSTOM_METRIC.fullmatch(value):
            return value
        close = difflib.get_close_matches(value, list(METRICS[:-1]) + list(METRIC_SYNONYMS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown metric {value!r}; {hint}use one of {', '.join(METRICS)} (a gauge of the app's /metrics)")

    @property
    def custom_gauge(self) -> str | None:
        """The gauge's name for custom[NAME], else None."""
        match = _CUSTOM_METRIC.fullmatch(self.metric_name)
        return match.group(1) if match else None


class ScaleWindow(SpecModel):
    stabilization_window_seconds: int = Field(alias="stabilizationWindowSeconds", ge=0, le=3600)


class OnZero(SpecModel):
    scale_down_grace_period_seconds: int = Field(600, alias="scaleDownGracePeriodSeconds", ge=0, le=86400)
    scale_up_activation_replicas: int = Field(1, alias="scaleUpActivationReplicas", ge=1, le=MAX_INSTANCES)


class ScaleBehavior(SpecModel):
    # EAS's defaults: up at once, down after 5 minutes of lower recommendations
    scale_up: ScaleWindow = Field(default_factory=lambda: ScaleWindow(stabilizationWindowSeconds=0), alias="scaleUp")
    scale_down: ScaleWindow = Field(default_factory=lambda: ScaleWindow(stabilizationWindowSeconds=300), alias="scaleDown")
    on_zero: OnZero = Field(default_factory=OnZero, alias="onZero")


class Autoscaler(SpecModel):
    """EAS's `autoscaler`: instance count from metrics, between `min` and `max`."""

    min: int = Field(1, ge=0, le=1000, description="fewest instances; 0 scales to zero when idle")
    max: int = Field(ge=1, le=1000, description="most instances")
    scale_strategies: list[ScaleStrategy] = Field(default_factory=list, alias="scaleStrategies")
    # EAS's older form, {"qps": 10, "cpu": 80}: folded into scaleStrategies, never written back
    strategies: dict[str, float] | None = Field(None, exclude=True)
    behavior: ScaleBehavior = Field(default_factory=ScaleBehavior)

    @model_validator(mode="after")
    def _consistent(self) -> "Autoscaler":
        if self.strategies:
            self.scale_strategies = self.scale_strategies + [
                ScaleStrategy(metricName=name, threshold=threshold) for name, threshold in self.strategies.items()
            ]
            self.strategies = None
        if not self.scale_strategies:
            raise ValueError("give at least one strategy in scaleStrategies, e.g. [{\"metricName\": \"concurrency\", \"threshold\": 8}]")
        names = [strategy.metric_name for strategy in self.scale_strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"each metric may appear once; found {', '.join(sorted(n for n in set(names) if names.count(n) > 1))} twice")
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class ScaleJob(SpecModel):
    """One CronHPA job: at each firing of `Schedule`, the count (or the autoscaler's min) becomes TargetSize."""

    name: str = Field(alias="Name", min_length=1, max_length=63)
    schedule: Annotated[str, AfterValidator(cron.check)] = Field(alias="Schedule")
    target_size: int = Field(alias="TargetSize", ge=0, le=1000)
    time_zone: str | None = Field(None, alias="TimeZone", description="IANA name; UTC when absent")

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        cron.zone(value)
        return value


class CronScaler(SpecModel):
    """EAS's `cronscaler` (CronHPA's shape): scheduled instance counts."""

    scale_jobs: list[ScaleJob] = Field(alias="ScaleJobs", min_length=1)
    exclude_dates: list[Annotated[str, AfterValidator(cron.check)]] = Field(
        default_factory=list, alias="ExcludeDates", description="cron expressions of days on which no job fires"
    )

    @field_validator("scale_jobs")
    @classmethod
    def _distinct(cls, value: list[ScaleJob]) -> list[ScaleJob]:
        names = [job.name for job in value]
        if len(set(names)) != len(names):
            raise ValueError("each job needs its own Name")
        return value


class ServiceSpec(SpecModel):
    metadata: Metadata
    containers: list[Container]
    storage: list[Storage] = Field(default_factory=list)
    features: Features = Field(default_factory=Features)
    warm_up_data_path: str | None = None
    runtime: Runtime = Field(default_factory=Runtime)
    autoscaler: Autoscaler | None = None
    cronscaler: CronScaler | None = None
    token: Secret | None = None
    docker_auth: Secret | None = Field(None, alias="dockerAuth")

    @field_validator("containers")
    @classmethod
    def _one_container(cls, value: list[Container]) -> list[Container]:
        if not value:
            raise ValueError("give one container (with at least its image)")
        if len(value) > 1:
            raise ValueError(f"berth runs one container per service for now; found {len(value)}")
        return value

    @field_validator("storage")
    @classmethod
    def _distinct_mounts(cls, value: list[Storage]) -> list[Storage]:
        seen: set[str] = set()
        for entry in value:
            if entry.mount_path in seen:
                raise ValueError(f"mount_path {entry.mount_path!r} is used twice")
            seen.add(entry.mount_path)
        return value

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def container(self) -> Container:
        return self.containers[0]

    def to_json_dict(self, *, reveal_secrets: bool = False, exclude_secrets: bool = False) -> dict[str, Any]:
        """The normalized spec in EAS's names. Secrets are redacted unless revealed.

        `exclude_secrets` drops `token` and `dockerAuth` entirely: that form goes into
        BERTH_SPEC, which must never carry them.
        """
        data = self.model_dump(
            mode="json",
            by_alias=True,
            exclude_none=True,
            exclude={"token", "docker_auth"} if exclude_secrets else None,
            context={"reveal_secrets": reveal_secrets},
        )
        return data

    def to_json(self, **kwargs: bool) -> str:
        return json.dumps(self.to_json_dict(**kwargs), indent=2, sort_keys=False)


# --- parsing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A spec that cannot be used; `issues` names each problem with its JSON path."""

    def __init__(self, issues: list[SpecIssue], source: str | None = None, warnings: list[SpecIssue] | None = None) -> None:
        self.issues = issues
        self.source = source
        self.warnings = warnings or []
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid service spec:\n" + "\n".join(f"  {issue}" for issue in issues))


@dataclass(frozen=True)
class ParsedSpec:
    spec: ServiceSpec
    warnings: list[SpecIssue]


def parse_spec(raw: Any, *, lenient: bool = False, source: str | None = None) -> ParsedSpec:
    """Validate a service config (a dict, or JSON as text or UTF-8 bytes) into a ServiceSpec.

    Raises SpecError listing every problem with its JSON path. With `lenient`, unknown
    fields are warnings rather than errors (the bootstrap under a newer agent).
    """
    if isinstance(raw, (str, bytes)):
        raw = _loads(raw, source)
    if isinstance(raw, dict):
        raw = _older_eas_name(raw, source)
    spec, warnings = parse_document(ServiceSpec, raw, lenient=lenient, source=source)
    return ParsedSpec(spec, warnings)


def load_spec_file(path: str | Path, *, lenient: bool = False) -> ParsedSpec:
    """Read and validate a spec file; errors name the file. Decoded as the API decodes a body."""
    return parse_spec(read_document(path), lenient=lenient, source=str(path))


M = typing.TypeVar("M", bound=BaseModel)


def parse_document(
    model: type[M], raw: Any, *, lenient: bool = False, source: str | None = None, what: str = "spec"
) -> tuple[M, list[SpecIssue]]:
    """Validate a JSON document (a dict or JSON text) into `model`: the one way every berth file is read.

    Returns the model and its warnings; raises SpecError naming each problem by JSON path.
    """
    if isinstance(raw, (str, bytes)):
        raw = _loads(raw, source)
    if not isinstance(raw, dict):
        raise SpecError([SpecIssue("", f"the {what} must be a JSON object, not {type(raw).__name__}")], source)
    errors: list[SpecIssue] = []
    _screen_json(raw, "", 0, errors)
    if errors:  # what pydantic must never see: NaN, NUL, absurd depth, a key given twice
        raise SpecError(errors, source)
    warnings: list[SpecIssue] = []
    cleaned = _screen_fields(model, raw, "", warnings, errors, lenient)
    try:
        parsed = model.model_validate(cleaned)
    except ValidationError as exc:
        errors.extend(_issues_from(exc))
        parsed = None
    if errors:
        raise SpecError(errors, source, warnings)
    assert parsed is not None
    return parsed, warnings


def read_document(path: str | Path) -> bytes:
    """A file's bytes for parse_document (which decodes them as it decodes an API body); SpecError naming the file
    when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SpecError([SpecIssue("", f"cannot read the file: {exc.strerror or exc}")], str(path)) from None


class _JsonObject(dict):
    """A JSON object that remembers the keys given more than once (the last one would win silently)."""

    duplicates: list[str]


class _NonFinite(str):
    """NaN, Infinity or -Infinity as written: JSON has no such numbers, Python's decoder accepts them."""


def _object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    result = _JsonObject(pairs)
    counts = collections.Counter(key for key, _ in pairs) if len(result) < len(pairs) else {}
    result.duplicates = [key for key, count in counts.items() if count > 1]
    return result


def _loads(text: str | bytes, source: str | None) -> Any:
    """The one decoder of specs, for files, the API and BERTH_SPEC alike: UTF-8 JSON, nothing else."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError([SpecIssue("", f"not UTF-8 (byte 0x{text[exc.start]:02x} at offset {exc.start}); "
                                           "save the spec as UTF-8, JSON's encoding")], source) from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_NonFinite)
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")], source) from None
    except RecursionError:
        raise SpecError([SpecIssue("", f"nested too deeply; a spec nests at most {MAX_DEPTH} levels")], source) from None


def _screen_json(value: Any, path: str, depth: int, errors: list[SpecIssue]) -> None:
    """Refuse, by JSON path, what no field may hold: non-finite numbers, NUL bytes, deep nesting, repeated keys."""
    if depth > MAX_DEPTH:
        errors.append(SpecIssue(path, f"nested too deeply; a spec nests at most {MAX_DEPTH} levels"))
    elif isinstance(value, _NonFinite):
        errors.append(SpecIssue(path, f"{value} is not a number JSON allows; give a finite number"))
    elif isinstance(value, float) and not math.isfinite(value):
        errors.append(SpecIssue(path, "the number is too large (infinite once read); give a finite number"))
    elif isinstance(value, str) and "\x00" in value:
        errors.append(SpecIssue(path, "holds a NUL byte, which no path, command or variable can carry"))
    elif isinstance(value, dict):
        for key in getattr(value, "duplicates", []):
            errors.append(SpecIssue(f"{path}.{key}" if path else key, "given more than once; keep one (each reader "
                                    "would see a different one)"))
        for key, item in value.items():
            if "\x00" in key:
                errors.append(SpecIssue(path, "a key holds a NUL byte"))
            _screen_json(item, f"{path}.{key}" if path else key, depth + 1, errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _screen_json(item, f"{path}[{index}]", depth + 1, errors)


def _older_eas_name(raw: dict[str, Any], source: str | None) -> dict[str, Any]:
    """EAS's older image-based configs name the service at the top level: taken as metadata.name."""
    if "name" not in raw:
        return raw
    raw = copy.copy(raw)  # a copy keeps the keys the decoder saw given twice
    name = raw.pop("name")
    metadata = copy.copy(raw.get("metadata", {}))
    if not isinstance(metadata, dict):
        return raw  # reported by validation
    if "name" in metadata and metadata["name"] != name:
        raise SpecError([SpecIssue("name", f"{name!r} differs from metadata.name {metadata['name']!r}; give one name "
                                           "(metadata.name in current EAS configs)")], source)
    metadata["name"] = name
    raw["metadata"] = metadata
    return raw


def _screen_fields(
    model: type[BaseModel], data: dict[str, Any], path: str, warnings: list[SpecIssue], errors: list[SpecIssue], lenient: bool
) -> dict[str, Any]:
    """Sort the keys of `data` into known, not-on-one-node (warned, dropped) and unknown.

    Pydantic's own `extra="forbid"` error names neither the valid fields nor EAS's
    cluster-only fields, so this walk does it, recursing into nested parts with their paths.
    """
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    ignored = NOT_ON_ONE_NODE.get(path, {})
    cleaned: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key in fields:
            cleaned[key] = _screen_value(fields[key].annotation, value, where, warnings, errors, lenient)
        elif key in ignored:
            warnings.append(SpecIssue(where, f"ignored: {ignored[key]} does not apply on one node"))
        elif model is Features and key.startswith("eas.aliyun.com/"):
            warnings.append(SpecIssue(where, "ignored: this EAS feature is not supported by berth"))
        elif lenient:
            warnings.append(SpecIssue(where, "ignored: unknown to this version of berth"))
        else:
            valid = ", ".join(sorted(fields))
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            errors.append(SpecIssue(where, f"unknown field; {hint}valid fields here: {valid}"))
    return cleaned


def _screen_value(
    annotation: Any, value: Any, path: str, warnings: list[SpecIssue], errors: list[SpecIssue], lenient: bool
) -> Any:
    model = _model_in(annotation)
    if model is None:
        return value
    if isinstance(value, dict):
        return _screen_fields(model, value, path, warnings, errors, lenient)
    if isinstance(value, list) and _is_list(annotation):
        return [
            _screen_fields(model, item, f"{path}[{index}]", warnings, errors, lenient) if isinstance(item, dict) else item
            for index, item in enumerate(value)
        ]
    return value


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The spec model inside `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_list(arg) for arg in typing.get_args(annotation))
    return False


def _issues_from(exc: ValidationError) -> list[SpecIssue]:
    issues = []
    for error in exc.errors(include_url=False):
        path = _json_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required field is missing"
        elif error["type"] == "extra_forbidden":
            message = "unknown field"
        issues.append(SpecIssue(path, message))
    return issues


def _json_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith(("function-", "union[", "tagged-union[")) or part in ("str", "int", "list[str]"):
            continue  # pydantic's names for union branches are noise in a JSON path
        else:
            path += f".{part}" if path else str(part)
    return path
