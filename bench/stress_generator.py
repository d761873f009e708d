"""berth's load generator (agent/stress/generator.py) against h2load at the same fixed rates.

    .venv/bin/python bench/stress_generator.py [--seconds 10] [--rates 1000,4000] [--rounds 2]

One run, same machine, side by side: nginx (1 worker) returns a constant; at each rate the
generator (open loop, evenly spaced arrivals, one event loop thread; then --workers 2) and
h2load (`--rps`, 10 HTTP/1.1 clients, one thread) send for `--seconds`, alternating for
`--rounds`. Per tool: achieved rate against offered, p50 and p99, and the sender's own CPU
per 1,000 requests (the generator: its loop thread's or worker processes' CPU time; h2load:
its rusage as a child). The generator's latency counts from each scheduled send (its own
lateness included: its timers tick in milliseconds), and, in its own column, from the actual
send; h2load's from when it sent (it waits for an answer before a client's next request).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.stress.generator import Generator, Load, Request, percentile  # noqa: E402
from tests.harness.parts import free_port, port_open, wait_until  # noqa: E402

NGINX = """\
worker_processes 1;
daemon off;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ default_type text/plain; return 200 "ok\\n"; }} }}
}}
"""
H2LOAD_CLIENTS = 10


def generator_row(url: str, rate: float, seconds: float, workers: int) -> dict:
    with Generator([Request("/")], url, workers=workers) as generator:
        run = generator.run(Load(rate=rate, seconds=seconds, burstiness=float("inf")))
    latencies = run.latencies()
    return {"tool": f"berth generator ({workers} {'process' if workers > 1 else 'thread'}{'es' if workers > 1 else ''})",
            "sent": len(run.results), "ok": len(latencies), "wall": run.wall_s,
            "latencies": latencies, "from_send": [r.latency - r.lag for r in run.results if r.ok], "cpu": run.cpu_s,
            "lag": [r.lag for r in run.results], "limited": run.generator_limit() is not None}


def h2load_row(url: str, rate: float, seconds: float, prefix: Path) -> dict:
    log = prefix / "h2load.log"
    log.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["h2load", "--h1", "-t", "1", "-c", str(H2LOAD_CLIENTS), "--rps", f"{rate / H2LOAD_CLIENTS:g}",
                    "-D", f"{seconds:g}", f"--log-file={log}", url + "/"], capture_output=True, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    latencies = [int(duration) / 1e6 for _, status, duration in rows if status == "200"]
    return {"tool": f"h2load --rps ({H2LOAD_CLIENTS} clients, 1 thread)", "sent": len(rows), "ok": len(latencies),
            "wall": min(wall, seconds), "latencies": latencies, "from_send": latencies,
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), "lag": [], "limited": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rates", default="1000,4000")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for tool in ("nginx", "h2load"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing: apt-get install nginx nghttp2-client")
    prefix = Path(tempfile.mkdtemp(prefix="berth-bench-gen-"))
    port = free_port()
    (prefix / "nginx.conf").write_text(NGINX.format(prefix=prefix, port=port))
    nginx = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "nginx listening")
        url = f"http://127.0.0.1:{port}"
        print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, load average "
              f"{os.getloadavg()[0]:.1f} at the start; python {sys.version.split()[0]}; nginx 1 worker; "
              f"{args.seconds:g} s per run, {args.rounds} rounds (sums over rounds; percentiles over all requests)\n")
        print("| offered req/s | sender | achieved req/s | achieved / offered | p50 ms | p99 ms | p50 ms from the actual send | sender CPU ms / 1000 req | note |")
        print("|---|---|---|---|---|---|---|---|---|")
        for rate in (float(r) for r in args.rates.split(",")):
            rows: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for row in (generator_row(url, rate, args.seconds, 1), generator_row(url, rate, args.seconds, 2),
                            h2load_row(url, rate, args.seconds, prefix)):
                    rows.setdefault(row["tool"], []).append(row)
            for tool, runs in rows.items():
                ok = sum(r["ok"] for r in runs)
                achieved = ok / sum(r["wall"] for r in runs)
                cpu_ms = sum(r["cpu"] for r in runs) / sum(r["sent"] for r in runs) * 1e6
                latencies = [value for r in runs for value in r["latencies"]]
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                sent_p50 = percentile([value for r in runs for value in r["from_send"]], 0.5)
                lags = [value for r in runs for value in r["lag"]]
                notes = (f"send lag p99 {percentile(lags, 0.99) * 1000:.1f} ms" if lags else "h2load measures from its own send") + (
                    "; generator-limited (its own verdict)" if any(r["limited"] for r in runs) else "")
                print(f"| {rate:.0f} | {tool} | {achieved:.0f} | {achieved / rate:.1%} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | "
                      f"{sent_p50 * 1000:.2f} | {cpu_ms:.0f} | {notes} |")
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    main()
