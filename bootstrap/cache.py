"""The node cache of object-store prefixes: blobs, trees, locks, leases and eviction.

Layout under `<cache_dir>/weights/` (the agent mounts the same host directory into every
instance on the node):

    services/<service>/   one namespace per service: its instances share it, no other service reads it
    shared/               the node-wide pool, for prefixes the operator lists in BERTH_CACHE_SHARED_PREFIXES
    .fill.lock            fills hold it shared, eviction exclusive

and in each namespace:

    blobs/<key>           one object version, read-only; key = sha256(endpoint, bucket, key, ETag, size)
    blobs/<key>.partial   a download in progress, preallocated, written at offsets
    blobs/<key>.parts     its part size, then per part the bytes already on disk
    blobs/<key>.lock      held by the one instance downloading that object
    trees/<tree>/         one listing of a prefix as a directory of hard links to blobs:
                          what mount_path points at. <tree> = sha256 of the whole listing
    trees/<tree>.json     its manifest, written last: a tree without one is incomplete;
                          its mtime is the tree's last use, for least-recent-use eviction
    trees/<tree>.lease    held shared by every running instance that uses the tree

A file becomes visible only by an atomic rename (blob) or inside a tree renamed into place,
so a partial or corrupt file is never seen at mount_path.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

from bootstrap.objectstore import Location, RemoteObject
from bootstrap.units import format_bytes

log = logging.getLogger("berth.prepare")

LOCK_POLL_S = 0.1
_HEADER = struct.Struct("<Q")  # part size at the head of a .parts file
_LEASES: list[int] = []  # lease fds, held open until this process (the boot) exits


@dataclass(frozen=True)
class TreeEntry:
    path: str  # relative path inside the tree
    obj: RemoteObject


def namespace_for(service: str, url: str, shared_prefixes: Sequence[str]) -> str:
    """`shared` for prefixes the operator made public, else the service's own namespace."""
    if any(prefix and url.startswith(prefix) for prefix in shared_prefixes):
        return "shared"
    return f"services/{service}"


def instance_view(cache_dir: Path, service: str) -> list[Path]:
    """The parts of the node cache an instance of `service` may see, created if absent.

    Its own namespace, the node-wide pool, the fill lock, and the caches that hold nothing
    private (pip wheels, compiled kernels). The agent mounts exactly these into a container,
    so one service cannot read another's private weights.
    """
    *directories, fill_lock = instance_paths(cache_dir, service)
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
    fill_lock.touch(exist_ok=True)
    return [*directories, fill_lock]


def instance_paths(cache_dir: Path, service: str) -> list[Path]:
    """instance_view's paths without touching the disk (`berth render k8s` names another
    machine's cache): the directories, then the fill lock, which is a file."""
    root = Path(cache_dir)
    weights = root / "weights"
    return [weights / namespace_for(service, "", ()), weights / "shared", root / "pip", root / "compile", weights / ".fill.lock"]


def tree_entries(location: Location, objects: list[RemoteObject]) -> list[TreeEntry]:
    """Objects with a safe relative path; keys that cannot be a file are skipped with a warning."""
    base = location.prefix if location.prefix.endswith("/") or not location.prefix else location.prefix + "/"
    paths = {obj.key[len(base):] if obj.key.startswith(base) else obj.key.rsplit("/", 1)[-1]: obj for obj in objects}
    directories = {path.rsplit("/", i)[0] for path in paths for i in range(1, path.count("/") + 1)}
    entries = []
    for path, obj in sorted(paths.items()):
        parts = path.split("/")
        if not path or any(part in ("", ".", "..") for part in parts) or path in directories:
            log.warning("%s: object %r cannot be a file at the mount path; skipped", location.url, obj.key)
            continue
        entries.append(TreeEntry(path, obj))
    return entries


