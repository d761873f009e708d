"""User-space instructions per proxied request: berth's data path against nginx, counted, not timed.

    PYTHONPATH=$PWD .venv/bin/python -m bench.instructions [--requests 3000]

The throughput figures of bench/proxy.py and bench/gateway.py move by 10-40% between runs
on a shared 2-core VM, and berth's rate against nginx's with them (32% and 40% in two sessions for the
same data path). Instructions executed do not: each target runs under valgrind's callgrind with
counting off, is warmed up, then counts only while h2load sends a fixed number of requests
(16 connections, keep-alive). The figure is user space only (the kernel's side, the same
two reads and two writes per request for every target here, is not counted), and says what
a change to berth's code costs or saves per request, exactly, in one short run.

Targets, each a proxy in front of nginx returning a constant (two backends for the gateways):
- nginx as a keep-alive reverse proxy (1 process), and with `least_conn` over two backends;
- berth boot's data path (the express lane, the chain behind it) on berth's server side and
  pool, assembled as `berth boot` assembles it, in one process;
- `berth gateway --routes-file` in front of the two backends;
- for scale: berth's server side answering a constant (no upstream), and a bare httptools
  protocol in front of berth's pool (no chain), bench/proxy.py's candidates.

Needs valgrind, nginx and h2load: `apt-get install valgrind nginx nghttp2-client`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gateway import BACKEND, LEAST_CONN, PATH as GATEWAY_PATH, routes_file
from bench.proxy import BERTH_HELLO, LEAN_PROXY, NGINX_CONF, PROXY_BODY, free_port, progress, wait_port

REPO = Path(__file__).resolve().parents[1]
# berth boot's data path exactly as bootstrap/boot.py builds it, with the state READY.
BERTH_CHAIN = """\
import asyncio, sys, uvloop
from serving.metrics import Metrics
from serving.proxy import ProxyConfig, start_proxy, upstream_pool
from serving.state import BootState, State
async def main():
    state = BootState(); state.set(State.READY)
    config = ProxyConfig(upstream_port=int(sys.argv[2]))
    metrics = Metrics(state)
    await start_proxy(state, config, metrics, upstream_pool(config), "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def counted(command: list[str], port: int, path: str, requests: int, out: Path, log: Path) -> int:
    """Instructions (Ir) the process executed while h2load sent `requests` requests to it."""
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )
    try:
        wait_port(port, timeout=180)  # startup under valgrind is ~30x slower
        url = f"http://127.0.0.1:{port}{path}"
        h2load(url, max(200, requests // 5))  # warm-up: every path translated, pools full
        subprocess.run(["callgrind_control", "--instr=on", str(process.pid)], check=True, capture_output=True)
        h2load(url, requests)
        subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while not (dumps := sorted(out.parent.glob(out.name + ".*"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not dumps:
            raise SystemExit(f"callgrind wrote no dump for {command}; see {log}")
        totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
        assert totals is not None, dumps[-1]
        return int(totals.group(1))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def h2load(url: str, requests: int) -> None:
    out = subprocess.run(["h2load", "--h1", "-t", "1", "-c", "16", "-n", str(requests), url],
                         capture_output=True, text=True, timeout=900).stdout
    done = re.search(r"(\d+) succeeded", out)
    if done is None or int(done.group(1)) != requests:
        raise SystemExit(f"h2load against {url}: not every request succeeded:\n{out[-1500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests counted per target (default 3000)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install valgrind nginx nghttp2-client")
    prefix = Path(tempfile.mkdtemp(prefix="berth-bench-instructions-"))
    a, b = free_port(), free_port()
    backends = []
    for name, port in (("a", a), ("b", b)):
        conf = prefix / f"{name}.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, name=name, body=BACKEND.format(port=port)))
        backends.append(subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL))
    routes = routes_file(prefix, a, b)
    python = [sys.executable, "-c"]

    def nginx_proxy(name: str, body: str) -> list[str]:
        conf = prefix / f"{name}.conf"
        # One process, as valgrind counts it: the master's worker loop runs in the master.
        conf.write_text("master_process off;\n" + NGINX_CONF.format(prefix=prefix, name=name, body=body))
        return ["nginx", "-p", str(prefix), "-c", str(conf)]

    ports = {name: free_port() for name in ("nginx", "berth", "lean", "hello", "nginx_lc", "gateway")}
    targets = {
        "nginx, reverse proxy (keep-alive upstream)": (
            nginx_proxy("proxy", PROXY_BODY.format(port=ports["nginx"], upstream=a, sse=a)), ports["nginx"], "/"),
        "berth boot's data path (express lane, chain behind it)": (
            [*python, BERTH_CHAIN, str(ports["berth"]), str(a)], ports["berth"], "/"),
        "httptools protocol + berth's pool (no chain)": ([*python, LEAN_PROXY, str(ports["lean"]), str(a)], ports["lean"], "/"),
        "berth's server, hello world (no upstream)": ([*python, BERTH_HELLO, str(ports["hello"])], ports["hello"], "/"),
        "nginx least_conn over two backends": (
            nginx_proxy("least", LEAST_CONN.format(a=a, b=b, port=ports["nginx_lc"])), ports["nginx_lc"], GATEWAY_PATH),
        "berth gateway --routes-file over two backends": (
            [sys.executable, "-m", "bootstrap.cli", "gateway", "--routes-file", str(routes), "--listen",
             f"127.0.0.1:{ports['gateway']}", "--admin", f"127.0.0.1:{free_port()}"], ports["gateway"], GATEWAY_PATH),
    }
    rows = []
    try:
        for port in (a, b):
            wait_port(port)
        for index, (name, (command, port, path)) in enumerate(targets.items()):
            progress(f"{name}: counting {args.requests} requests under callgrind")
            total = counted(command, port, path, args.requests, prefix / f"callgrind.{index}", prefix / f"target-{index}.log")
            rows.append((name, total / args.requests))
    finally:
        for backend in backends:
            backend.terminate()
            backend.wait(10)
    base = {"proxy": rows[0][1], "gateway": rows[4][1]}
    lines = [f"python {sys.version.split()[0]}; {args.requests} requests counted per target, 16 connections, after a warm-up", "",
             "| target | user-space instructions per request | vs nginx |", "|---|---|---|"]
    for index, (name, per) in enumerate(rows):
        against = base["gateway"] if index >= 4 else base["proxy"]
        lines.append(f"| {name} | {per:,.0f} | {per / against:.1f}x |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
