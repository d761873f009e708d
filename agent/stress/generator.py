"""The one load generator: `berth stress`, the suite's load client and the benchmarks send with it.

Open loop (the default): arrivals on a schedule (Poisson, gamma with vLLM's `burstiness`, or
evenly spaced) and every latency counted from the *scheduled* send, so a slow service shows
as queueing instead of being coordinated away (wrk2's rule). Closed loop: N senders, each
sending its next request when the last one is answered.

HTTP/1.1 over keep-alive connections with httptools' parser on (uv)loop, as berth's own
upstream pool: an aiohttp client costs several times the CPU per request, and the generator
must not be the limit it measures. It measures itself: how late each request left against
its schedule (`lag`) and the CPU it used; `Run.generator_limit()` says when it, not the
service, was the limit. `workers` > 1 runs that many processes, each with its share.

Standard library, httptools and uvloop only: no matplotlib or rich here (bench/ and the test
harness import this module).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urlsplit

import httptools

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a core dependency except on Windows
    uvloop = None

# A generator that used this much of its CPU, or sent this late, was (near) the limit itself.
CPU_LIMIT_FRACTION = 0.9
LAG_LIMIT_S = 0.010


@dataclass(frozen=True)
class Request:
    """One request to send, as a warmup line describes it. `stream`: an OpenAI SSE stream whose
    chunks are counted as tokens (time to first token, inter-token latency)."""

    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    expect_status: int | None = None  # None: any 2xx
    stream: bool = False

    def accepts(self, status: int) -> bool:
        return status == self.expect_status if self.expect_status is not None else 200 <= status < 300


@dataclass(slots=True)
class Result:
    """One request's outcome. Times in seconds; `scheduled` from the run's start, the others
    from `scheduled` (open loop: the intended send time; closed loop: the actual send)."""

    scheduled: float
    lag: float  # how late the generator dispatched it
    latency: float  # to the end of the response, or to the error
    status: int  # 0: no HTTP answer (transport error, timeout)
    ok: bool
    error: str | None = None
    head: bytes = b""  # the body's first bytes (what answered)
    ttft: float | None = None  # first token (stream), else first body byte
    tokens: int = 0  # output tokens (stream)
    prompt_tokens: int | None = None
    itl: list[float] | None = None  # gap before each token after the first (stream)
    worker: int = 0


@dataclass(frozen=True)
class Load:
    """One step of load. Open loop at `rate` requests/s, or closed loop with `concurrency`
    senders (with a `rate` too: each sender paced to its share of it). `burstiness`: the gamma shape of inter-arrival times (1: Poisson, as vLLM's bench;
    below 1 burstier; `math.inf` evenly spaced, as h2load --rps). `seconds` None: until stopped."""

    rate: float | None = None
    concurrency: int | None = None
    seconds: float | None = None
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate is None and self.concurrency is None:
            raise ValueError("a load has a rate (open loop), a concurrency (closed loop), or both (closed loop paced to the rate)")
        if self.rate is not None and self.rate <= 0 or self.concurrency is not None and self.concurrency < 1:
            raise ValueError("rate must be > 0 and concurrency >= 1")

    @property
    def open(self) -> bool:
        return self.concurrency is None

    def share(self, worker: int, workers: int) -> "Load | None":
        """This worker's part: an even split of the rate and of the senders (None: nothing to do)."""
        rate = self.rate / workers if self.rate is not None else None
        if self.open:
            return Load(rate=rate, seconds=self.seconds, burstiness=self.burstiness, seed=self.seed * 1000 + worker)
        count = self.concurrency // workers + (1 if worker < self.concurrency % workers else 0)
        rate = rate * count / (self.concurrency / workers) if rate is not None else None
        return Load(rate=rate, concurrency=count, seconds=self.seconds, seed=self.seed * 1000 + worker) if count else None

    def gaps(self) -> Iterable[float]:
        """Seconds between arrivals."""
        mean = 1.0 / self.rate
        if math.isinf(self.burstiness):
            return itertools.repeat(mean)
        rng = random.Random(self.seed)
        shape = self.burstiness
        return (rng.gammavariate(shape, mean / shape) for _ in itertools.count())


