"""From a service spec and the operator's policy to a runtime-neutral `LaunchRequest`.

`check_policy` is what the agent refuses at deploy time (each issue with its JSON path);
`build_request` is what one instance gets. Secrets reach the instance as files (the token)
or as the operator's own environment, never inside BERTH_SPEC and never in labels.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
from typing import Iterable

from agent import runtime as rt
from agent.config import AgentConfig
from agent.gpu_share import Placement
from bootstrap import cache, units
from bootstrap.spec import ServiceSpec, SpecIssue

TOKEN_PATH = "/run/berth/token"
SPEC_PATH = "/run/berth/spec.json"
# One environment string may hold 128 KiB (MAX_ARG_STRLEN); a larger spec failed to launch with
# "Argument list too long". Past this size the spec travels as a file that BERTH_SPEC names.
SPEC_ENV_MAX_BYTES = 32 * 1024


def _under(path: str, roots: Iterable[str]) -> bool:
    path = posixpath.normpath(path)
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in map(posixpath.normpath, roots))


def confined_path(path: str, roots: Iterable[str]) -> str | None:
    """`path` resolved on the host, or None when it, or any link on the way, leaves every allowed root.

    Strings alone are not enough: a symlink inside an allowed root that points at /etc passed a
    string comparison. Links are followed one at a time, so one that leaves the root and comes
    back is refused too (what it points at outside can change after the check).
    """
    for root in roots:
        if _under(path, [root]):
            real_root = os.path.realpath(root)
            resolved = _resolve_within(real_root, posixpath.relpath(posixpath.normpath(path), posixpath.normpath(root)))
            if resolved is not None:
                return resolved
    return None


def _resolve_within(root: str, relative: str, max_links: int = 40) -> str | None:
    current, pending = root, [part for part in relative.split("/") if part not in ("", ".")]
    while pending:
        candidate = posixpath.normpath(posixpath.join(current, pending.pop(0)))  # `current` holds no link: '..' is lexical
        if not _under(candidate, [root]):
            return None
        if not os.path.islink(candidate):
            current = candidate
            continue
        max_links -= 1
        target = posixpath.normpath(posixpath.join(current, os.readlink(candidate)))
        if max_links < 0 or not _under(target, [root]):
            return None
        current, pending = root, [part for part in posixpath.relpath(target, root).split("/") if part != "."] + pending
    return current


def refused_ports(config: AgentConfig) -> dict[int, str]:
    """Ports on this host that no spec may use as its app port: the agent's own listeners.

    A spec whose app port was the agent API's went Ready and put the API on its proxy port.
    """
    ports: dict[int, str] = {}
    if not config.listen.startswith("unix:"):
        ports[int(config.listen.rpartition(":")[2])] = "the berth agent's API"
    if config.gateway_managed:
        for address, what in ((config.gateway, "the berth gateway"), (config.gateway_admin, "the berth gateway's admin port")):
            port = int(address.rpartition(":")[2])
            if port:  # 0: a free port, picked at start
                ports[port] = what
    return ports


def service_root(config: AgentConfig, service: str) -> str:
    """The process runtime's directory for one service's mounts: berth creates it and removes it with the instance."""
    return str(config.state_dir.resolve() / "mounts" / service)


def check_policy(spec: ServiceSpec, config: AgentConfig, *, host_ports: bool, app_ports_in_use: dict[int, str],
                 gpu_capacity: int, process_runtime: bool = False, count: int | None = None) -> list[SpecIssue]:
    """What the operator's configuration forbids, each named by its JSON path and what to do.

    `count`: the instances asked (`berth scale`); by default the spec's, or its autoscaler's max.
    """
    issues: list[SpecIssue] = []
    if process_runtime:
        # No mount namespace: a mount_path is a real host path. Only berth's own directory, or
        # one the operator chose, may receive links, mounts and directories.
        own = service_root(config, spec.name)
        for index, entry in enumerate(spec.storage):
            if not _under(entry.mount_path, [own, *config.process_mount_roots]):
                issues.append(SpecIssue(
                    f"storage[{index}].mount_path",
                    f"{entry.mount_path} is a host path under the process runtime (no mount namespace); mount under "
                    f"{own}/ (berth's own, removed with the service), or the operator can allow a root with "
                    f"process_mount_roots in the agent config (allowed: {', '.join(config.process_mount_roots) or 'none'})",
                ))
    local_roots = [root for root in config.allow_host_paths if root.startswith("/")]
    nfs_roots = [root for root in config.allow_host_paths if not root.startswith("/")]
    for index, entry in enumerate(spec.storage):
        if entry.local is not None and confined_path(entry.local.path, local_roots) is None:
            issues.append(SpecIssue(
                f"storage[{index}].local.path",
                f"{entry.local.path} is not under a host path the operator allows, once symlinks are resolved "
                f"({', '.join(local_roots) or 'none allowed'}); the operator can add one with "
                "`berth agent --allow-host-path DIR`",
            ))
        if entry.nfs is not None:
            nfs = entry.nfs
            if not any(root.split(":", 1)[0] == nfs.server and _under(nfs.path, [root.split(":", 1)[1]]) for root in nfs_roots):
                issues.append(SpecIssue(
                    f"storage[{index}].nfs",
                    f"{nfs.server}:{nfs.path} is not under an NFS export the operator allows; the operator can add "
                    f"one with `berth agent --allow-host-path {nfs.server}:/export`",
                ))
        store = entry.object_store
        if store is not None and store.effective_mode == "fuse" and not config.allow_fuse:
            issues.append(SpecIssue(
                f"storage[{index}].{entry.kind}.mode",
                "fuse mounts need /dev/fuse and CAP_SYS_ADMIN, which this node's operator has not allowed "
                "(allow_fuse in the agent config); use readOnly with mode 'cache' instead",
            ))
    if spec.metadata.gpu > gpu_capacity:
        issues.append(SpecIssue("metadata.gpu", f"{spec.metadata.gpu} GPU(s) asked; this node has {gpu_capacity}"))
    if host_ports:
        port = spec.container.port
        most = count if count is not None else max(spec.metadata.instance, spec.autoscaler.max if spec.autoscaler else 1)
        if most > 1 and not spec.container.bootstrap:
            issues.append(SpecIssue(
                "metadata.instance",
                f"without berth boot (containers[0].bootstrap false) each of the {most} instances would "
                f"bind app port {port} on the host (host network or process runtime); run 1 instance here, enable the "
                "bootstrap (each instance then gets its own port as PORT), or use the bridge network",
            ))
        owner = app_ports_in_use.get(port)
        if port in refused_ports(config):
            issues.append(SpecIssue(
                "containers[0].port",
                f"app port {port} is {refused_ports(config)[port]} on this host; the proxy would republish it: pick another port",
            ))
        elif owner is not None and owner != spec.name:
            issues.append(SpecIssue(
                "containers[0].port",
                f"app port {port} is already bound on this host by service {owner!r}; pick another port",
            ))
    return issues


def free_port(host: str) -> int:
    """A port free right now on `host` (host network and process runtime pick their own ports)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def build_request(spec: ServiceSpec, revision: str, slot: int, config: AgentConfig, *, gpus: list[str],
                  host_ports: bool, share: Placement | None = None) -> rt.LaunchRequest:
    container = spec.container
    # The operator's variables win over the spec's (a spec once pointed OSS_ENDPOINT elsewhere);
    # `env_for` scopes the operator's variables to one service.
    env = {**container.env_dict(), **config.env, **config.env_for.get(spec.name, {})}
    if config.gateway != "off":
        # The gateway stops sending before SIGTERM (the drain order): 1 s is for direct clients.
        env.setdefault("BERTH_DRAIN_DELAY", "1")
    secret_files: dict[str, bytes] = {}
    spec_json = json.dumps(spec.to_json_dict(reveal_secrets=True, exclude_secrets=True))
    if len(spec_json.encode()) > SPEC_ENV_MAX_BYTES:
        secret_files[SPEC_PATH] = spec_json.encode()
        env["BERTH_SPEC"] = SPEC_PATH
    else:
        env["BERTH_SPEC"] = spec_json
    env["BERTH_CACHE_DIR"] = str(config.cache_dir)
    if spec.token is not None:
        secret_files[TOKEN_PATH] = spec.token.get_secret_value().encode()
        env["BERTH_SERVICE_TOKEN_FILE"] = TOKEN_PATH
    # The cache sits at the same paths inside as on the host, so one BERTH_CACHE_DIR fits both
    # runtimes; only this service's part of it is mounted.
    mounts = [rt.Mount(target=str(path), source=str(path)) for path in cache.instance_view(config.cache_dir, spec.name)]
    for extra in config.read_only_mounts:
        source, _, target = extra.partition(":")
        mounts.append(rt.Mount(target=target or source, source=source, read_only=True))
    local_roots = [root for root in config.allow_host_paths if root.startswith("/")]
    for entry in spec.storage:
        if entry.local is not None:
            # Resolved again at launch: a link may have changed since the deploy's check.
            source = confined_path(entry.local.path, local_roots)
            if source is None:
                raise rt.LaunchError(f"storage {entry.mount_path}: {entry.local.path} leaves the host paths the operator "
                                     "allows once symlinks are resolved", permanent=True)
            mounts.append(rt.Mount(target=entry.mount_path, source=source, read_only=entry.local.read_only))
        elif entry.nfs is not None:
            mounts.append(rt.Mount(target=entry.mount_path, source=entry.nfs.path, kind="nfs",
                                   read_only=entry.nfs.read_only, nfs_server=entry.nfs.server))
        elif entry.empty_dir is not None:
            limit = entry.empty_dir.size_limit
            mounts.append(rt.Mount(target=entry.mount_path, kind="tmpfs" if entry.empty_dir.in_memory else "volume",
                                   size_bytes=units.parse_quantity(limit) if limit is not None else None))
    fuse = any(entry.object_store is not None and entry.object_store.effective_mode == "fuse" for entry in spec.storage)
    argv = container.argv or []
    if container.bootstrap:
        argv = ["berth", "boot", *(["--", *argv] if argv else [])]
    labels = {
        rt.LABEL_SERVICE: spec.name,
        rt.LABEL_INSTANCE: str(slot),
        rt.LABEL_REVISION: revision,
        rt.LABEL_GPUS: ",".join(gpus),
        rt.LABEL_GRACE: str(spec.metadata.grace_s),
        rt.LABEL_AGENT: agent_label(config),
        rt.LABEL_SPEC: env["BERTH_SPEC"],
    }
    if share is not None:
        env.update(share.env(spec.metadata.gpu_core_percentage))
        labels[rt.LABEL_GPU_MEMORY] = str(share.share.memory_bytes)
        if share.mps is not None:
            mounts.append(rt.Mount(target=share.mps.pipe_directory, source=share.mps.pipe_directory))
    proxy = container.bootstrap and container.proxy
    proxy_port = admin_port = None
    app_port = container.port
    if host_ports and slot > 0 and container.bootstrap:
        # One host, one port per instance: the first keeps the spec's, the others get their own
        # (berth boot hands it to the command as PORT).
        app_port = free_port(config.host_ip)
        env["BERTH_PORT"] = str(app_port)
    if host_ports:
        admin_port = free_port(config.host_ip)
        labels[rt.LABEL_ADMIN_PORT] = str(admin_port)
        if proxy:
            proxy_port = free_port(config.host_ip)
            labels[rt.LABEL_PROXY_PORT] = str(proxy_port)
        else:
            labels[rt.LABEL_APP_PORT] = str(app_port)
    return rt.LaunchRequest(
        service=spec.name, slot=slot, name=container_name(spec.name, slot, revision), image=container.image, argv=argv, env=env,
        labels=labels, mounts=mounts, secret_files=secret_files, cpu=spec.metadata.cpu,
        memory_bytes=spec.metadata.memory_bytes, shm_bytes=spec.metadata.shm_bytes, gpus=gpus,
        grace_s=spec.metadata.grace_s, network="host" if host_ports else "bridge", host_ip=config.host_ip,
        app_port=app_port, bootstrap=container.bootstrap, proxy=proxy, proxy_port=proxy_port, admin_port=admin_port, fuse=fuse,
        disk_limit_bytes=spec.features.disk_limit_bytes, storage_paths=tuple(entry.mount_path for entry in spec.storage),
        ipc_host=share is not None and share.mps is not None,
    )


def agent_label(config: AgentConfig) -> str:
    """Which agent an instance belongs to: its state directory, unique on a node and readable in `docker inspect`."""
    return str(config.state_dir.resolve())


def container_name(service: str, slot: int, revision: str) -> str:
    """`berth-NAME-SLOT-REV`: the revision in the name lets a rollout start an instance's
    replacement beside it (surge) before the old one is drained."""
    return f"berth-{service}-{slot}-{revision.rsplit('-', 1)[-1][:8]}"
