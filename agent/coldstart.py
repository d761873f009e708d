"""An instance's cold start, phase by phase: image pull, prepare (download, pip), engine start, warmup.

The agent times the pull and the whole launch-to-Ready itself; the phases inside the
container come from the bootstrap's own /status (its `phases` and `prepare_steps`), read once
when the instance turns Ready, so `berth get` and /status never disagree.
"""

from __future__ import annotations

from typing import Any

import aiohttp


async def fetch_boot_status(session: aiohttp.ClientSession, admin_url: str, timeout: float) -> dict[str, Any] | None:
    """The bootstrap's /status, or None when it cannot be read (the breakdown then shows the agent's part only)."""
    try:
        async with session.get(f"{admin_url}/status", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            return await response.json(content_type=None)
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
        return None


def breakdown(pull_s: float, ready_s: float, boot_status: dict[str, Any] | None) -> dict[str, float | None]:
    """Seconds per phase; None where a phase is unknown (no bootstrap, or its /status unreadable).

    `download_s` sums the storage steps (one per mounted object-store, local or NAS entry);
    `ready_s` is the agent's launch-to-Ready, pull included.
    """
    phases = (boot_status or {}).get("phases", {})
    steps = (boot_status or {}).get("prepare_steps", {})
    storage = [seconds for step, seconds in steps.items() if step.startswith("storage ")]
    known = boot_status is not None
    return {
        "image_pull_s": round(pull_s, 4),
        "prepare_s": phases.get("prepare"),
        "download_s": round(sum(storage), 4) if known else None,
        "pip_s": steps.get("pip", 0.0) if known else None,
        "engine_start_s": phases.get("launch"),
        "warmup_s": phases.get("warmup"),
        "ready_s": round(ready_s, 4),
    }


def summary(cold_start: dict[str, float | None]) -> str:
    """One line for people: `pull 0.0s, prepare 12.3s (download 0.1s, pip 12.0s), ...`."""

    def s(key: str) -> str:
        value = cold_start.get(key)
        return "?" if value is None else f"{value:.1f}s"

    return (f"pull {s('image_pull_s')}, prepare {s('prepare_s')} (download {s('download_s')}, pip {s('pip_s')}), "
            f"engine start {s('engine_start_s')}, warmup {s('warmup_s')}, ready {s('ready_s')}")
