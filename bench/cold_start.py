"""Journey 2's cold start: time to first token with an empty node cache, then with a warm one.

    .venv/bin/python bench/cold_start.py [--runs 1]

Each run starts `berth boot --vllm` in the Dockerfile.vllm image (built on images/vllm-cpu) with
a tiny random-weight Llama whose files sit in a bucket of a local S3 server (moto, standing in
for OSS), exactly as tests/test_vllm_journey.py does, and measures from `docker run` to the
first streamed token of a chat completion sent when /ready turns 200. Cold: an empty node cache
(weights downloaded, kernels compiled). Warm: a second instance on the same node cache (weights
and compiled kernels reused). The phases come from the bootstrap's /status. Printed as a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness import images  # noqa: E402
from tests.harness.s3 import start_moto, stop_moto  # noqa: E402
from tests.harness.tiny_llama import make_tiny_llama  # noqa: E402
from tests.harness.vllm_service import SERVED_NAME, Node, Service, start_service  # noqa: E402

PHASES = ("prepare", "launch", "warmup", "startup")


def first_token(service: Service) -> tuple[float, float]:
    """Seconds from sending a streamed chat request to its first token, and to its end."""
    from openai import OpenAI

    client = OpenAI(base_url=service.proxy + "/v1", api_key="unused", max_retries=0, timeout=60)
    sent = time.monotonic()
    first = None
    for chunk in client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, stream=True,
        extra_body={"ignore_eos": True},
    ):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - sent
    return first or float("nan"), time.monotonic() - sent


def one_start(docker_client, image: str, node: Node) -> dict[str, float]:
    started = time.monotonic()
    service = start_service(docker_client, image, node)
    try:
        ttft, total = first_token(service)
        to_first_token = time.monotonic() - started - (total - ttft)
        status = requests.get(service.admin + "/status", timeout=5).json()
    finally:
        service.container.remove(force=True)
    row = {"ready": service.ready_after_s, "ttft_after_ready": ttft, "to_first_token": to_first_token}
    row.update({phase: status["phases"].get(phase, float("nan")) for phase in PHASES})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="cold+warm pairs, each on a fresh node cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import docker

    client = docker.from_env()
    built = time.monotonic()
    image = images.vllm_image(client)
    print(f"images ready in {time.monotonic() - built:.0f} s ({image})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as scratch:
        s3 = start_moto(Path(scratch) / "moto.log")
        try:
            model = make_tiny_llama(Path(scratch) / "tiny-llama")
            bucket = s3.new_bucket("berth-bench")
            s3.upload_tree(bucket, "models/tiny-llama", model)
            cold, warm = [], []
            for run in range(args.runs):
                node = Node(s3, f"s3://{bucket}/models/tiny-llama/", Path(scratch) / f"node-cache-{run}")
                node.cache.mkdir()
                cold.append(one_start(client, image, node))
                warm.append(one_start(client, image, node))
                print(f"run {run + 1}: cold {cold[-1]['to_first_token']:.1f} s, warm {warm[-1]['to_first_token']:.1f} s",
                      file=sys.stderr)
        finally:
            stop_moto(s3)

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    columns = ("to_first_token", "ready", *PHASES, "ttft_after_ready")
    print(f"| node cache | {' | '.join(columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    for label, rows in (("empty (cold)", cold), ("warm", warm)):
        cells = [f"{median(rows, c) * 1000:.0f} ms" if c == "ttft_after_ready" else f"{median(rows, c):.1f} s" for c in columns]
        print(f"| {label} | {' | '.join(cells)} |")
    ratio = median(cold, "to_first_token") / median(warm, "to_first_token")
    print(f"\ncold / warm time to first token: {ratio:.2f}x ({args.runs} run(s), medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
