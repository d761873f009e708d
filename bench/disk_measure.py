"""How long measuring an instance's system disk takes, against `du -s` of its writable layer.

A container writes one large file and many small ones into its writable layer; berth's
measurement (`agent.disk.measure_instance_disk`: the engine's SizeRw plus logs) and the
kubelet-style baseline (`du -s` of the overlay upper directory, which is what cAdvisor's
walk amounts to) run alternately in one process, and the medians are compared.

    .venv/bin/python -m bench.disk_measure [--big-mib 1024] [--small-files 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import uuid

import docker

from agent.disk import measure_instance_disk
from tests.harness.images import base_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    client = docker.from_env(timeout=300)
    image = base_image(client)
    fill = (
        f"dd if=/dev/zero of=/big bs=1M count={args.big_mib} status=none && mkdir /small && cd /small && "
        f"python3 -c 'import os\nfor i in range({args.small_files}): open(str(i), \"wb\").write(os.urandom(4096))' && "
        "touch /done && exec sleep 3600"
    )
    container = client.containers.run(image, ["sh", "-c", fill], name=f"berth-bench-disk-{uuid.uuid4().hex[:8]}", detach=True)
    try:
        started = time.monotonic()
        while container.exec_run(["test", "-f", "/done"]).exit_code != 0:
            time.sleep(0.5)
        print(f"filled {args.big_mib} MiB + {args.small_files} x 4 KiB in {time.monotonic() - started:.1f} s")
        upper = client.api.inspect_container(container.id)["GraphDriver"]["Data"]["UpperDir"]
        berth, du = [], []
        for _ in range(args.rounds):
            t0 = time.monotonic()
            usage = measure_instance_disk(client, container.id)
            berth.append(time.monotonic() - t0)
            t0 = time.monotonic()
            du_bytes = int(subprocess.run(["du", "-s", "-B1", upper], capture_output=True, text=True, check=True).stdout.split()[0])
            du.append(time.monotonic() - t0)
        b, d = statistics.median(berth), statistics.median(du)
        print(f"berth measure_instance_disk: median {b * 1000:.0f} ms  (writable layer {usage.writable_layer / 2**20:.0f} MiB)")
        print(f"du -s of the upper dir:      median {d * 1000:.0f} ms  ({du_bytes / 2**20:.0f} MiB)")
        print(f"ratio berth / du: {b / d:.2f}")
    finally:
        container.remove(force=True)


if __name__ == "__main__":
    main()
