"""Instance logs: rotation, so a chatty service cannot fill the disk, and following them.

Defaults are the kubelet's (containerLogMaxSize 10 Mi, containerLogMaxFiles 5): at most
50 MiB of logs per instance. Docker's json-file driver rotates containers' logs (`docker logs`
and `berth logs` still read every rotated file); `RotatingLog` does the same for the process
runtime's files.

A follower (`berth logs -f`) waits on a blocking stream for as long as the client stays: it
gets a daemon thread of its own, never one of the event loop's default executor, whose few
threads the agent's own work (deploys, `berth node`) needs, and which an exiting agent waits for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping

from bootstrap.units import MIB

if TYPE_CHECKING:
    import docker.types

DEFAULT_LOG_MAX_SIZE_BYTES = 10 * MIB
DEFAULT_LOG_MAX_FILES = 5


def log_config(max_size_bytes: int = DEFAULT_LOG_MAX_SIZE_BYTES, max_files: int = DEFAULT_LOG_MAX_FILES) -> "docker.types.LogConfig":
    """The `log_config` for a container create call: json-file, rotated at `max_size_bytes`."""
    import docker.types

    if max_size_bytes < 1:
        raise ValueError(f"log_max_size must be at least 1 byte, got {max_size_bytes}")
    if max_files < 1:
        raise ValueError(f"log_max_files must be at least 1, got {max_files}")
    return docker.types.LogConfig(
        type=docker.types.LogConfig.types.JSON,
        config={"max-size": str(max_size_bytes), "max-file": str(max_files)},
    )


def log_files(container: Mapping[str, Any]) -> list[Path]:
    """A container's log file and its rotated siblings (`<id>-json.log.1`, ...), from its inspect."""
    current = container.get("LogPath")
    if not current:
        return []  # a log driver that keeps no local file
    path = Path(current)
    return sorted(p for p in path.parent.glob(path.name + "*") if p.is_file())


def rotated(path: Path, max_files: int) -> list[Path]:
    """`path` and its rotated copies (`.1` newest ... `.N`), oldest first, those that exist."""
    copies = [path.with_name(f"{path.name}.{index}") for index in range(max_files - 1, 0, -1)]
    return [candidate for candidate in [*copies, path] if candidate.exists()]


def rotate_if_needed(path: Path, max_size_bytes: int, max_files: int) -> bool:
    """Rotate a log its writer holds open with O_APPEND, as json-file does: past `max_size_bytes`
    its content moves to `.1` (older copies shift, the oldest past `max_files` goes) and the file
    is emptied in place, so the writer's next line lands at its start. True when rotated."""
    try:
        if path.stat().st_size <= max_size_bytes:
            return False
    except FileNotFoundError:
        return False
    if max_files > 1:
        for index in range(max_files - 1, 1, -1):
            older = path.with_name(f"{path.name}.{index - 1}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{index}"))
        copy = path.with_name(f"{path.name}.1.tmp")
        with open(path, "rb") as source, open(copy, "wb") as target:
            while chunk := source.read(MIB):
                target.write(chunk)
        os.replace(copy, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)
    return True


MAX_FOLLOWERS = 256
_followers = threading.BoundedSemaphore(MAX_FOLLOWERS)
_DONE = object()
log = logging.getLogger("berth.agent")


class TooManyFollowers(Exception):
    """More log streams open at once than the agent serves (HTTP 429)."""


def acquire_follower() -> None:
    if not _followers.acquire(blocking=False):
        raise TooManyFollowers(f"{MAX_FOLLOWERS} log streams are open on this agent already; close one and try again")


async def stream(chunks: Iterator[bytes], *, held: bool = False) -> AsyncIterator[bytes]:
    """Chunks of a blocking log stream, read in a daemon thread of their own.

    `held`: a follower slot was taken with `acquire_follower`; it is given back when the
    client leaves. Leaving closes the stream (Docker's closes its socket, which ends the
    blocking read); a generator that is idle notices at its next heartbeat (an empty chunk).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(8)  # chunks in flight: a slow client slows the reader, never the agent's memory
    leaving = threading.Event()

    def pump() -> None:
        try:
            for chunk in chunks:
                while not room.acquire(timeout=0.5):
                    if leaving.is_set():
                        return
                if leaving.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends this follower only
            if not leaving.is_set():
                log.warning("log stream ended: %s", exc)
        finally:
            if not leaving.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    threading.Thread(target=pump, name="berth-log-follower", daemon=True).start()
    try:
        while (chunk := await queue.get()) is not _DONE:
            room.release()
            if chunk:
                yield chunk
    finally:
        leaving.set()
        if held:
            _followers.release()
        close = getattr(chunks, "close", None)
        if close is not None:
            try:
                close()  # Docker's stream: closing the socket ends the thread's blocking read
            except (ValueError, OSError):
                pass  # a generator running in the thread: it stops at its next chunk
