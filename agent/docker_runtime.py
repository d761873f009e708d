"""The `docker` runtime: instances are containers, through the Docker Engine API (the `docker` SDK).

Docker is the source of truth for what runs: everything the agent needs to find an instance
again after its own restart is in the container's labels. Restart policy is "no": restarts
are the agent's, with the kubelet's backoff, never Docker's own 100 ms -> 1 min manager.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount as DockerMount

from agent import gpus, logs
from agent.config import AgentConfig
from agent.disk import DiskUsage, QuotaSupport, measure_instance_disk, storage_quota_support
from agent.dockertime import docker_time
from agent.imagegc import GcResult, ImageGc
from agent.launch import agent_label
from agent.pull import Puller, PullError
from agent.runtime import (
    ADMIN_PORT,
    LABEL_AGENT,
    LABEL_ADMIN_PORT,
    LABEL_APP_PORT,
    LABEL_PROXY_PORT,
    LABEL_SERVICE,
    PROXY_PORT,
    ExitInfo,
    Handle,
    LaunchError,
    LaunchRequest,
)

log = logging.getLogger("berth.agent.docker")

NO_BERTH_HINT = (
    "the image has no `berth` command, which is the entrypoint of every instance: install it in the image "
    "(`pip install berth`, as images/python-inference/Dockerfile does), or set containers[0].bootstrap to false "
    "to run the image's own command without berth's readiness gate and drain"
)
SECRETS_DIR = "/run/berth"


def engine_reachable() -> bool:
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
        return True
    except DockerException:
        return False


class DockerRuntime:
    name = "docker"
    limitations: list[str] = []

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._client = docker.from_env(timeout=120)
        self._puller = Puller(lambda timeout: docker.from_env(timeout=timeout).api, config.timings, config.registry_mirrors, config.registry_auth)
        self._secrets_root = config.state_dir / "secrets"
        self._images_gc = ImageGc(self._client, config.image_gc_policy)
        self._quota: QuotaSupport | None = None  # probed at the first start that asks for a disk limit
        # Only this agent's containers: another agent on the engine (a second state directory)
        # owns its own, and this one must neither adopt nor reap them.
        self._own_labels = [LABEL_SERVICE, f"{LABEL_AGENT}={agent_label(config)}"]

    # --- images -------------------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        try:
            self._client.images.get(image)
            return True
        except ImageNotFound:
            return False

    def ensure_image(self, image: str, *, always: bool, auth: str | None, progress: Callable[[str], None]) -> None:
        if always or not self.has_image(image):
            self._puller.pull(image, auth=auth, progress=progress)

    # --- instances ----------------------------------------------------------------------------

    def start(self, request: LaunchRequest) -> Handle:
        self._remove_by_name(request.name)
        api = self._client.api
        try:
            created = api.create_container(**self._create_args(request))
        except ImageNotFound:
            raise LaunchError(f"image {request.image} is not present on the node", reason="ErrImageNeverPull") from None
        except APIError as exc:
            raise LaunchError(f"creating the container failed: {exc.explanation or exc}", permanent=True) from None
        try:
            api.start(created["Id"])
        except APIError as exc:
            message = str(exc.explanation or exc)
            if (no_gpus := gpus.explain_start_error(exc)) is not None:
                # Kept (created, never started) so `docker inspect` shows what was asked of the engine.
                raise LaunchError(str(no_gpus), permanent=True, reason="GpuRuntimeMissing", instance_id=created["Id"]) from None
            api.remove_container(created["Id"], v=True, force=True)
            if "executable file not found" in message and '"berth"' in message:
                raise LaunchError(f"{request.image}: {NO_BERTH_HINT}", permanent=True) from None
            raise LaunchError(f"starting the container failed: {message}", permanent=True) from None
        return self._handle(api.inspect_container(created["Id"]))

    def _create_args(self, request: LaunchRequest) -> dict:
        """Arguments of the Engine API's create (the low-level call: it alone sets StopTimeout)."""
        environment = dict(request.env)
        bindings: dict[int, tuple[str]] = {}
        host_mode = request.network == "host"
        if host_mode:
            environment["BERTH_LISTEN_HOST"] = request.host_ip
            environment["BERTH_ADMIN_PORT"] = str(request.admin_port)
            if request.proxy:
                environment["BERTH_PROXY_PORT"] = str(request.proxy_port)
        else:  # host ports chosen by Docker
            public = [PROXY_PORT] if request.proxy else [request.app_port]
            bindings = {port: (request.host_ip,) for port in public + ([ADMIN_PORT] if request.bootstrap else [])}
        host_config = self._client.api.create_host_config(
            port_bindings=bindings or None,
            network_mode="host" if host_mode else None,
            mounts=[self._mount(mount) for mount in request.mounts] + self._secret_mounts(request),
            restart_policy={"Name": "no"},
            shm_size=request.shm_bytes,
            mem_limit=request.memory_bytes,
            nano_cpus=int(request.cpu * 1e9) if request.cpu else None,
            device_requests=[gpus.device_request(request.gpus)] if request.gpus else None,
            log_config=logs.log_config(self._config.log_max_size_bytes, self._config.log_max_files),
            **self._quota_options(request),
            devices=["/dev/fuse:/dev/fuse:rwm"] if request.fuse else None,
            cap_add=["SYS_ADMIN"] if request.fuse else None,
            ipc_mode="host" if request.ipc_host else None,
        )
        args = dict(
            image=request.image, name=request.name, labels=request.labels, environment=environment,
            ports=list(bindings) or None, host_config=host_config, stop_signal="SIGTERM", stop_timeout=request.grace_s,
            detach=True,
        )
        if request.bootstrap:
            args["entrypoint"] = request.argv[:2]
            args["command"] = request.argv[2:] or self._image_command(request.image)
        elif request.argv:
            args["command"] = request.argv
        return args

    def _quota_options(self, request: LaunchRequest) -> dict:
        """`storage_opt size` where the engine enforces it; elsewhere the supervisor measures and evicts."""
        if request.disk_limit_bytes is None:
            return {}
        if self._quota is None:
            self._quota = storage_quota_support(self._client, request.image)
            log.info("system-disk limit: %s%s", self._quota.reason,
                     "" if self._quota.supported else "; instances are measured and evicted over their limit instead")
        return self._quota.create_options(request.disk_limit_bytes)

    def _image_command(self, image: str) -> list[str]:
        """The image's own command, run under `berth boot` when the spec gives none.

        Setting the entrypoint makes Docker drop the image's CMD, so it is passed on here.
        """
        config = self._client.images.get(image).attrs.get("Config") or {}
        own = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        if own[:2] == ["berth", "boot"]:
            own = own[2:]
        if own[:1] == ["--"]:
            own = own[1:]
        return ["--", *own] if own else []

    @staticmethod
    def _mount(mount) -> DockerMount:
        if mount.kind == "tmpfs":
            return DockerMount(mount.target, None, type="tmpfs", tmpfs_size=mount.size_bytes)
        if mount.kind == "volume":
            return DockerMount(mount.target, None, type="volume")
        if mount.kind == "nfs":
            options = f"addr={mount.nfs_server}" + (",ro" if mount.read_only else "")
            return DockerMount(mount.target, None, type="volume", read_only=mount.read_only,
                               driver_config=docker.types.DriverConfig("local", {"type": "nfs", "o": options,
                                                                                 "device": f":{mount.source}"}))
        return DockerMount(mount.target, mount.source, type="bind", read_only=mount.read_only)

    def _secret_mounts(self, request: LaunchRequest) -> list[DockerMount]:
        """Secrets as files readable by root alone, bind-mounted read-only (never env, never labels)."""
        if not request.secret_files:
            return []
        folder = self._secrets_root / request.name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        mounts = []
        for target, content in request.secret_files.items():
            path = folder / Path(target).name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            mounts.append(DockerMount(target, str(path), type="bind", read_only=True))
        return mounts

    def list(self) -> list[Handle]:
        containers = self._client.api.containers(all=True, filters={"label": self._own_labels})
        handles = []
        for summary in containers:
            try:
                handles.append(self._handle(self._client.api.inspect_container(summary["Id"])))
            except NotFound:
                continue  # removed between the listing and the inspection
        return handles

    def inspect(self, instance_id: str) -> Handle | None:
        try:
            return self._handle(self._client.api.inspect_container(instance_id))
        except NotFound:
            return None

    def _handle(self, attrs: dict) -> Handle:
        labels = attrs["Config"]["Labels"] or {}
        state = attrs["State"]
        published = attrs["NetworkSettings"].get("Ports") or {}

        def host_port(port: int) -> int | None:
            bindings = published.get(f"{port}/tcp")
            return int(bindings[0]["HostPort"]) if bindings else None

        host_mode = attrs["HostConfig"].get("NetworkMode") == "host"
        exit_info = None
        if not state["Running"]:
            exit_info = self._exit_info(attrs)
        app_port = next((int(key.split("/")[0]) for key in published if key not in (f"{PROXY_PORT}/tcp", f"{ADMIN_PORT}/tcp")), None)
        return Handle(
            id=attrs["Id"],
            labels=labels,
            running=bool(state["Running"]),
            created_at=docker_time(attrs["Created"]) or 0.0,
            host_ip=self._config.host_ip,
            proxy_port=_label_port(labels, LABEL_PROXY_PORT) if host_mode else host_port(PROXY_PORT),
            admin_port=_label_port(labels, LABEL_ADMIN_PORT) if host_mode else host_port(ADMIN_PORT),
            app_port=_label_port(labels, LABEL_APP_PORT) if host_mode else (host_port(app_port) if app_port else None),
            exit=exit_info,
        )

    def _exit_info(self, attrs: dict) -> ExitInfo:
        state = attrs["State"]
        code = state.get("ExitCode")
        oom = bool(state.get("OOMKilled"))
        reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        if state.get("Error"):
            reason = "ContainerCannotRun"
        return ExitInfo(code=code, oom=oom, reason=reason, at=docker_time(state.get("FinishedAt")) or time.time(),
                        message=state.get("Error", ""), log_tail=self._tail(attrs["Id"]))

    def _tail(self, container_id: str) -> list[str]:
        lines = self._config.timings.exit_log_lines
        if not lines:
            return []
        try:
            text = self._client.api.logs(container_id, tail=lines).decode(errors="replace")
        except DockerException:
            return []
        return text.splitlines()[-lines:]

    def stop(self, instance_id: str, grace_s: float) -> None:
        try:
            # The SDK's HTTP timeout must outlast the grace period, or it gives up first.
            self._client.api.stop(instance_id, timeout=int(grace_s))
        except NotFound:
            pass

    def remove_service(self, service: str) -> None:
        return None  # everything Docker made goes with the containers

    def remove(self, instance_id: str) -> None:
        try:
            attrs = self._client.api.inspect_container(instance_id)
            self._client.api.remove_container(instance_id, v=True, force=True)
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc.explanation):
                return  # another caller (a delete, the reaper) is removing it: the same end
            raise
        self._forget_secrets(attrs["Name"].lstrip("/"))

    def _remove_by_name(self, name: str) -> None:
        """A container left by a start the agent did not see finish (crash, kill -9) holds the name."""
        try:
            self._client.api.remove_container(name, v=True, force=True)
        except NotFound:
            pass

    def _forget_secrets(self, name: str) -> None:
        folder = self._secrets_root / name
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
            folder.rmdir()

    def logs(self, instance_id: str, *, tail: int | None, follow: bool) -> Iterator[bytes]:
        try:
            # The stream itself, not a generator around it: its close() (from another thread) ends a blocked read.
            return self._client.api.logs(instance_id, stream=True, follow=follow, tail=tail if tail is not None else "all")
        except NotFound:
            return iter(())

    def watch_exits(self, on_exit: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        """Docker's event stream, filtered to berth containers' `die`; reconnects when it breaks."""
        while not stopped():
            try:
                client = docker.from_env(timeout=None)
                events = client.api.events(decode=True, filters={"type": "container", "event": "die", "label": self._own_labels})
                for event in events:
                    on_exit(event["id"])
                    if stopped():
                        break
            except (DockerException, OSError) as exc:
                log.warning("the Docker event stream broke (%s); reconnecting", exc)
                time.sleep(1)

    def node_info(self) -> dict:
        info = self._client.info()
        images = [
            {"id": image["Id"], "tags": image.get("RepoTags") or [], "size": image.get("Size", 0),
             "created": image.get("Created")}
            for image in self._client.api.images()
        ]
        return {"engine": f"Docker {info.get('ServerVersion')}", "storage_driver": info.get("Driver"),
                "root_dir": info.get("DockerRootDir"), "images": images}

    def disk_usage(self, instance_id: str, empty_dir_paths: list[str]) -> DiskUsage | None:
        try:
            return measure_instance_disk(self._client, instance_id, empty_dir_paths)
        except NotFound:
            return None

    def instance_of_pid(self, pid: int) -> str | None:
        return gpus.container_of_pid(pid)

    def check_gpus(self, instance_id: str, uuids: list[str]) -> gpus.GpuCheck | None:
        try:
            return gpus.check_container_gpus(self._client.containers.get(instance_id), uuids)
        except NotFound:
            return None

    def collect_images(self, keep: Iterable[str]) -> GcResult:
        return self._images_gc.collect(keep)

    def close(self) -> None:
        self._client.close()


__all__ = ["DockerRuntime", "PullError", "engine_reachable"]


def _label_port(labels: dict[str, str], label: str) -> int | None:
    return int(labels[label]) if label in labels else None
