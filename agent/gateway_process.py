"""The gateway as a process of its own beside the agent: found by its pidfile, started once.

`<state-dir>/gateway.pid` holds its PID and `<state-dir>/gateway.json` its addresses (both
written by the gateway once it listens). A PID counts only when that process is a berth
gateway for this state directory (its command line says so): a stale pidfile whose PID was
reused by something else is ignored. The gateway outlives the agent, so a restarted agent
finds it and starts no second one; `berth gateway stop` ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bootstrap.errors import CommandFailed

PIDFILE, ADDRESSES = "gateway.pid", "gateway.json"


@dataclass(frozen=True)
class RunningGateway:
    pid: int
    url: str
    admin_url: str


def find(state_dir: Path) -> RunningGateway | None:
    """The berth gateway of this state directory, if one runs."""
    try:
        pid = int((state_dir / PIDFILE).read_text().strip())
        addresses = json.loads((state_dir / ADDRESSES).read_text())
    except (OSError, ValueError):
        return None
    if addresses.get("pid") != pid or not _is_our_gateway(pid, state_dir):
        return None
    return RunningGateway(pid, addresses["url"], addresses["admin_url"])


def _is_our_gateway(pid: int, state_dir: Path) -> bool:
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    if "gateway" not in argv or "--state-dir" not in argv:
        return False
    given = argv[argv.index("--state-dir") + 1] if argv.index("--state-dir") + 1 < len(argv) else ""
    return Path(given).resolve() == state_dir.resolve()


def start(state_dir: Path, *, listen: str, admin: str, agent_url: str, extra: list[str] = (), timeout: float = 20.0
          ) -> RunningGateway:
    """Start `berth gateway` detached (its own session: it outlives the agent), wait until it listens."""
    log = open(state_dir / "gateway.log", "ab")
    argv = [sys.executable, "-m", "bootstrap.cli", "gateway", "--agent", agent_url, "--token-file", str(state_dir / "token"),
            "--listen", listen, "--admin", admin, "--state-dir", str(state_dir), *extra]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = find(state_dir)
        if running is not None and running.pid == process.pid:
            return running
        if process.poll() is not None:
            tail = (state_dir / "gateway.log").read_text(errors="replace").splitlines()[-5:]
            raise CommandFailed(f"the gateway exited at start (code {process.returncode}): " + " | ".join(tail))
        time.sleep(0.05)
    raise CommandFailed(f"the gateway did not listen within {timeout:.0f} s; see {state_dir / 'gateway.log'}")


def stop(state_dir: Path, timeout: float = 35.0) -> int | None:
    """SIGTERM the gateway of `state_dir` and wait for it to end (SIGKILL after `timeout`); its PID, or None."""
    running = find(state_dir)
    if running is None:
        return None
    os.kill(running.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _ended(running.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.kill(running.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    for name in (PIDFILE, ADDRESSES):
        (state_dir / name).unlink(missing_ok=True)
    return running.pid


def _ended(pid: int) -> bool:
    """Gone, or a zombie: it has exited, and only its parent (an agent that started it) has yet to collect it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