class PartialFile:
    """A preallocated temp file written at offsets, with the bytes done per part beside it.

    The marks file holds the part size, then one little-endian uint64 per part: how many of
    its bytes are on disk, counted from the part's start. Data is written before its mark,
    so a crash or a give-up resumes each part exactly where it stopped.
    """

    def __init__(self, path: Path, parts_path: Path, size: int, part_size: int) -> None:
        self.path = path
        self.parts_path = parts_path
        self.size = size
        self.part_size = part_size
        self.part_count = (size + part_size - 1) // part_size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._marks = self._open_marks()
        if os.fstat(self._fd).st_size != size:
            _preallocate(self._fd, size)

    def _open_marks(self) -> int:
        fd = os.open(self.parts_path, os.O_RDWR | os.O_CREAT, 0o600)
        header = os.pread(fd, _HEADER.size, 0)
        if len(header) == _HEADER.size and _HEADER.unpack(header)[0] == self.part_size:
            return fd
        # New, or cut with another part size: nothing in the temp file can be trusted.
        os.ftruncate(fd, 0)
        os.pwrite(fd, _HEADER.pack(self.part_size) + bytes(_HEADER.size * self.part_count), 0)
        os.ftruncate(self._fd, 0)
        return fd

    def part_range(self, index: int) -> tuple[int, int]:
        start = index * self.part_size
        return start, min(start + self.part_size, self.size)

    def part_done(self, index: int) -> int:
        """Bytes of the part already on disk, from its start."""
        return _HEADER.unpack(os.pread(self._marks, _HEADER.size, _HEADER.size * (index + 1)))[0]

    def done_bytes(self) -> int:
        return sum(self.part_done(index) for index in range(self.part_count))

    def write(self, index: int, data: bytes | bytearray, offset: int) -> None:
        """Write data at offset (inside part `index`), then record the part's progress."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
        start, _ = self.part_range(index)
        os.pwrite(self._marks, _HEADER.pack(offset - start), _HEADER.size * (index + 1))

    def close(self) -> None:
        for fd in (self._fd, self._marks):
            if fd >= 0:
                os.close(fd)
        self._fd = self._marks = -1

    def discard(self) -> None:
        self.close()
        for path in (self.path, self.parts_path):
            path.unlink(missing_ok=True)


def _preallocate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    if size:
        try:
            os.posix_fallocate(fd, 0, size)  # fail now on a full disk, not halfway through
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


class NodeCache:
    def __init__(self, cache_dir: Path, namespace: str) -> None:
        self.root = Path(cache_dir) / "weights"
        self.dir = self.root / namespace
        self.blobs = self.dir / "blobs"
        self.trees = self.dir / "trees"
        for directory in (self.blobs, self.trees):
            directory.mkdir(parents=True, exist_ok=True)

    # --- blobs -------------------------------------------------------------------------------

    @staticmethod
    def blob_key(location: Location, obj: RemoteObject) -> str:
        return _digest(location.endpoint, location.bucket, obj.key, obj.etag, str(obj.size))

    def blob(self, key: str) -> Path:
        return self.blobs / key

    def has_blob(self, key: str, size: int) -> bool:
        try:
            return self.blob(key).stat().st_size == size
        except FileNotFoundError:
            return False

    @asynccontextmanager
    async def download_lock(self, key: str) -> AsyncIterator[None]:
        """One instance on the node downloads an object; the others wait here and share it."""
        async with _locked(self.blobs / f"{key}.lock", fcntl.LOCK_EX, waiting=f"another instance is downloading {key[:12]}"):
            yield

    def bytes_needed(self, key: str, size: int) -> int:
        """Disk space a download of this blob still needs (a partial one holds its space already)."""
        try:
            return max(0, size - self.blobs.joinpath(f"{key}.partial").stat().st_blocks * 512)
        except FileNotFoundError:
            return size

    def open_partial(self, key: str, size: int, part_size: int) -> PartialFile:
        return PartialFile(self.blobs / f"{key}.partial", self.blobs / f"{key}.parts", size, part_size)

    def commit_blob(self, key: str, partial: PartialFile) -> None:
        os.chmod(partial.path, 0o444)
        os.replace(partial.path, self.blob(key))
        partial.parts_path.unlink(missing_ok=True)

    # --- trees -------------------------------------------------------------------------------

    @staticmethod
    def tree_key(location: Location, entries: list[TreeEntry]) -> str:
        listing = [f"{e.path}\t{e.obj.etag}\t{e.obj.size}" for e in entries]
        return _digest(location.endpoint, location.bucket, location.prefix, *listing)

    def find_tree(self, tree: str) -> Path | None:
        """The tree's directory if complete; marks it used now."""
        manifest = self.trees / f"{tree}.json"
        try:
            os.utime(manifest)
        except FileNotFoundError:
            return None
        return self.trees / tree

    def build_tree(self, tree: str, location: Location, entries: list[TreeEntry]) -> Path:
        """Hard-link the blobs into a directory shaped like the prefix, then rename it into place."""
        final = self.trees / tree
        staging = self.trees / f".{tree}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for entry in entries:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.blob(self.blob_key(location, entry.obj)), target)
        try:
            os.rename(staging, final)
        except OSError:  # another instance built the same tree first
            shutil.rmtree(staging, ignore_errors=True)
        manifest = {
            "url": location.url,
            "endpoint": location.endpoint,
            "bucket": location.bucket,
            "prefix": location.prefix,
            "size": sum(e.obj.size for e in entries),
            "files": [{"path": e.path, "key": e.obj.key, "etag": e.obj.etag, "size": e.obj.size,
                       "blob": self.blob_key(location, e.obj)} for e in entries],
        }
        _write_atomic(self.trees / f"{tree}.json", json.dumps(manifest, indent=1))
        return final

    def lease(self, tree: str) -> None:
        """Pin a tree against eviction for as long as this process lives."""
        fd = os.open(self.trees / f"{tree}.lease", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _LEASES.append(fd)

    # --- fills and eviction ------------------------------------------------------------------

    @asynccontextmanager
    async def filling(self) -> AsyncIterator[None]:
        """Held (shared) while blobs are downloaded and linked, so eviction cannot take them."""
        async with _locked(self.root / ".fill.lock", fcntl.LOCK_SH, waiting="eviction is running"):
            yield

    def evict(self, budget: int, incoming: int = 0) -> int:
        """Remove least recently used trees not in use (and their blobs) until usage + incoming fits budget.

        Returns the bytes freed. Skips (and says so) when a fill is running elsewhere.
        """
        with _try_lock(self.root / ".fill.lock", fcntl.LOCK_EX) as held:
            if not held:
                log.info("cache eviction skipped: another instance is filling the cache")
                return 0
            usage = disk_usage(self.root)
            if usage + incoming <= budget:
                return 0
            freed = 0
            for manifest in sorted(_all_tree_manifests(self.root), key=_mtime):
                if usage + incoming - freed <= budget:
                    break
                freed += _evict_tree(manifest)
            freed += _remove_stale_partials(self.root)
            log.info("cache eviction: freed %s; %s in use of a %s budget",
                     format_bytes(freed), format_bytes(usage - freed), format_bytes(budget))
            return freed


def disk_usage(root: Path) -> int:
    """Bytes held by blobs and partial downloads in every namespace under root."""
    total = 0
    for blobs in _all_blob_dirs(root):
        for entry in os.scandir(blobs):
            if entry.name.endswith((".lock", ".parts")):
                continue
            total += entry.stat().st_size
    return total


def _all_blob_dirs(root: Path) -> list[Path]:
    return [p for p in [root / "shared" / "blobs", *root.glob("services/*/blobs")] if p.is_dir()]


def _all_tree_manifests(root: Path) -> list[Path]:
    return [m for blobs in _all_blob_dirs(root) for m in (blobs.parent / "trees").glob("*.json")]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _evict_tree(manifest: Path) -> int:
    """Remove one tree unless a running instance holds its lease; free blobs no tree links."""
    trees = manifest.parent
    tree = manifest.stem
    with _try_lock(trees / f"{tree}.lease", fcntl.LOCK_EX) as free:
        if not free:
            return 0
        files = json.loads(manifest.read_text())["files"]
        manifest.unlink()
        shutil.rmtree(trees / tree, ignore_errors=True)
    freed = 0
    blobs = trees.parent / "blobs"
    for blob in {entry["blob"] for entry in files}:
        path = blobs / blob
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        if info.st_nlink == 1:  # no other tree links it
            path.unlink()
            freed += info.st_size
    log.info("cache eviction: removed %s (%d files)", manifest.stem[:12], len(files))
    return freed


def _remove_stale_partials(root: Path) -> int:
    freed = 0
    for blobs in _all_blob_dirs(root):
        for partial in blobs.glob("*.partial"):
            key = partial.name.removesuffix(".partial")
            with _try_lock(blobs / f"{key}.lock", fcntl.LOCK_EX) as free:
                if free:
                    freed += partial.stat().st_size
                    partial.unlink()
                    (blobs / f"{key}.parts").unlink(missing_ok=True)
    return freed


@asynccontextmanager
async def _locked(path: Path, mode: int, *, waiting: str) -> AsyncIterator[None]:
    """flock without blocking the event loop: poll, so cancellation (SIGTERM) stays prompt."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log.info("waiting: %s", waiting)
                    told = True
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def _try_lock(path: Path, mode: int) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def _digest(*fields: str) -> str:
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()
