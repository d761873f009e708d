"""Objects into the node cache at network speed: parallel ranged GETs over pooled connections.

Each object is cut into parts; all parts of all objects share one pool of `concurrency`
requests, small files queued first so configs and tokenizers land early while the large
files fill the pool. A part is written at its offset into a preallocated temp file, and the bytes
done per part are recorded beside it, so a download resumes where it stopped after a crash
or a give-up, within a part too.
Every GET carries `If-Match` with the ETag seen at listing: an object replaced mid-download
answers 412 and is fetched again from scratch under its new ETag, never mixed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Mapping

from bootstrap.cache import NodeCache, PartialFile
from bootstrap.objectstore import Location, RemoteObject, classify, describe_client_error, error_facts
from bootstrap.progress import Progress
from bootstrap.units import MIB, parse_quantity

log = logging.getLogger("berth.prepare")

# Chosen by bench/cache_fill.py (docs/benchmarks.md, "Weight cache"): 64 MiB parts (as AIBrix;
# s5cmd uses 50 MiB) and 32 requests in flight: 16 starved many small files; on the 2-core
# bench machine 4 to 32 in flight tie on one large file (CPU-bound), and a real endpoint's
# per-connection cap rewards more. Parts stream to disk: their size costs requests, not memory.
DEFAULT_PART_SIZE = 64 * MIB
DEFAULT_CONCURRENCY = 32
# aiohttp's default buffer per response (64 KiB, reading paused above 128 KiB) stops and
# restarts the socket for nearly every chunk; 1 MiB lets the loop take bigger reads. At most
# twice this waits per connection: 64 MiB with 32 in flight.
READ_BUFFER = 1 * MIB
MAX_RESTARTS = 3  # an object replaced this many times during one download is an error


class DownloadError(Exception):
    """An object could not be fetched; the message names it."""


class _ObjectChanged(Exception):
    """412: the object no longer has the ETag seen at listing."""


@dataclass(frozen=True)
class TransferSettings:
    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    attempts: int = 6  # tries per part without progress
    backoff_base: float = 0.25  # seconds; doubled per try, full jitter
    backoff_cap: float = 20.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TransferSettings":
        """BERTH_DOWNLOAD_PART_SIZE ("16Mi"), BERTH_DOWNLOAD_CONCURRENCY, BERTH_DOWNLOAD_ATTEMPTS."""
        fields = {}
        if env.get("BERTH_DOWNLOAD_PART_SIZE"):
            fields["part_size"] = parse_quantity(env["BERTH_DOWNLOAD_PART_SIZE"])
        for name, key in (("concurrency", "BERTH_DOWNLOAD_CONCURRENCY"), ("attempts", "BERTH_DOWNLOAD_ATTEMPTS")):
            if env.get(key):
                fields[name] = int(env[key])
        if env.get("BERTH_DOWNLOAD_BACKOFF"):
            fields["backoff_base"] = float(env["BERTH_DOWNLOAD_BACKOFF"])
        settings = cls(**fields)
        if settings.part_size < 64 * 1024 or settings.concurrency < 1 or settings.attempts < 1:
            raise ValueError("BERTH_DOWNLOAD_PART_SIZE must be at least 64Ki, concurrency and attempts at least 1")
        return settings

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** attempt))


async def fetch_all(s3, location: Location, objects: list[RemoteObject], cache: NodeCache,
                    settings: TransferSettings, progress: Progress) -> list[RemoteObject]:
    """Bring every object into the cache; returns them with the ETags finally fetched."""
    pool = asyncio.Semaphore(settings.concurrency)
    fetcher = _Fetcher(s3, location, cache, settings, progress, pool)
    # Small first: configs and tokenizers land at once; the large files then fill the pool.
    order = sorted(range(len(objects)), key=lambda i: objects[i].size)
    tasks = {i: asyncio.create_task(fetcher.fetch(objects[i])) for i in order}
    try:
        await asyncio.gather(*tasks.values())
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return [tasks[i].result() for i in range(len(objects))]


class _Fetcher:
    def __init__(self, s3, location: Location, cache: NodeCache, settings: TransferSettings,
                 progress: Progress, pool: asyncio.Semaphore) -> None:
        self.s3 = s3
        self.location = location
        self.cache = cache
        self.settings = settings
        self.progress = progress
        self.pool = pool

    async def fetch(self, obj: RemoteObject) -> RemoteObject:
        for _ in range(MAX_RESTARTS):
            key = self.cache.blob_key(self.location, obj)
            async with self.cache.download_lock(key):
                # Another instance may have fetched it while this one waited for the lock.
                if self.cache.has_blob(key, obj.size):
                    self.progress.add_bytes(obj.size)
                    self.progress.file_done()
                    return obj
                partial = self.cache.open_partial(key, obj.size, self.settings.part_size)
                try:
                    await self._fetch_parts(obj, partial)
                except _ObjectChanged:
                    partial.discard()
                    log.info("%s changed while downloading; fetching its new version", self._name(obj))
                    obj = await self._head(obj)
                    continue
                finally:
                    partial.close()
                self.cache.commit_blob(key, partial)
                self.progress.file_done()
                return obj
        raise DownloadError(f"{self._name(obj)}: replaced {MAX_RESTARTS} times during the download; try again later")

    async def _fetch_parts(self, obj: RemoteObject, partial: PartialFile) -> None:
        already = partial.done_bytes()
        if already:
            log.info("%s: resuming, %d of %d bytes already here", self._name(obj), already, obj.size)
            self.progress.add_bytes(already)
        tasks = [asyncio.create_task(self._fetch_part(obj, partial, index)) for index in range(partial.part_count)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_part(self, obj: RemoteObject, partial: PartialFile, index: int) -> None:
        from botocore.exceptions import ClientError

        start, end = partial.part_range(index)
        offset = start + partial.part_done(index)
        if offset >= end:
            return
        attempt = 0
        async with self.pool:
            while offset < end:
                before = offset
                try:
                    offset = await self._get_range(obj, partial, index, offset, end)
                    continue
                except ClientError as exc:
                    status, code, _ = error_facts(exc)
                    if status == 412 or code == "PreconditionFailed":
                        raise _ObjectChanged() from None
                    retry, hint, reason = classify(exc)
                    if not retry:
                        raise DownloadError(describe_client_error(exc, self.location, f"GET {obj.key}")) from None
                except _PartCut as cut:
                    offset, hint, reason = cut.offset, None, cut.reason
                attempt = 0 if offset > before else attempt + 1  # progress resets the count
                if attempt >= self.settings.attempts:
                    raise DownloadError(
                        f"{self._name(obj)}: gave up after {attempt} tries without progress ({reason})"
                    )
                delay = max(hint or 0.0, self.settings.backoff(attempt))
                log.debug("%s bytes %d-%d: %s; retrying in %.2f s", self._name(obj), offset, end - 1, reason, delay)
                await asyncio.sleep(delay)

    async def _get_range(self, obj: RemoteObject, partial: PartialFile, index: int, offset: int, end: int) -> int:
        """GET bytes offset..end-1 into the file; returns the new offset (== end when whole)."""
        from botocore.exceptions import ClientError

        try:
            response = await self.s3.get_object(
                Bucket=self.location.bucket, Key=obj.key, Range=f"bytes={offset}-{end - 1}", IfMatch=obj.etag
            )
            async with response["Body"] as body:
                stream = body.raw_stream.content
                stream.set_read_chunk_size(READ_BUFFER)
                # Each chunk as aiohttp received it (iter_any would join what is buffered: a
                # copy), one pwrite per chunk.
                async for chunk, _ in stream.iter_chunks():
                    if chunk:
                        offset = self._write(partial, index, chunk, offset, end)
        except (ClientError, DownloadError):
            raise
        except Exception as exc:  # noqa: BLE001 - aiohttp, botocore and socket errors alike
            raise _PartCut(offset, type(exc).__name__) from None
        if offset < end:
            raise _PartCut(offset, "response ended early")
        return offset

    def _write(self, partial: PartialFile, index: int, data: bytes, offset: int, end: int) -> int:
        if offset + len(data) > end:
            raise DownloadError(f"server sent more bytes than asked for ({offset + len(data)} > {end})")
        partial.write(index, data, offset)
        self.progress.add_bytes(len(data))
        return offset + len(data)

    async def _head(self, obj: RemoteObject) -> RemoteObject:
        from botocore.exceptions import ClientError

        try:
            head = await self.s3.head_object(Bucket=self.location.bucket, Key=obj.key)
        except ClientError as exc:
            raise DownloadError(describe_client_error(exc, self.location, f"HEAD {obj.key}")) from None
        return RemoteObject(obj.key, head["ContentLength"], head["ETag"])

    def _name(self, obj: RemoteObject) -> str:
        return f"{self.location.endpoint}/{self.location.bucket}/{obj.key}"


class _PartCut(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason
