"""The prepare phase of `berth boot`: storage and third-party libraries, before the child runs.

`prepare()` is a coroutine so that SIGTERM can cancel it at any point: each step is async
(subprocesses and downloads are awaited), and cancellation stops the work in flight.
Every step is timed through `Prepare.report(step, seconds)`, which the bootstrap shows in
/status and the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from bootstrap.spec import ServiceSpec, Storage

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
    if entry.local is not None or entry.nfs is not None:
        # The agent bind-mounts these host paths; here we only check they arrived.
        if not target.is_dir():
            raise PrepareError(f"storage {entry.mount_path}: not mounted (the agent should bind-mount the {entry.kind} path here)")
        if not os.access(target, os.R_OK | os.X_OK):
            raise PrepareError(f"storage {entry.mount_path}: not readable by uid {os.getuid()}")
        return
    if entry.empty_dir is not None:
        target.mkdir(parents=True, exist_ok=True)
        return
    raise PrepareError(f"storage {entry.mount_path}: {entry.kind} storage is not supported by this berth yet")


async def _pip_install(ctx: PrepareContext) -> None:
    prepare_spec = ctx.spec.container.prepare
    args = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
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