@dataclass
class Run:
    """What one step sent and got back, and what it cost the generator."""

    load: Load
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the generator's CPU over the step, all workers
    workers: int = 1
    stopped: bool = False  # cut short (Ctrl-C or stop())

    def latencies(self, ok_only: bool = True) -> list[float]:
        return [r.latency for r in self.results if r.ok or not ok_only]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    def generator_limit(self) -> str | None:
        """Why the generator itself was (near) the limit of this step, or None."""
        if self.wall_s <= 0 or not self.results:
            return None
        cpu = self.cpu_s / (self.wall_s * self.workers)
        lags = sorted(r.lag for r in self.results)
        lag_p99 = lags[min(len(lags) - 1, math.ceil(0.99 * len(lags)) - 1)]
        reasons = []
        if cpu >= CPU_LIMIT_FRACTION:
            reasons.append(f"its CPU at {cpu:.0%} of {self.workers} core(s)")
        if lag_p99 > LAG_LIMIT_S:
            reasons.append(f"p99 send lag {lag_p99 * 1000:.1f} ms behind schedule")
        if not reasons:
            return None
        return "the generator was the limit: " + " and ".join(reasons) + "; add --workers or a less busy machine"


@dataclass
class Progress:
    """Counters a caller may read while a step runs (from another thread)."""

    sent: int = 0
    done: int = 0
    errors: int = 0

    @property
    def inflight(self) -> int:
        return self.sent - self.done


Targets = Callable[[], list[str]]  # base URLs to round-robin over, e.g. a service's Ready endpoints


