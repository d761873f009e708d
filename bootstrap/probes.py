"""Checks against the child, run from inside the container: http_get, tcp_socket, exec.

The agent never reaches into the container; it asks the bootstrap's /ready and /live, and
the bootstrap runs the spec's checks here, where the app's port and its commands are at hand.
Without a check in the spec, the child is up when it accepts a TCP connection on its port and
answers an HTTP request to `/` with any status (a 404 still means the server is up).

An answer counts only when the listener on that port belongs to the child's process tree: a
stale process, or any other local service on the port, must never make the instance Ready.
Before launch the app port must be free (`port_in_use` names who holds it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

import psutil

from bootstrap.spec import Probe
from serving import timeouts

log = logging.getLogger("berth.boot")

Check = Callable[[], Awaitable[str | None]]  # None: passed; else why it failed


async def http_get(host: str, port: int, path: str, timeout: float, *, any_status: bool = False) -> str | None:
    """GET `path`; Kubernetes' rule: 200-399 passes (with `any_status`, any answer does)."""
    try:
        async with timeouts.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: berth-probe\r\nConnection: close\r\n\r\n".encode())
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return f"GET {path} on port {port}: {_reason(exc)}"
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"GET {path} on port {port}: no HTTP answer"
    status = int(parts[1])
    if any_status or 200 <= status < 400:
        return None
    return f"GET {path} on port {port}: status {status}"


async def tcp_socket(host: str, port: int, timeout: float) -> str | None:
    try:
        async with timeouts.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return f"TCP connect to port {port}: {_reason(exc)}"
    return None


async def exec_command(argv: list[str], timeout: float) -> str | None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        async with timeouts.timeout(timeout):
            output, _ = await process.communicate()
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        process.kill()
        await process.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        return f"exec {argv[0]}: timed out after {timeout:g} s"
    if process.returncode != 0:
        last = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"exec {argv[0]}: exit code {process.returncode} {last[0]}".rstrip()
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_for(probe: Probe | None, app_port: int, host: str = "127.0.0.1", child_pid: int | None = None) -> Check:
    """The check a spec probe describes; without one, the default 'the server answers'.

    With `child_pid`, a network check passes only when the listener that answered belongs to
    that process or its descendants."""
    if probe is None:
        return _owned(app_port, child_pid, lambda: http_get(host, app_port, "/", 1.0, any_status=True))
    timeout = probe.timeout_seconds
    if probe.http_get is not None:
        action = probe.http_get
        port = action.port or app_port
        return _owned(port, child_pid, lambda: http_get(host, port, action.path, timeout))
    if probe.tcp_socket is not None:
        port = probe.tcp_socket.port or app_port
        return _owned(port, child_pid, lambda: tcp_socket(host, port, timeout))
    assert probe.exec is not None
    argv = probe.exec.argv
    return lambda: exec_command(argv, timeout)


def _owned(port: int, child_pid: int | None, check: Check) -> Check:
    if child_pid is None:
        return check

    async def owned_check() -> str | None:
        reason = await check()
        return reason if reason is not None else foreign_listener(port, child_pid)

    return owned_check


# --- who listens on a port (Linux /proc; elsewhere nothing is known and nothing is refused) ----


def _listening_inodes(port: int) -> set[int]:
    """The socket inodes listening on TCP `port` in our network namespace."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(int(fields[9]))
        except OSError:
            continue
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _describe(pid: int) -> str:
    try:
        command = " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        command = ""
    return f"pid {pid}" + (f" ({command})" if command else "")


def _holders(inodes: set[int]) -> list[int]:
    """The processes that hold any of `inodes` (those we may look at)."""
    holders = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _socket_inodes(int(name)) & inodes:
            holders.append(int(name))
    return holders


def port_in_use(port: int) -> str | None:
    """Why the app port cannot be the child's (something already listens there), or None when free."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    holders = _holders(inodes)
    who = ", ".join(_describe(pid) for pid in holders) or "a process berth may not inspect"
    return (f"the app port {port} is already in use by {who}: stop that process, or give the service another port "
            f"(containers[].port)")


def _tree_inodes(child_pid: int) -> set[int]:
    """The socket inodes the child and its descendants hold."""
    try:
        root = psutil.Process(child_pid)
        tree = [root.pid, *(proc.pid for proc in root.children(recursive=True))]
    except psutil.Error:
        return set()
    return set().union(*(_socket_inodes(pid) for pid in tree))


def child_listens(port: int, child_pid: int) -> bool:
    """Whether the child or one of its descendants listens on `port`."""
    inodes = _listening_inodes(port)
    return bool(inodes and inodes & _tree_inodes(child_pid))


def foreign_listener(port: int, child_pid: int) -> str | None:
    """Why the listener on `port` is not the child's, or None when the child's tree holds it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None  # nothing to tell (no /proc): the answer itself is all we know
    inodes -= _tree_inodes(child_pid)
    if not inodes:
        return None
    who = ", ".join(_describe(pid) for pid in _holders(inodes)) or "a process berth may not inspect"
    return f"port {port} answers, but the listener is not berth's child (pid {child_pid}): it is held by {who}"


@dataclass
class ProbeLoop:
    """One check run again and again, one attempt in flight at a time, with thresholds."""

    check: Check
    period: float
    success_threshold: int = 1
    failure_threshold: int = 3

    async def until_passing(self) -> None:
        """Return after `success_threshold` passes in a row; log the reason while it fails."""
        passes, last_reason = 0, None
        while passes < self.success_threshold:
            reason = await self.check()
            passes = passes + 1 if reason is None else 0
            if reason is not None and reason != last_reason:
                log.info("waiting for the child: %s", reason)
                last_reason = reason
            if passes < self.success_threshold:
                await asyncio.sleep(self.period)

    async def watch(self, on_verdict: Callable[[bool, str | None], None]) -> None:
        """Run forever; report pass after `success_threshold`, fail after `failure_threshold`."""
        passes = failures = 0
        while True:
            reason = await self.check()
            if reason is None:
                passes, failures = passes + 1, 0
                if passes >= self.success_threshold:
                    on_verdict(True, None)
            else:
                passes, failures = 0, failures + 1
                if failures >= self.failure_threshold:
                    on_verdict(False, reason)
            await asyncio.sleep(self.period)
