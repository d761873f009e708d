"""Warmup: requests replayed against the child before it is declared READY.

A warmup file is JSON lines, one request each:
  {"method": "POST", "path": "/v1/completions", "headers": {...}, "body": {...} | "text",
   "body_file": "req.bin", "repeat": 10, "concurrency": 2, "expect_status": 200}
Only `path` is required. `repeat` (default 1) sends the request that many times, `concurrency`
(default 1) that many at once; a status other than `expect_status` (default: any 2xx) fails
the warmup. EAS's SDK-serialized (protobuf) warmup files are not read.

A user's warmup file is strict. An engine's built-in profile is berth's own guess at useful
requests: one the engine refuses (a 4xx, say a prompt its context cannot hold) is a warning
and is skipped, never a reason to fail a healthy engine's boot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import aiohttp

log = logging.getLogger("berth.warmup")

KEYS = ("method", "path", "headers", "body", "body_file", "repeat", "concurrency", "expect_status")


class WarmupError(Exception):
    """The warmup file is wrong, or a warmup request failed."""


@dataclass(frozen=True)
class WarmupRequest:
    path: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    repeat: int = 1
    concurrency: int = 1
    expect_status: int | None = None  # None: any 2xx
    builtin: bool = False  # the engine's own profile: a 4xx skips the request with a warning

    def accepts(self, status: int) -> bool:
        return status == self.expect_status if self.expect_status is not None else 200 <= status < 300

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


def parse_lines(lines: Iterable[str], source: str, base_dir: Path | None = None, *, builtin: bool = False) -> list[WarmupRequest]:
    """Parse warmup JSON lines; errors name the file and line, and what to do."""
    requests = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WarmupError(f"{where}: not a JSON object ({exc.msg}); a warmup file is JSON lines with keys {', '.join(KEYS)}") from None
        if not isinstance(entry, dict):
            raise WarmupError(f"{where}: each line must be a JSON object with keys {', '.join(KEYS)}")
        requests.append(_request(entry, where, base_dir, builtin))
    if not requests:
        raise WarmupError(f"{source}: no requests in the warmup file")
    return requests


def _request(entry: dict, where: str, base_dir: Path | None, builtin: bool = False) -> WarmupRequest:
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise WarmupError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise WarmupError(f"{where}: 'path' must be a string starting with '/', e.g. \"/v1/completions\"")
    if "body" in entry and "body_file" in entry:
        raise WarmupError(f"{where}: give 'body' or 'body_file', not both")
    body = entry.get("body", "")
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    if "body_file" in entry:
        body_path = Path(entry["body_file"])
        if not body_path.is_absolute() and base_dir is not None:
            body_path = base_dir / body_path
        try:
            data = body_path.read_bytes()
        except OSError as exc:
            raise WarmupError(f"{where}: body_file {body_path}: {exc.strerror}") from None
    for key in ("repeat", "concurrency"):
        value = entry.get(key, 1)
        if not isinstance(value, int) or value < 1:
            raise WarmupError(f"{where}: '{key}' must be a whole number of at least 1")
    expect = entry.get("expect_status")
    if expect is not None and not (isinstance(expect, int) and 100 <= expect <= 599):
        raise WarmupError(f"{where}: 'expect_status' must be an HTTP status code such as 200")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict):
        raise WarmupError(f"{where}: 'headers' must be an object of name: value")
    return WarmupRequest(
        path=path, method=str(entry.get("method", "GET")).upper(), headers={str(k): str(v) for k, v in headers.items()},
        body=data, repeat=entry.get("repeat", 1), concurrency=entry.get("concurrency", 1), expect_status=expect,
        builtin=builtin,
    )


def load_file(path: Path) -> list[WarmupRequest]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WarmupError(f"warmup file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text.lstrip()[:1] not in ("{", "#"):
        raise WarmupError(
            f"warmup file {path}: not JSON lines. EAS's SDK-serialized warmup files (protobuf) are not read by "
            f"berth; write one JSON object per line with keys {', '.join(KEYS)}"
        )
    return parse_lines(text.splitlines(), str(path), path.parent)


async def replay(requests: list[WarmupRequest], base_url: str) -> list[dict]:
    """Send every warmup request (honouring repeat and concurrency); return per-line timings."""
    results = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        for request in requests:
            started = time.monotonic()
            try:
                await _replay_one(session, request)
            except _Refused as refused:
                log.warning("built-in warmup %s skipped: the engine answered %d: %s", request.label, refused.status,
                            refused.text[:300])
                results.append({"request": request.label, "skipped": f"status {refused.status}"})
                continue
            seconds = time.monotonic() - started
            results.append({"request": request.label, "repeat": request.repeat, "concurrency": request.concurrency, "seconds": round(seconds, 4)})
            log.info("warmup %s x%d (concurrency %d): %.2f s", request.label, request.repeat, request.concurrency, seconds)
    return results


class _Refused(Exception):
    """The engine refused one of its own built-in warmup requests (4xx)."""

    def __init__(self, status: int, text: str) -> None:
        self.status, self.text = status, text


async def _replay_one(session: aiohttp.ClientSession, request: WarmupRequest) -> None:
    remaining = iter(range(request.repeat))

    async def worker() -> None:
        for _ in remaining:  # workers share one iterator: exactly `repeat` requests in all
            try:
                async with session.request(request.method, request.path, headers=request.headers, data=request.body or None) as response:
                    body = await response.read()
            except aiohttp.ClientError as exc:
                raise WarmupError(f"warmup {request.label}: {exc}") from None
            if request.builtin and 400 <= response.status < 500:
                raise _Refused(response.status, body.decode(errors="replace"))
            if not request.accepts(response.status):
                expected = request.expect_status or "2xx"
                raise WarmupError(f"warmup {request.label}: status {response.status}, expected {expected}")

    await asyncio.gather(*(worker() for _ in range(min(request.concurrency, request.repeat))))
