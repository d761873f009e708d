"""Proxy overhead: berth's proxy against going direct and against nginx as a reverse proxy.

    .venv/bin/python bench/proxy.py [--seconds 10] [--rates 500,1000] [--rounds 3]

One run, same machine, side by side. The upstream is nginx returning a constant (so the
proxies are measured, not the app); berth boot runs that nginx as its child and proxies to it;
nginx (1 worker, as berth is one process) proxies to the same upstream with keep-alive.

- Latency at fixed rates from an open-loop generator (below): each request has a scheduled
  send time and its latency counts from then, so queueing shows (closed-loop tools such as
  wrk wait for an answer before sending and hide it). Added latency = proxied - direct.
- Maximum rate: h2load (nghttp2-client) over HTTP/1.1, 64 connections, closed loop: the
  right tool for throughput, which is what it measures here; the median of the rounds, the
  targets alternating, with each one's CPU microseconds per request (its process's user +
  system time over the requests h2load completed). The candidates for the server side run
  beside it, each in front of the same upstream with berth's upstream pool and no handler
  chain: a bare httptools protocol, granian's embedded server (RSGI; a row only when the
  `granian` package imports), and, as ceilings without proxying, aiohttp's server and
  berth's own server (serving/server.py) answering a constant. A second berth boot with
  BERTH_NO_EXTENSIONS=1 shows what the express lane's C scans bring.
- SSE: the suite's test app streams events 20 ms apart; time to first chunk and the mean gap
  between chunks as the client sees them, proxied vs direct.
- Proxy CPU per 1000 requests, from the proxy process's CPU time over the fixed-rate runs.

The open-loop sender is berth's own load generator (agent/stress/generator.py, the one `berth
stress` runs; bench/stress_generator.py measures it against h2load), because Debian 12 packages
no open-loop tool with percentiles (wrk2 and vegeta are absent; httperf reports none). Its own
jitter (its timers tick in milliseconds) is in every figure alike, so differences hold.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from agent.stress.generator import Generator, Load, Request, percentile  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


NGINX_CONF = """\
worker_processes 1;
daemon off;
error_log {prefix}/error.log warn;
pid {prefix}/nginx-{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  {body}
}}
"""
# The ceiling of any proxy built on aiohttp's server here: its hello world, no proxying.
AIOHTTP_HELLO = """\
import asyncio, sys, uvloop
from aiohttp import web
async def hello(request): return web.Response(text="ok\\n")
async def main():
    await asyncio.get_running_loop().create_server(web.Server(hello, access_log=None), "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""
# Candidates for the server side, each in front of berth's upstream pool with no handler
# chain, GET only (no limits, drain, metrics or streaming). A bare httptools protocol:
LEAN_PROXY = """\
import asyncio, sys, uvloop, httptools
from serving.upstream import UpstreamPool
class Lean(asyncio.Protocol):
    def __init__(self, pool): self.pool, self.parser = pool, httptools.HttpRequestParser(self)
    def connection_made(self, transport): self.transport = transport
    def data_received(self, data): self.parser.feed_data(data)
    def on_message_begin(self): self.headers = []
    def on_url(self, url): self.url = url
    def on_header(self, name, value): self.headers.append((name, value))
    def on_message_complete(self): asyncio.ensure_future(self.relay(self.url.decode(), self.headers))
    async def relay(self, url, headers):
        upstream = await self.pool.request("GET", url, headers + [(b"X-Forwarded-For", b"127.0.0.1")], None)
        body = await upstream.read()
        upstream.release()
        head = [b"HTTP/1.1 %d %s\\r\\n" % (upstream.status, upstream.reason)]
        head += [b"%s: %s\\r\\n" % pair for pair in upstream.headers if pair[0].lower() not in (b"connection", b"content-length")]
        if not self.transport.is_closing():  # h2load closes its connections mid-request at the end
            self.transport.write(b"".join(head) + b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
async def main():
    pool = UpstreamPool("127.0.0.1", int(sys.argv[2]), idle_timeout=4)
    await asyncio.get_running_loop().create_server(lambda: Lean(pool), "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""
# granian's embedded server (Rust, hyper) in this process's event loop, RSGI interface.
GRANIAN_PROXY = """\
import sys, uvloop
from granian.constants import Interfaces
from granian.server.embed import Server
from serving.upstream import UpstreamPool
pools = []
async def relay(scope, proto):
    if not pools: pools.append(UpstreamPool("127.0.0.1", int(sys.argv[2]), idle_timeout=4))
    headers = [(k.encode(), v.encode()) for k, v in scope.headers.items()] + [(b"X-Forwarded-For", b"127.0.0.1")]
    upstream = await pools[0].request(scope.method, scope.path + ("?" + scope.query_string if scope.query_string else ""), headers, None)
    body = await upstream.read()
    upstream.release()
    proto.response_bytes(upstream.status, [(k.decode(), v.decode()) for k, v in upstream.headers], body)
uvloop.run(Server(relay, address="127.0.0.1", port=int(sys.argv[1]), interface=Interfaces.RSGI, log_enabled=False, websockets=False).serve())
"""
# berth's own server side answering a constant: the ceiling of any chain on it.
BERTH_HELLO = """\
import asyncio, sys, uvloop
from serving.http import Response
from serving.server import Server
async def hello(request): return Response(200, b"ok\\n", [(b"Content-Type", b"text/plain")])
async def main():
    await Server(hello).listen("127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""
UPSTREAM_BODY = """server {{ listen 127.0.0.1:{port} reuseport; location / {{ default_type text/plain; return 200 "ok\\n"; }} }}"""
PROXY_BODY = """\
upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  upstream sse {{ server 127.0.0.1:{sse}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location /stream {{ proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }}
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}"""


def nginx_config(prefix: Path, name: str, body: str) -> Path:
    path = prefix / f"{name}.conf"
    path.write_text(NGINX_CONF.format(prefix=prefix, name=name, body=body))
    return path


# --- latency at a fixed rate ----------------------------------------------------------------


def open_loop(port: int, rate: float, seconds: float, path: str = "/") -> tuple[list[float], int]:
    """`rate` requests/s for `seconds`, evenly spaced, on berth's one load generator (the one
    `berth stress` runs): the latencies of the answered ones from each scheduled send, and the
    count of failed ones."""
    with Generator([Request(path)], f"http://127.0.0.1:{port}") as generator:
        run = generator.run(Load(rate=rate, seconds=seconds, burstiness=math.inf))
    return run.latencies(), run.errors


async def sse_timings(port: int, streams: int = 10, events: int = 25) -> tuple[float, float]:
    """Mean time to first chunk and mean gap between chunks, ms."""
    firsts, gaps = [], []
    for _ in range(streams):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = time.perf_counter()
        writer.write(f"GET /stream?n={events}&gap=0.02 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
        arrivals, data = [], b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            now = time.perf_counter()
            arrivals += [now] * chunk.count(b"data: ")
            data += chunk
        writer.close()
        firsts.append(arrivals[0] - sent)
        gaps += [b - a for a, b in zip(arrivals, arrivals[1:-1])]
    return statistics.mean(firsts) * 1000, statistics.mean(gaps) * 1000


def h2load_max(port: int, seconds: float, pid: int | None, path: str = "/") -> tuple[float, float | None]:
    """Requests per second, and the CPU microseconds per request of process `pid`."""
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        ["h2load", "--h1", "-t", "1", "-c", "64", "-D", str(int(seconds)), "--warm-up-time", "1", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout
    rate = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    # The CPU spans the warm-up second too: counted as if served at the measured rate.
    served = done + rate
    return rate, ((cpu_seconds(pid) - before) / served * 1e6 if pid and served else None)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# --- the run ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rates", default="500,1000")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the targets this many times (per rate, and for the maximum)")
    args = parser.parse_args()
    for tool in ("nginx", "h2load"):
        if shutil.which(tool) is None and not Path("/usr/sbin/nginx").exists():
            sys.exit(f"{tool} is missing: apt-get install nginx nghttp2-client")

    prefix = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    upstream, sse, nginx_port, proxy_port, admin_port, hello, lean, granian, berth_hello = (free_port() for _ in range(9))
    processes: list[subprocess.Popen] = []
    try:
        # The SSE app runs as a second berth boot's child: boot serves only a port its own child holds.
        sse_proxy, sse_admin = free_port(), free_port()
        sse_boot = start_boot(sse, sse_proxy, sse_admin, [sys.executable, "-m", "tests.apps.slowapp", "--port", str(sse)],
                              prefix / "boot-sse.log")
        processes.append(sse_boot)
        candidates = {"httptools protocol + berth's pool (no chain)": (LEAN_PROXY, lean),
                      "granian embedded (RSGI) + berth's pool (no chain)": (GRANIAN_PROXY, granian),
                      "aiohttp server, hello world (no proxying)": (AIOHTTP_HELLO, hello),
                      "berth's server, hello world (no proxying)": (BERTH_HELLO, berth_hello)}
        if subprocess.run([sys.executable, "-c", "import granian"], capture_output=True).returncode != 0:
            del candidates["granian embedded (RSGI) + berth's pool (no chain)"]
        ceilings = {}
        for name, (code, port) in candidates.items():
            process = subprocess.Popen([sys.executable, "-c", code, str(port), str(upstream)], cwd=REPO)
            processes.append(process)
            ceilings[name] = (port, process.pid)
        proxy_conf = nginx_config(prefix, "proxy", PROXY_BODY.format(port=nginx_port, upstream=upstream, sse=sse))
        nginx_proxy = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(proxy_conf)], stderr=subprocess.DEVNULL)
        processes.append(nginx_proxy)
        upstream_conf = nginx_config(prefix, "upstream", UPSTREAM_BODY.format(port=upstream))
        # berth boot runs the upstream nginx as its child, as it would run a service.
        boot = start_boot(upstream, proxy_port, admin_port, ["nginx", "-p", str(prefix), "-c", str(upstream_conf)], prefix / "boot.log")
        processes.append(boot)
        # The same boot with the express lane's scans in Python, in front of its own copy of the
        # upstream (boot serves only a port its own child holds): what the C scans bring.
        py_upstream, py_proxy, py_admin = free_port(), free_port(), free_port()
        py_conf = nginx_config(prefix, "upstream-py", UPSTREAM_BODY.format(port=py_upstream))
        py_boot = start_boot(py_upstream, py_proxy, py_admin, ["nginx", "-p", str(prefix), "-c", str(py_conf)],
                             prefix / "boot-py.log", {"BERTH_NO_EXTENSIONS": "1"})
        processes.append(py_boot)
        ceilings["berth, express lane scans in Python (BERTH_NO_EXTENSIONS=1)"] = (py_proxy, py_boot.pid)
        for port in (upstream, sse, nginx_port, proxy_port, *(port for port, _ in ceilings.values())):
            wait_port(port)
        wait_ready(admin_port, boot, prefix / "boot.log")
        wait_ready(sse_admin, sse_boot, prefix / "boot-sse.log")
        wait_ready(py_admin, py_boot, prefix / "boot-py.log")
        nginx_worker = psutil.Process(nginx_proxy.pid).children()[0].pid
        targets = {"direct": (upstream, None), "nginx": (nginx_port, nginx_worker), "berth": (proxy_port, boot.pid)}
        report = run(targets, args, (sse, sse_proxy), ceilings)
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
    print(report)


def run(targets: dict, args, sse_ports: tuple[int, int], ceilings: dict[str, tuple[int, int]]) -> str:
    lines = [f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, load average "
             f"{os.getloadavg()[0]:.1f} at the start; python {sys.version.split()[0]}; nginx 1 worker; "
             f"{args.seconds:g} s per run, {args.rounds} rounds"]
    lines.append("")
    lines.append("| rate (req/s) | target | p50 ms | p99 ms | added p50 ms | added p99 ms | p99 - nginx's ms | errors | CPU us/req |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        p50s: dict[str, list[float]] = {name: [] for name in targets}
        p99s: dict[str, list[float]] = {name: [] for name in targets}
        errors = {name: 0 for name in targets}
        cpu = {name: 0.0 for name in targets}
        for round_ in range(args.rounds):
            for name, (port, pid) in targets.items():
                progress(f"{rate:.0f} req/s, round {round_ + 1} of {args.rounds}: {name}")
                before = cpu_seconds(pid) if pid else 0.0
                latencies, failed = open_loop(port, rate, args.seconds)
                cpu[name] += (cpu_seconds(pid) - before) if pid else 0.0
                p50s[name].append(percentile(latencies, 0.5))
                p99s[name].append(percentile(latencies, 0.99))
                errors[name] += failed
        # Each figure: the median over the rounds of that round's percentile.
        p50 = {name: statistics.median(values) * 1000 for name, values in p50s.items()}
        p99 = {name: statistics.median(values) * 1000 for name, values in p99s.items()}
        for name in targets:
            sent = rate * args.seconds * args.rounds
            cpu_text = f"{cpu[name] / sent * 1e6:.0f}" if targets[name][1] else "-"
            added = "| - | - | -" if name == "direct" else (
                f"| {p50[name] - p50['direct']:.2f} | {p99[name] - p99['direct']:.2f} | {p99[name] - p99['nginx']:.2f}")
            lines.append(f"| {rate:.0f} | {name} | {p50[name]:.2f} | {p99[name]:.2f} {added} | {errors[name]} | {cpu_text} |")
    lines.append(f"load average {os.getloadavg()[0]:.1f} after the fixed rates")
    lines.append("")
    everyone = {**targets, **ceilings}
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in everyone}
    for round_ in range(args.rounds):
        for name, (port, pid) in everyone.items():
            progress(f"maximum rate, round {round_ + 1} of {args.rounds}: {name}")
            runs[name].append(h2load_max(port, args.seconds, pid))
    lines.append(f"| target | max req/s (h2load, 64 conns, median of {args.rounds}) | each round | vs nginx | CPU us/req |")
    lines.append("|---|---|---|---|---|")
    nginx_max = statistics.median(rate for rate, _ in runs["nginx"])
    for name, measured in runs.items():
        rate = statistics.median(r for r, _ in measured)
        cpus = [c for _, c in measured if c is not None]
        cpu = f"{statistics.median(cpus):.0f}" if cpus else "-"
        each = ", ".join(f"{r:.0f}" for r, _ in measured)
        lines.append(f"| {name} | {rate:.0f} | {each} | {rate / nginx_max:.0%} | {cpu} |")
    lines.append(f"load average {os.getloadavg()[0]:.1f} at the end of the maximum rates")
    lines.append("")
    progress("SSE")
    lines.append(sse_section(*sse_ports, targets["nginx"][0]))
    return "\n".join(lines)


def sse_section(sse_port: int, berth_port: int, nginx_port: int) -> str:
    """SSE direct, through berth (the boot whose child is the SSE app) and through nginx's /stream route."""
    rows = ["| SSE (25 events, 20 ms apart) | first chunk ms | mean gap ms | added first chunk ms | added gap ms |", "|---|---|---|---|---|"]
    base = None
    for name, port in (("direct", sse_port), ("nginx", nginx_port), ("berth", berth_port)):
        first, gap = uvloop.run(sse_timings(port))
        base = base or (first, gap)
        added = ("-", "-") if name == "direct" else (f"{first - base[0]:.2f}", f"{gap - base[1]:.3f}")
        rows.append(f"| {name} | {first:.2f} | {gap:.3f} | {added[0]} | {added[1]} |")
    return "\n".join(rows)


def progress(step: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step}", file=sys.stderr, flush=True)


def start_boot(app_port: int, proxy_port: int, admin_port: int, command: list[str], log: Path,
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """berth boot running `command` as its child, its log in `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "bootstrap.cli", "boot", "--port", str(app_port), "--proxy-port", str(proxy_port),
         "--admin-port", str(admin_port), "--drain-delay", "0", "--", *command],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={**os.environ, **(env or {})},
    )


def wait_ready(admin_port: int, boot: subprocess.Popen, log: Path) -> None:
    """Until berth boot's /ready answers; its log's tail if it exits first (it would never answer)."""
    while subprocess.run(["curl", "-sf", f"http://127.0.0.1:{admin_port}/ready"], capture_output=True).returncode != 0:
        if boot.poll() is not None:
            raise SystemExit(f"berth boot exited with {boot.returncode} before it was ready; {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
