"""Progress of a long transfer: bytes, files and MB/s in the log at a steady rate.

On a terminal a one-line bar is redrawn as well; in a container's log (no terminal) only the
periodic log lines appear, so `docker logs` stays readable.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

from bootstrap.units import format_bytes

log = logging.getLogger("berth.prepare")


class Progress:
    def __init__(self, what: str, total_bytes: int, total_files: int, *, interval: float = 5.0,
                 stream: TextIO | None = None) -> None:
        self.what = what
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.done_bytes = 0
        self.done_files = 0
        self.interval = interval
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def add_bytes(self, count: int) -> None:
        self.done_bytes += count

    def file_done(self) -> None:
        self.done_files += 1

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.done_bytes / elapsed / 1e6
        return (f"{self.what}: {format_bytes(self.done_bytes)} of {format_bytes(self.total_bytes)}, "
                f"{self.done_files}/{self.total_files} files, {rate:.0f} MB/s")

    async def __aenter__(self) -> "Progress":
        self._task = asyncio.create_task(self._report())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if self._tty:
            self._stream.write("\n")
        log.info("%s", self.summary())

    @property
    def _tty(self) -> bool:
        return self._stream.isatty()

    async def _report(self) -> None:
        tick = 0.5 if self._tty else self.interval
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._tty:
                self._draw()
            if now - last_log >= self.interval:
                last_log = now
                if not self._tty:
                    log.info("%s", self.summary())

    def _draw(self) -> None:
        width = 30
        share = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        bar = "#" * int(share * width)
        self._stream.write(f"\r[{bar:<{width}}] {self.summary()}")
        self._stream.flush()
