"""The prepare phase of `berth boot`: storage and third-party libraries, before the child runs.

`prepare()` is a coroutine so that SIGTERM can cancel it at any point: each step is async
(subprocesses and downloads are awaited), and cancellation stops the work in flight.
Every step is timed through `Prepare.report(step, seconds)`, which the bootstrap shows in
/status and the log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bootstrap import cache as node_cache
from bootstrap import fuse, objectstore
from bootstrap.download import DownloadError, TransferSettings, fetch_all
from bootstrap.progress import Progress
from bootstrap.spec import ObjectStore, ServiceSpec, Storage
from bootstrap.units import format_bytes, parse_quantity

log = logging.getLogger("berth.prepare")

DEFAULT_CACHE_DIR = Path("/var/cache/berth")


class PrepareError(Exception):
    """berth's own preparation failed (storage, pip): the boot exits 3 and launches nothing."""


@dataclass
class PrepareContext:
    spec: ServiceSpec
    cache_dir: Path = DEFAULT_CACHE_DIR
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    report: Callable[[str, float], None] = lambda step, seconds: None
    # Download tuning; None reads BERTH_DOWNLOAD_* from env (see download.TransferSettings).
    transfer: TransferSettings | None = None
    # The Python that pip installs into: the image's own.
    python: str = sys.executable
    progress_interval: float = 5.0


async def prepare(ctx: PrepareContext) -> None:
    """Mount every storage entry, then install the spec's Python requirements."""
    for entry in ctx.spec.storage:
        await _timed(ctx, f"storage {entry.mount_path}", _mount(ctx, entry))
    requirements = ctx.spec.container.prepare
    if requirements.python_requirements or requirements.python_requirements_path:
        await _timed(ctx, "pip", _pip_install(ctx))


async def _timed(ctx: PrepareContext, step: str, work) -> None:
    started = time.monotonic()
    log.info("%s: started", step)
    await work
    seconds = time.monotonic() - started
    ctx.report(step, seconds)
    log.info("%s: done in %.2f s", step, seconds)


async def _mount(ctx: PrepareContext, entry: Storage) -> None:
    target = Path(entry.mount_path)
    store = entry.object_store
    if store is not None:
        try:
            location = objectstore.resolve(store, ctx.env)
        except objectstore.ObjectStoreError as exc:
            raise PrepareError(f"storage {entry.mount_path}: {exc}") from None
        if store.effective_mode == "fuse":
            await _fuse_mount(entry, location, store)
        else:
            await _cache_mount(ctx, entry, location)
        return
    if entry.local is not None or entry.nfs is not None:
        # The agent bind-mounts these host paths; here we only check they arrived.
        if not target.is_dir():
            raise PrepareError(f"storage {entry.mount_path}: not mounted (the agent should bind-mount the {entry.kind} path here)")
        if not os.access(target, os.R_OK | os.X_OK):
            raise PrepareError(f"storage {entry.mount_path}: not readable by uid {os.getuid()}")
        return
    if entry.empty_dir is not None:
        await _empty_dir(entry)
        return
    raise PrepareError(f"storage {entry.mount_path}: {entry.kind} storage is not supported by this berth yet")


async def _fuse_mount(entry: Storage, location: objectstore.Location, store: ObjectStore) -> None:
    try:
        await asyncio.to_thread(fuse.mount, location, Path(entry.mount_path), read_only=store.read_only)
    except fuse.FuseUnavailable as exc:
        raise PrepareError(f"storage {entry.mount_path}: {exc}") from None


async def _cache_mount(ctx: PrepareContext, entry: Storage, location: objectstore.Location) -> None:
    """Materialize the prefix in the node cache, then point mount_path at it (no second copy)."""
    settings = ctx.transfer or _settings_from_env(ctx.env)
    shared = [p.strip() for p in ctx.env.get("BERTH_CACHE_SHARED_PREFIXES", "").split(",") if p.strip()]
    cache = node_cache.NodeCache(ctx.cache_dir, node_cache.namespace_for(ctx.spec.name, location.url, shared))
    where = f"storage {entry.mount_path}"
    try:
        async with objectstore.client(location, max_connections=settings.concurrency) as s3:
            objects = await objectstore.list_objects(s3, location, attempts=settings.attempts, backoff=settings.backoff)
            if not objects:
                raise PrepareError(f"{where}: {location.url} holds no objects; check the bucket and prefix")
            entries = node_cache.tree_entries(location, objects)
            tree_key = cache.tree_key(location, entries)
            cache.lease(tree_key)  # before looking: eviction elsewhere cannot take it from here on
            tree = cache.find_tree(tree_key)
            if tree is not None:
                log.info("%s: %s is cached (%d files, %s); nothing to download", where, location.url,
                         len(entries), format_bytes(sum(e.obj.size for e in entries)))
            else:
                tree = await _fill(ctx, cache, s3, location, entries, tree_key, settings)
    except objectstore.ObjectStoreError as exc:
        raise PrepareError(f"{where}: {exc}") from None
    except DownloadError as exc:
        raise PrepareError(f"{where}: download failed: {exc}") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # Someone else filled the disk meanwhile; what was fetched stays for the next try.
        raise PrepareError(f"{where}: the node cache's disk filled up during the download of {location.url}: "
                           f"{_free_bytes(ctx.cache_dir)} bytes free on {ctx.cache_dir}") from None
    _point(Path(entry.mount_path), tree)


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


