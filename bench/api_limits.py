"""Agent API under large specs: how long other requests wait while big specs arrive, and what a
50 MB body costs, for this checkout and a baseline checkout side by side in one run.

    .venv/bin/python -m bench.api_limits [--baseline /path/to/other/checkout] [--specs 20]

Each side is a real `berth agent` (process runtime, its own state directory) started from its
checkout (PYTHONPATH). A thread asks GET /healthz every 10 ms while the main thread posts
`--specs` 1 MB specs that are invalid only at the end (an upper-case service name: the whole
spec is validated, nothing deploys), then one 50 MB body. Reported: /healthz latency (p50, p99,
max) during the posts, the 50 MB body's answer and time, and the state database's size after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from tests.harness.parts import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]


def big_spec(size: int, name: str) -> bytes:
    """A spec of about `size` bytes (at most), its bulk in env entries of about 140 bytes each."""
    env = [{"name": f"FILLER_{i:07d}", "value": "x" * 100} for i in range(size // 145)]
    return json.dumps({"metadata": {"name": name}, "containers": [{"image": "i", "env": env}]}).encode()


def measure(checkout: Path, specs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-api-") as folder:
        root, port = Path(folder), free_port()
        (root / "agent.json").write_text(json.dumps({"listen": f"127.0.0.1:{port}", "state_dir": str(root / "state"),
                                                     "cache_dir": str(root / "cache"), "runtime": "process"}))
        log = open(root / "agent.log", "wb")
        agent = subprocess.Popen([sys.executable, "-m", "bootstrap.cli", "agent", "--config", str(root / "agent.json")],
                                 env={**os.environ, "PYTHONPATH": str(checkout)}, stdout=log, stderr=log, cwd=checkout)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _answers(url), 30, "agent start")
            headers = {"Authorization": "Bearer " + (root / "state" / "token").read_text().strip()}
            latencies: list[float] = []
            done = threading.Event()

            def poll() -> None:
                with requests.Session() as session:
                    while not done.is_set():
                        started = time.perf_counter()
                        session.get(url + "/healthz", timeout=30)
                        latencies.append(time.perf_counter() - started)
                        time.sleep(0.01)

            poller = threading.Thread(target=poll)
            poller.start()
            body = big_spec(1_000_000, "Invalid-Name")  # just under the 1 MiB default limit
            statuses = [requests.post(url + "/v1/services", data=body, headers=headers, timeout=60).status_code
                        for _ in range(specs)]
            done.set()
            poller.join()
            huge = big_spec(50 << 20, "huge")
            started = time.perf_counter()
            answer = requests.post(url + "/v1/services", data=huge, headers=headers, timeout=300)
            huge_s = time.perf_counter() - started
            database = sum(path.stat().st_size for path in (root / "state").glob("state.db*"))
            requests.delete(url + "/v1/services/huge", headers=headers, timeout=60)
        finally:
            agent.terminate()
            agent.wait(timeout=60)
    latencies.sort()
    return {"statuses": sorted(set(statuses)), "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "max_ms": latencies[-1] * 1000,
            "huge_status": answer.status_code, "huge_s": huge_s, "database_mb": database / 1e6}


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout measured the same way (e.g. main before issue 16)")
    parser.add_argument("--specs", type=int, default=20, help="1 MB specs posted while /healthz is timed (20)")
    args = parser.parse_args()
    sides = [("this checkout", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    for label, checkout in sides:
        row = measure(checkout.resolve(), args.specs)
        print(f"{label}: 1 MB specs answered {row['statuses']}; /healthz meanwhile p50 {row['p50_ms']:.1f} ms, "
              f"p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms; 50 MB body: {row['huge_status']} in "
              f"{row['huge_s']:.2f} s; state database {row['database_mb']:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
