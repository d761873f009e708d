"""What the prepare and cache tests share: specs, a model-like tree, and prepare() in a real process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from bootstrap.prepare import PrepareContext, prepare
from bootstrap.spec import ServiceSpec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
BIG_SIZE = 4 * 1024 * 1024 + 1234  # 17 parts of 256 KiB: several ranged GETs at once
# Small parts and quick retries keep each test to seconds.
FAST = {
    "BERTH_DOWNLOAD_PART_SIZE": "256Ki",
    "BERTH_DOWNLOAD_CONCURRENCY": "8",
    "BERTH_DOWNLOAD_ATTEMPTS": "3",
    "BERTH_DOWNLOAD_BACKOFF": "0.02",
}

RUNNER = """
import asyncio, sys
from pathlib import Path
from bootstrap.log import configure
from bootstrap.prepare import PrepareContext, PrepareError, prepare
from bootstrap.spec import parse_spec
configure()
spec = parse_spec(Path(sys.argv[1]).read_text()).spec
try:
    asyncio.run(prepare(PrepareContext(spec, Path(sys.argv[2]), progress_interval=0.2)))
except PrepareError as exc:
    print(f"prepare failed: {exc}", file=sys.stderr)
    sys.exit(3)
print("prepared", flush=True)
if len(sys.argv) > 3:
    sys.stdin.read()  # a running instance: hold the cache lease until stdin closes
"""


def object_spec(path: str, mount: Path, *, name: str = "svc", **store: object) -> ServiceSpec:
    scheme = path.split("://", 1)[0]
    entry = {"mount_path": str(mount), scheme: {"path": path, "readOnly": True, **store}}
    return parse_spec({"metadata": {"name": name}, "containers": [{"image": "app:1"}], "storage": [entry]}).spec


def model_tree(root: Path, big_size: int = BIG_SIZE) -> dict[str, bytes]:
    """A model-like tree: nested prefixes, an empty file, small configs and one large file."""
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer/vocab.txt": os.urandom(3000),
        "tokenizer/special/empty.txt": b"",
        "weights/model-00001.safetensors": os.urandom(big_size),
    }
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def assert_tree(mount: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        assert (mount / relative).read_bytes() == data, f"{relative} differs"
    found = sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*") if p.is_file())
    assert found == sorted(files)


def run_prepare(spec: ServiceSpec, cache_dir: Path, env: dict[str, str], **fields: object) -> dict[str, float]:
    """prepare() as the boot calls it; returns the reported step timings."""
    steps: dict[str, float] = {}
    ctx = PrepareContext(spec, cache_dir, {**FAST, **env}, lambda step, seconds: steps.__setitem__(step, seconds),
                         progress_interval=0.2, **fields)
    asyncio.run(prepare(ctx))
    return steps


def start_prepare_process(spec: ServiceSpec, cache_dir: Path, env: dict[str, str], *, hold: bool = False) -> subprocess.Popen[str]:
    """prepare() in its own process, like a second instance booting on the node."""
    spec_file = cache_dir.parent / f"spec-{os.urandom(4).hex()}.json"
    spec_file.write_text(json.dumps(spec.to_json_dict()))
    args = [sys.executable, "-c", RUNNER, str(spec_file), str(cache_dir)] + (["hold"] if hold else [])
    return subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **FAST, **env}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def endpoint_env(server_env: dict[str, str], endpoint: str) -> dict[str, str]:
    """The server's keys with the endpoint swapped, e.g. for a fault proxy in front of it."""
    return {**server_env, "AWS_ENDPOINT_URL": endpoint, "OSS_ENDPOINT": endpoint}
