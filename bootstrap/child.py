"""The child process and the bootstrap's PID 1 duties (what tini does, inside the event loop).

The child runs in its own process group, so a stop reaches every process it spawned. Its
stdout and stderr pass through unchanged while the last lines are kept for the error shown
when it dies. Its exit is noticed through a pidfd (no SIGCHLD handler, which would fight the
event loop's own child handling); orphans re-parented to us are reaped by a periodic sweep.

The child's group dies with us even when we are SIGKILLed (the OOM killer, an operator, the
agent's SIGKILL after the grace, which reaches our group and not the child's): a watchdog
process in a session of its own holds the read end of a pipe only we can write, and kills
the child's group when the pipe reaches EOF without our "done". PR_SET_PDEATHSIG would
reach only the direct child, not the workers it forks. Inside a container, where we are
PID 1, our death ends everything anyway; the watchdog matters for the process runtime.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

import psutil

log = logging.getLogger("berth.boot")

PR_SET_CHILD_SUBREAPER = 36
TAIL_LINES = 20
# A zombie that stays this long belongs to nobody else: the event loop reaps the processes it
# spawned (pip, exec probes) at once.
ORPHAN_GRACE_S = 1.0
# The watchdog: reads the child's process group id, then waits. EOF alone (we died) kills the
# group; "done" after the id (the group ended under our eyes) lets it exit quietly.
WATCHDOG = """
import os, signal
data = b""
while chunk := os.read(0, 64):
    data += chunk
words = data.split()
if len(words) == 1:
    try:
        os.killpg(int(words[0]), signal.SIGKILL)
    except OSError:
        pass
"""


def become_subreaper() -> bool:
    """As PID 1 we adopt orphans anyway; otherwise ask Linux to re-parent them to us."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class OutputTail:
    """The last lines of the child's output, for the error message when it dies."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        self._lines: collections.deque[bytes] = collections.deque(maxlen=lines)
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            *complete, self._partial = (self._partial + data).split(b"\n")
            self._lines.extend(complete)
            self._partial = self._partial[-4096:]

    def text(self) -> str:
        with self._lock:
            lines = list(self._lines) + ([self._partial] if self._partial else [])
        return "\n".join(line.decode(errors="replace") for line in lines)


class Child:
    """The service's process: started in its own session, watched, signalled, stopped."""

    def __init__(self, process: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.process = process
        self.pid = process.pid
        self.tail = OutputTail()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.signalled_by_us: set[int] = set()
        self._watchdog_fd: int | None = None
        self._pumps = [
            threading.Thread(target=self._pump, args=(process.stdout, sys.stdout.fileno()), daemon=True),
            threading.Thread(target=self._pump, args=(process.stderr, sys.stderr.fileno()), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        self._watch(loop)

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str]) -> "Child":
        # The watchdog first, so that no moment exists in which the child runs unwatched.
        watchdog_fd = _start_watchdog()
        try:
            process = subprocess.Popen(
                list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a stop reaches its workers too
            )
        except BaseException:
            os.close(watchdog_fd)  # no pgid was sent: the watchdog exits without killing anything
            raise
        try:
            os.write(watchdog_fd, f"{process.pid}\n".encode())
        except OSError as exc:  # it died at once: run on, but say what is no longer guaranteed
            log.warning("the watchdog is not running (%s): the child would outlive a SIGKILL of berth boot", exc)
        log.info("launched pid %d: %s", process.pid, " ".join(argv))
        child = cls(process, asyncio.get_running_loop())
        child._watchdog_fd = watchdog_fd
        return child

    def release_watchdog(self) -> None:
        """Let the watchdog go: quietly when the child's group has ended, else it kills the group now."""
        fd, self._watchdog_fd = self._watchdog_fd, None
        if fd is None:
            return
        try:
            if not _group_running(self.pid):
                os.write(fd, b"done\n")
        except OSError:
            pass
        os.close(fd)

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def _pump(self, pipe, out_fd: int) -> None:
        # Pass the output through byte for byte; keep the tail for the error message.
        for data in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            self.tail.feed(data)
            try:
                os.write(out_fd, data)
            except OSError:
                pass
        pipe.close()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # kernels before 5.3: poll instead
            loop.create_task(self._poll())
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._collect()

        loop.add_reader(pidfd, readable)

    async def _poll(self) -> None:
        while not self._collect():
            await asyncio.sleep(0.05)

    def _collect(self) -> bool:
        returncode = self.process.poll()
        if returncode is None or self.exited.done():
            return returncode is not None
        self.exited.set_result(returncode)
        log.info("child pid %d %s", self.pid, describe_exit(returncode))
        return True

    def send(self, sig: int) -> None:
        """Forward a signal to the child itself (SIGHUP, SIGUSR1 ... as tini does)."""
        if not self.exited.done():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def send_group(self, sig: int) -> None:
        self.signalled_by_us.add(sig)
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    async def stop(self, timeout: float) -> int:
        """SIGTERM to the whole group, SIGKILL after `timeout`; returns the exit code."""
        deadline = time.monotonic() + timeout
        if not self.exited.done():
            log.info("stopping the child (SIGTERM to process group %d, SIGKILL after %.1f s)", self.pid, timeout)
            self.send_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except asyncio.TimeoutError:
                log.warning("the child did not stop within %.1f s: SIGKILL", timeout)
                self.send_group(signal.SIGKILL)
                await self.exited
        # The leader often ends first (`sh -c` without exec dies on SIGTERM at once): the rest
        # of its group got the same SIGTERM and may still be running its handlers.
        while _group_running(self.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.send_group_quietly(signal.SIGKILL)  # leftovers in its group
        return self.exited.result()

    def send_group_quietly(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def join_output(self, timeout: float = 1.0) -> None:
        """Wait briefly for the last output; a grandchild holding the pipe must not hold us."""
        deadline = time.monotonic() + timeout
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))


def _start_watchdog() -> int:
    """Start the watchdog (its own session: a signal to our group spares it); our end of its pipe."""
    read_end, write_end = os.pipe()  # not inheritable: the child never holds the write end
    try:
        subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG], stdin=read_end, stdout=subprocess.DEVNULL,
                         start_new_session=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


def _group_running(pgid: int) -> bool:
    """Whether any process of the group is alive (zombies waiting to be reaped do not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class OrphanReaper:
    """Reaps zombies re-parented to us (we are PID 1 or a child-subreaper)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.reaped = 0
        self._first_seen: dict[int, float] = {}

    async def run(self, keep: set[int]) -> None:
        """Sweep forever; `keep` holds pids whose status someone else collects (our child)."""
        me = psutil.Process()
        while True:
            await asyncio.sleep(self.interval)
            self.sweep(me, keep)

    def sweep(self, me: psutil.Process, keep: set[int]) -> None:
        # One syscall peeks whether any child is a zombie (WNOWAIT reaps nothing); only then
        # is /proc walked, so the common case costs next to nothing.
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                self._first_seen.clear()
                return
        except ChildProcessError:
            return
        now = time.monotonic()
        zombies = set()
        for proc in me.children():
            try:
                if proc.status() == psutil.STATUS_ZOMBIE and proc.pid not in keep:
                    zombies.add(proc.pid)
            except psutil.NoSuchProcess:
                continue
        for pid in zombies:
            if now - self._first_seen.setdefault(pid, now) >= ORPHAN_GRACE_S:
                try:
                    os.waitpid(pid, os.WNOHANG)
                    self.reaped += 1
                    log.debug("reaped orphan pid %d", pid)
                except ChildProcessError:
                    pass
        self._first_seen = {pid: seen for pid, seen in self._first_seen.items() if pid in zombies}