# --- HTTP/1.1 over keep-alive connections ---------------------------------------------------


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.used = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.now = time.perf_counter()
        exchange.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            exchange.fail(f"bad HTTP response: {exc}")
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.lost()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.exchange.headers(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.exchange.body(body)

    def on_message_complete(self) -> None:
        self.exchange.complete(self.parser.should_keep_alive())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Exchange:
    """One request/response on a connection, with its timings (perf_counter)."""

    def __init__(self, future: asyncio.Future, stream: bool, head_only: bool = False) -> None:
        self.future = future
        self.stream = stream
        self.head_only = head_only
        self.now = 0.0
        self.received = False
        self.status = 0
        self.keep_alive = False
        self.head = b""
        self.first: float | None = None
        self.token_times: list[tuple[float, int]] = []  # (arrival, tokens) per stream chunk that carried tokens
        self.usage_tokens = 0
        self.prompt_tokens: int | None = None
        self.stream_error: str | None = None
        self._sse = b""
        self._headers_done = False

    def headers(self, status: int) -> None:
        self.status = status
        self._headers_done = True
        if not self.stream:
            self.first = self.now
        if self.head_only:  # an answer to HEAD has no body, whatever its Content-Length says
            self.complete(False)

    def body(self, data: bytes) -> None:
        if len(self.head) < 40:
            self.head += data[: 40 - len(self.head)]
        if self.stream and 200 <= self.status < 300:
            self._sse += data
            *events, self._sse = self._sse.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                self._event(event)

    def _event(self, event: bytes) -> None:
        """An OpenAI stream chunk: count its tokens (exactly, when the server reports usage per chunk)."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error") or chunk.get("object") == "error":  # an error inside a 200 stream (vLLM's way)
                error = chunk.get("error") or chunk
                self.stream_error = str(error.get("message", error) if isinstance(error, dict) else error)[:200]
                continue
            usage = chunk.get("usage") or {}
            if usage.get("prompt_tokens") is not None:
                self.prompt_tokens = usage["prompt_tokens"]
            choices = chunk.get("choices") or []
            if usage.get("completion_tokens") is not None:
                tokens = usage["completion_tokens"] - self.usage_tokens
                self.usage_tokens = usage["completion_tokens"]
            else:  # no per-chunk usage: a chunk with text is one token
                tokens = sum(1 for c in choices if c.get("text") or (c.get("delta") or {}).get("content"))
            if tokens > 0 and choices:
                if self.first is None:
                    self.first = self.now
                self.token_times.append((self.now, tokens))

    def complete(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        if not self.future.done():
            self.future.set_result(True)

    def fail(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(ConnectionError(reason))

    def lost(self) -> None:
        if self._headers_done and not self.future.done():
            self.complete(False)  # a body delimited by the connection's close
        self.fail("connection closed before the response")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a dict key on every request
class _Target:
    host: str
    port: int
    tls: bool
    prefix: str  # path prefix, e.g. /api/predict/NAME
    host_header: str

    @classmethod
    def parse(cls, url: str) -> "_Target":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: give an http:// or https:// URL")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/"), parts.netloc)


class _Engine:
    """Runs loads on one event loop; one per worker process (or thread)."""

    def __init__(self, requests: list[Request], targets: Targets, worker: int = 0, timeout: float = 60.0,
                 keep_alive: bool = True, max_connections: int = 4096, refresh_s: float = 0.1) -> None:
        if not requests:
            raise ValueError("no requests to send")
        self.requests = requests
        self.fetch_targets = targets
        self.worker = worker
        self.timeout = timeout
        self.keep_alive = keep_alive
        self.refresh_s = refresh_s
        self.slots = max_connections
        self.progress = Progress()
        self._parsed: dict[str, _Target] = {}  # one object per URL, for as long as it is a target
        self._targets: list[_Target] = self._parse(targets())
        if not self._targets:
            raise ValueError("no target to send to")
        self._idle: dict[_Target, list[_Connection]] = {}
        self._wire: dict[tuple[int, _Target], bytes] = {}
        self._turn = itertools.count()
        self._ssl: ssl.SSLContext | None = None
        self._stop: asyncio.Event | None = None
        self._stop_pending = False
        self._slots: asyncio.Semaphore | None = None

    def stop(self) -> None:
        """End the run in progress, or the next one at its start (a stop can beat the run's start)."""
        if self._stop is not None and not self._stop.is_set():
            self._stop.set()
        else:
            self._stop_pending = True

    async def run(self, load: Load, start_at: float, results: list[Result]) -> tuple[float, float, bool]:
        """Send `load` from perf_counter time `start_at`; append to `results`. Returns (wall, cpu, stopped)."""
        self._stop = asyncio.Event()
        if self._stop_pending:
            self._stop.set()
            self._stop_pending = False
        self._slots = asyncio.Semaphore(self.slots)
        refresher = asyncio.ensure_future(self._refresh())
        cpu_before = _cpu_time()
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        end_at = start_at + load.seconds if load.seconds is not None else math.inf
        pending: set[asyncio.Task] = set()
        if load.open:
            await self._open_loop(load, start_at, end_at, pending, results)
        else:
            interval = load.concurrency / load.rate if load.rate is not None else 0.0
            senders = [asyncio.ensure_future(self._sender(start_at, end_at, interval, results)) for _ in range(load.concurrency)]
            await self._until(end_at)
            await asyncio.gather(*senders, return_exceptions=True)
        stopped = self._stop.is_set()
        if pending:
            if stopped:
                for task in pending:
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        refresher.cancel()
        wall = time.perf_counter() - start_at
        self._close_idle()
        return wall, _cpu_time() - cpu_before, stopped

    async def _until(self, end_at: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), None if math.isinf(end_at) else max(0.0, end_at - time.perf_counter()))
        except asyncio.TimeoutError:
            pass

    async def _open_loop(self, load: Load, start_at: float, end_at: float, pending: set, results: list[Result]) -> None:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        gaps = iter(load.gaps())
        due = start_at
        while due < end_at and not self._stop.is_set():
            now = time.perf_counter()
            while due <= now and due < end_at:
                task = asyncio.ensure_future(self._one(due, due - start_at, now - due, results))
                pending.add(task)
                task.add_done_callback(pending.discard)
                due += next(gaps)
            # At least a millisecond: the loop's timers tick in milliseconds, so a shorter sleep
            # returns at once and the loop would spin a core. What is due meanwhile goes on
            # waking, late by under a millisecond (its lag), its latency counted from its schedule.
            # At most 50 ms, to see stop() soon.
            await asyncio.sleep(min(0.05, max(0.001, min(due, end_at) - time.perf_counter())))

    async def _sender(self, start_at: float, end_at: float, interval: float, results: list[Result]) -> None:
        """One closed-loop sender: the next request when the last is answered, and with an
        `interval`, no sooner than that after the last one's turn (the suite's paced client)."""
        next_at = time.perf_counter()
        while time.perf_counter() < end_at and not self._stop.is_set():
            now = time.perf_counter()
            await self._one(now, now - start_at, 0.0, results)
            if interval:
                next_at = max(next_at + interval, time.perf_counter() - interval)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                found = await loop.run_in_executor(None, self.fetch_targets)
            except Exception:  # noqa: BLE001 - keep the last list when the source is slow or down
                continue
            if found:
                self._targets = self._parse(found)

    def _parse(self, urls: list[str]) -> list[_Target]:
        self._parsed = {url: self._parsed.get(url) or _Target.parse(url) for url in urls}
        return list(self._parsed.values())

    async def _one(self, due: float, scheduled: float, lag: float, results: list[Result]) -> None:
        turn = next(self._turn)
        index = turn % len(self.requests)
        request = self.requests[index]
        self.progress.sent += 1
        result = Result(scheduled, lag, 0.0, 0, False, worker=self.worker)
        try:
            left = self.timeout - (time.perf_counter() - due)
            if left <= 0:
                raise asyncio.TimeoutError
            async with _deadline(left):
                exchange = await self._exchange(index, request, turn)
            result.status = exchange.status
            result.ok = request.accepts(exchange.status) and exchange.stream_error is None
            result.head = exchange.head
            if not result.ok:
                result.error = f"stream error: {exchange.stream_error}" if exchange.stream_error else f"HTTP {exchange.status}"
            if exchange.first is not None:
                result.ttft = exchange.first - due
            if request.stream:
                result.tokens = exchange.usage_tokens or sum(n for _, n in exchange.token_times)
                result.prompt_tokens = exchange.prompt_tokens
                result.itl = _token_gaps(exchange.token_times)
        except asyncio.TimeoutError:
            result.error = f"timeout after {self.timeout:g} s"
        except (OSError, ConnectionError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            self.progress.sent -= 1
            raise
        result.latency = time.perf_counter() - due
        self.progress.done += 1
        self.progress.errors += not result.ok
        results.append(result)

    async def _exchange(self, index: int, request: Request, turn: int) -> _Exchange:
        async with self._slots:
            # Chosen once a slot is free: a request that waited must not go to an endpoint that
            # has left the list meanwhile (an instance draining in a rollout).
            target = self._targets[turn % len(self._targets)]
            for attempt in range(2):
                connection = await self._connection(target)
                reused = connection.used
                exchange = _Exchange(asyncio.get_running_loop().create_future(), request.stream, request.method == "HEAD")
                connection.exchange, connection.used = exchange, True
                connection.transport.write(self._bytes(index, request, target))
                try:
                    await exchange.future
                except ConnectionError:
                    connection.close()
                    # The keep-alive race: the server closed an idle connection as we sent on it.
                    # Nothing reached the app; send once more on a fresh connection.
                    if reused and not exchange.received and attempt == 0:
                        continue
                    raise
                except asyncio.CancelledError:
                    connection.close()
                    raise
                connection.exchange = None
                if exchange.keep_alive and self.keep_alive and not connection.closed:
                    self._idle.setdefault(target, []).append(connection)
                else:
                    connection.close()
                return exchange
        raise AssertionError("unreachable")

    async def _connection(self, target: _Target) -> _Connection:
        idle = self._idle.get(target)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        context = None
        if target.tls:
            self._ssl = self._ssl or ssl.create_default_context()
            context = self._ssl
        _, connection = await asyncio.get_running_loop().create_connection(_Connection, target.host, target.port, ssl=context)
        return connection

    def _bytes(self, index: int, request: Request, target: _Target) -> bytes:
        key = (index, target)
        wire = self._wire.get(key)
        if wire is None:
            lines = [f"{request.method} {target.prefix}{request.path} HTTP/1.1", f"Host: {target.host_header}"]
            names = {name.lower() for name, _ in request.headers}
            lines += [f"{name}: {value}" for name, value in request.headers if name.lower() not in ("host", "content-length")]
            if request.body or request.method in ("POST", "PUT", "PATCH"):
                lines.append(f"Content-Length: {len(request.body)}")
            if not self.keep_alive and "connection" not in names:
                lines.append("Connection: close")
            wire = self._wire[key] = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body
        return wire

    def _close_idle(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def _deadline(seconds: float):
    """asyncio.timeout where there is one (3.11: no extra task per request, as wait_for makes)."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(seconds)
    return _WaitFor(seconds)  # pragma: no cover - Python 3.10


class _WaitFor:
    """Python 3.10's stand-in for asyncio.timeout: cancel the task at the deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        self.handle = asyncio.get_running_loop().call_later(self.seconds, self._expire, task)

    def _expire(self, task: asyncio.Task) -> None:
        self.expired = True
        task.cancel()

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.handle.cancel()
        if self.expired and kind is asyncio.CancelledError:
            raise asyncio.TimeoutError
        return False


def _token_gaps(token_times: list[tuple[float, int]]) -> list[float]:
    """The gap before each token after the first; a chunk of k tokens spreads its gap over them."""
    gaps = []
    for (before, _), (arrived, tokens) in zip(token_times, token_times[1:]):
        gaps += [(arrived - before) / tokens] * tokens
    return gaps


def _cpu_time() -> float:
    # In-process, the engine has a thread of its own: count only that thread's CPU.
    return time.thread_time() if threading.current_thread() is not threading.main_thread() else time.process_time()


def _new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


# --- the generator: a thread of its own, or worker processes --------------------------------


class Generator:
    """Sends loads to `targets` with `requests` round-robin. `workers` 1: an event loop in a
    thread of this process; more: that many processes, each with an even share of each load.
    `targets` is called every 100 ms (a service's Ready endpoints change); it must be picklable
    (a module-level function or a partial of one) when `workers` > 1."""

    def __init__(self, requests: list[Request], targets: Targets | str, workers: int = 1, timeout: float = 60.0,
                 keep_alive: bool = True, max_connections: int = 4096) -> None:
        if isinstance(targets, str):
            targets = _Static([targets])
        self.workers = max(1, workers)
        self._engine_args = dict(requests=requests, targets=targets, timeout=timeout, keep_alive=keep_alive,
                                 max_connections=max(1, max_connections // self.workers))
        self._lock = threading.Lock()
        if self.workers == 1:
            self._engine = _Engine(**self._engine_args)
            self._loop = _new_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="berth-load", daemon=True)
            self._thread.start()
            self._shared = None
        else:
            context = multiprocessing.get_context("spawn")
            self._shared = context.Array("q", 3 * self.workers, lock=False)
            self._pipes, self._processes = [], []
            for worker in range(self.workers):
                parent, child = context.Pipe()
                process = context.Process(target=_worker_main, args=(child, worker, self._engine_args, self._shared),
                                          name=f"berth-load-{worker}", daemon=True)
                process.start()
                self._pipes.append(parent)
                self._processes.append(process)
            for pipe in self._pipes:  # each worker says it is ready (or why not)
                try:
                    answer = pipe.recv()
                except EOFError:  # spawn re-imports the main module: a program read from stdin has none
                    answer = "a worker process exited as it started (with --workers > 1, run from a file, not stdin)"
                if answer != "ready":
                    self.close()
                    raise ValueError(answer)

    @property
    def progress(self) -> Progress:
        if self._shared is None:
            return self._engine.progress
        values = list(self._shared)
        return Progress(sum(values[0::3]), sum(values[1::3]), sum(values[2::3]))

    def run(self, load: Load, results: list[Result] | None = None) -> Run:
        """Send one load and wait for its answers (requests still in flight at the end are
        waited for, up to the timeout). KeyboardInterrupt stops the step and is re-raised once
        the partial run is in `self.last`."""
        run = Run(load, results if results is not None else [], workers=self.workers)
        self.last = run
        start_at = time.perf_counter() + 0.05
        if self._shared is None:
            future = asyncio.run_coroutine_threadsafe(self._engine.run(load, start_at, run.results), self._loop)
            try:
                run.wall_s, run.cpu_s, run.stopped = _wait(future.result)
            except KeyboardInterrupt:
                self.stop()
                run.wall_s, run.cpu_s, _ = future.result()
                run.stopped = True
                raise
            return run
        start_wall = time.time() + 0.2  # processes share wall-clock time, not perf_counter
        for worker, pipe in enumerate(self._pipes):
            pipe.send((load.share(worker, self.workers), start_wall))
        interrupted = False
        for pipe in self._pipes:
            while True:
                try:
                    if pipe.poll(0.2):
                        break
                except KeyboardInterrupt:
                    interrupted = True
                    self.stop()
            wall, cpu, stopped, results_part = pipe.recv()
            run.wall_s = max(run.wall_s, wall)
            run.cpu_s += cpu
            run.stopped |= stopped
            run.results += results_part
        run.results.sort(key=lambda r: r.scheduled)
        if interrupted:
            run.stopped = True
            raise KeyboardInterrupt
        return run

    def stop(self) -> None:
        """End the current step early (from any thread)."""
        if self._shared is None:
            self._loop.call_soon_threadsafe(self._engine.stop)
        else:
            for pipe in self._pipes:
                with self._lock:
                    pipe.send("stop")

    def close(self) -> None:
        if self._shared is None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            return
        for pipe, process in zip(self._pipes, self._processes):
            try:
                pipe.send(None)
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.kill()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait(result: Callable[[float], object]):
    """Wait on a future in short slices, so Ctrl-C reaches the main thread."""
    while True:
        try:
            return result(0.2)
        except concurrent.futures.TimeoutError:
            continue


class _Static:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def __call__(self) -> list[str]:
        return self.urls


def _worker_main(pipe, worker: int, engine_args: dict, shared) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into "stop"
    try:
        engine = _Engine(worker=worker, **engine_args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        pipe.send(str(exc))
        return
    pipe.send("ready")
    loop = _new_loop()
    asyncio.set_event_loop(loop)

    async def watch() -> None:
        """Publish the counters for the parent's progress display, and take a "stop"."""
        while True:
            shared[3 * worker], shared[3 * worker + 1], shared[3 * worker + 2] = (
                engine.progress.sent, engine.progress.done, engine.progress.errors)
            if pipe.poll() and pipe.recv() == "stop":
                engine.stop()
            await asyncio.sleep(0.1)

    while True:
        message = pipe.recv()
        if message is None:
            return
        if message == "stop":
            continue
        load, start_wall = message
        results: list[Result] = []
        if load is None:
            pipe.send((0.0, 0.0, False, results))
            continue
        start_at = time.perf_counter() + (start_wall - time.time())
        watcher = loop.create_task(watch())
        wall, cpu, stopped = loop.run_until_complete(engine.run(load, start_at, results))
        watcher.cancel()
        pipe.send((wall, cpu, stopped, results))


async def open_loop(url: str, rate: float, seconds: float, burstiness: float = math.inf,
                    requests: list[Request] | None = None) -> Run:
    """One open-loop run on the caller's event loop (what bench/proxy.py needs): `rate`
    requests/s for `seconds`, evenly spaced by default, latency from each scheduled time."""
    base, path = split_url(url)
    engine = _Engine(requests or [Request(path=path)], _Static([base]))
    run = Run(Load(rate=rate, seconds=seconds, burstiness=burstiness))
    run.wall_s, run.cpu_s, run.stopped = await engine.run(run.load, time.perf_counter() + 0.05, run.results)
    return run


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def split_url(url: str) -> tuple[str, str]:
    """`http://h:p/a/b?q` -> (`http://h:p`, `/a/b?q`): the target and the request path."""
    parts = urlsplit(url)
    path = parts.path or "/"
    return f"{parts.scheme}://{parts.netloc}", path + (f"?{parts.query}" if parts.query else "")