async def _fill(ctx: PrepareContext, cache: node_cache.NodeCache, s3, location: objectstore.Location,
                entries: list[node_cache.TreeEntry], tree_key: str, settings: TransferSettings) -> Path:
    missing = [e for e in entries if not cache.has_blob(cache.blob_key(location, e.obj), e.obj.size)]
    incoming = sum(e.obj.size for e in missing)
    budget = ctx.env.get("BERTH_CACHE_MAX_SIZE")
    if budget:
        cache.evict(parse_quantity(budget), incoming)
    # Refused before a byte is written: a half-filled disk would hurt every service on the node.
    needed = sum(cache.bytes_needed(cache.blob_key(location, e.obj), e.obj.size) for e in missing)
    free = _free_bytes(ctx.cache_dir)
    if needed > free:
        raise PrepareError(f"the node cache {ctx.cache_dir} needs {needed} bytes ({format_bytes(needed)}) for "
                           f"{location.url}, and its disk has {free} bytes ({format_bytes(free)}) free: free space "
                           f"there, or cap the cache with BERTH_CACHE_MAX_SIZE so that old models are evicted")
    log.info("%s: %d of %d files to download (%s), %d parts in flight at most, %s parts",
             location.url, len(missing), len(entries), format_bytes(incoming), settings.concurrency,
             format_bytes(settings.part_size))
    async with cache.filling():
        progress = Progress(f"download {location.url}", incoming, len(missing), interval=ctx.progress_interval)
        async with progress:
            fetched = await fetch_all(s3, location, [e.obj for e in missing], cache, settings, progress)
        if any(new.etag != e.obj.etag for new, e in zip(fetched, missing)):
            # An object changed during the download: the tree is the listing actually fetched.
            replaced = {new.key: new for new in fetched}
            entries = [node_cache.TreeEntry(e.path, replaced.get(e.obj.key, e.obj)) for e in entries]
            tree_key = cache.tree_key(location, entries)
            cache.lease(tree_key)
        return cache.build_tree(tree_key, location, entries)


def _settings_from_env(env: Mapping[str, str]) -> TransferSettings:
    try:
        return TransferSettings.from_env(env)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None


def _point(mount_path: Path, tree: Path) -> None:
    """Make mount_path a symlink to the read-only tree, replacing an empty directory or old link."""
    mount_path.parent.mkdir(parents=True, exist_ok=True)
    if mount_path.is_dir() and not mount_path.is_symlink():
        if any(mount_path.iterdir()):
            raise PrepareError(f"storage {mount_path}: the directory is not empty; choose another mount_path")
        try:
            mount_path.rmdir()
        except OSError as exc:  # a mount point (a volume): bind the tree over it instead
            _bind(tree, mount_path, exc)
            return
    staging = mount_path.with_name(f".{mount_path.name}.berth-link")
    staging.unlink(missing_ok=True)
    staging.symlink_to(tree, target_is_directory=True)
    os.replace(staging, mount_path)


def _bind(tree: Path, mount_path: Path, why: OSError) -> None:
    import subprocess

    result = subprocess.run(["mount", "--bind", "-o", "ro", str(tree), str(mount_path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise PrepareError(
            f"storage {mount_path}: cannot replace it with a link to the cache ({why.strerror}) "
            f"nor bind-mount over it ({result.stderr.strip() or 'mount failed'}); do not declare it as a volume"
        )


async def _empty_dir(entry: Storage) -> None:
    target = Path(entry.mount_path)
    target.mkdir(parents=True, exist_ok=True)
    spec = entry.empty_dir
    if not spec.in_memory or os.path.ismount(target):
        return
    if any(target.iterdir()):
        raise PrepareError(f"storage {entry.mount_path}: the directory is not empty and a tmpfs would hide its files; "
                           "choose another mount_path")
    options = "mode=1777" + (f",size={parse_quantity(spec.size_limit)}" if spec.size_limit is not None else "")
    process = await asyncio.create_subprocess_exec(
        "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        # Without CAP_SYS_ADMIN the directory stays on disk: slower, but the app still runs.
        log.warning("storage %s: medium memory needs CAP_SYS_ADMIN for a tmpfs (%s); using a plain directory",
                    entry.mount_path, err.decode(errors="replace").strip())


async def _pip_install(ctx: PrepareContext) -> None:
    prepare_spec = ctx.spec.container.prepare
    args = [ctx.python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    args += ["--cache-dir", str(ctx.cache_dir / "pip")]
    if prepare_spec.python_requirements_path:
        path = Path(prepare_spec.python_requirements_path)
        if not path.is_file():
            raise PrepareError(f"containers[0].prepare.pythonRequirementsPath: {path} does not exist")
        args += ["-r", str(path)]
    args += prepare_spec.python_requirements
    log.info("pip install %s", " ".join(prepare_spec.python_requirements) or f"-r {prepare_spec.python_requirements_path}")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(ctx.env)
    )
    try:
        output, _ = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-15:])
        raise PrepareError(f"pip install failed (exit {process.returncode}):\n{tail}")
