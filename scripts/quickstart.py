"""The core of `bash scripts/quickstart`: the seed's first quick start, for real, on this machine.

1. an S3 endpoint standing in for OSS (moto's server, on 127.0.0.1, in its own process);
2. the quick start's code (examples/hello/app.py) uploaded to where the config's storage
   points (oss://examplebucket/code/);
3. `berth agent` with the process runtime (no image hub is reachable from a fresh machine
   here, so the config's image cannot be had; see README), the endpoint and keys given to every
   instance through the operator's configuration, never by editing the user's JSON;
4. `berth deploy examples/hello.json --wait`, then the cold start phase by phase (`berth get`);
5. GET /api/predict/hello/hello through the node gateway the agent started (the service's one
   address, whatever its instances' ports): the service's answer.

Everything it started (the service, the agent, its gateway, the S3 server, the mount link) is stopped and
removed on exit, Ctrl-C included. Exit 0 when the service answered "Hello World", else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import botocore.session

from bootstrap.spec import ObjectStore, parse_spec

ROOT = Path(__file__).resolve().parent.parent
BERTH = [sys.executable, "-m", "bootstrap.cli"]
# The S3 stand-in's keys: local and throwaway, given to instances as an operator would give OSS's.
ACCESS_KEY, SECRET_KEY = "quickstart-access-key", "quickstart-secret-key"
EXPECTED = "Hello World"
began = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"quickstart: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def start(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session: Ctrl-C reaches this script alone, which then stops it in order."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def stop(process: subprocess.Popen, what: str, grace: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    say(f"stopped {what}")


def start_s3(python: str, workdir: Path, stack: ExitStack) -> str:
    port = free_port()
    started = time.monotonic()
    server = start([python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], workdir / "s3.log")
    stack.callback(stop, server, "the S3 endpoint")
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.poll() is not None or answers(endpoint), 60, "the S3 endpoint's start")
    if server.poll() is not None:
        raise SystemExit(f"quickstart: the S3 endpoint (moto) exited; see {workdir / 's3.log'}")
    say(f"S3 endpoint standing in for OSS: {endpoint} (moto), up in {time.monotonic() - started:.1f} s")
    return endpoint


def upload_code(endpoint: str, store: ObjectStore, code: Path) -> None:
    """Create the config's bucket and put the code under its prefix, as a user would with ossutil."""
    bucket = store.bucket
    prefix = store.prefix.rstrip("/") + "/" if store.prefix else ""
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1")
    started = time.monotonic()
    s3.create_bucket(Bucket=bucket)
    key = prefix + code.name
    s3.put_object(Bucket=bucket, Key=key, Body=code.read_bytes())
    say(f"uploaded {code.relative_to(ROOT)} to oss://{bucket}/{key} in {time.monotonic() - started:.1f} s")


def start_agent(endpoint: str, workdir: Path, stack: ExitStack) -> dict[str, str]:
    """`berth agent` on a free port; returns the environment the `berth` client commands need."""
    port = free_port()
    config = workdir / "agent.json"
    # The operator's configuration gives every instance the endpoint and keys (a file, not flags:
    # keys stay out of `ps`). No drain delay: nothing load-balances to this instance.
    config.write_text(json.dumps({
        "listen": f"127.0.0.1:{port}", "state_dir": str(workdir / "state"), "cache_dir": str(workdir / "cache"),
        "runtime": "process", "gateway": "127.0.0.1:0", "gateway_admin": "127.0.0.1:0",  # free ports: any machine
        # No mount namespace under the process runtime: the config's /mnt/data is a host path,
        # which the operator allows here (otherwise only <state_dir>/mounts/SERVICE is).
        "process_mount_roots": ["/mnt/data"],
        "env": {"OSS_ENDPOINT": endpoint, "OSS_ACCESS_KEY_ID": ACCESS_KEY, "OSS_ACCESS_KEY_SECRET": SECRET_KEY,
                "BERTH_DRAIN_DELAY": "0"},
    }))
    config.chmod(0o600)
    started = time.monotonic()
    stack.callback(stop_gateway, workdir / "state")  # it outlives the agent (as under systemd): stopped after it
    agent = start([*BERTH, "agent", "--config", str(config)], workdir / "agent.log")
    stack.callback(stop, agent, "berth agent", 30)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: agent.poll() is not None or answers(f"{url}/healthz"), 60, "berth agent's start")
    if agent.poll() is not None:
        raise SystemExit(f"quickstart: berth agent exited:\n{(workdir / 'agent.log').read_text()[-2000:]}")
    say(f"berth agent on {url}, runtime process (the config's image cannot be pulled here: no image hub), "
        f"up in {time.monotonic() - started:.1f} s; log {workdir / 'agent.log'}")
    return {**os.environ, "BERTH_AGENT_URL": url, "BERTH_STATE_DIR": str(workdir / "state")}


def stop_gateway(state_dir: Path) -> None:
    subprocess.run([*BERTH, "gateway", "stop", "--state-dir", str(state_dir)], capture_output=True, timeout=60)
    say("stopped berth gateway")


def clear_mount_link(mount_path: Path, workdir: Path) -> None:
    """The process runtime links the storage's mount path on this host; remove our link only."""
    if mount_path.is_symlink() and str(workdir) in os.readlink(mount_path):
        mount_path.unlink()


def run(config_path: Path, code: Path, s3_python: str, workdir: Path) -> int:
    spec = parse_spec(json.loads(config_path.read_text())).spec
    storage = next(entry for entry in spec.storage if entry.object_store is not None)
    mount_path = Path(storage.mount_path)
    if mount_path.exists() and not mount_path.is_symlink() and any(mount_path.iterdir()):
        raise SystemExit(f"quickstart: {mount_path} exists on this host and is not empty; the process runtime "
                         "links the config's mount path there: move it away first")
    with ExitStack() as stack:
        stack.callback(clear_mount_link, mount_path, workdir)
        endpoint = start_s3(s3_python, workdir, stack)
        upload_code(endpoint, storage.object_store, code)
        env = start_agent(endpoint, workdir, stack)

        say(f"berth deploy {config_path.relative_to(ROOT)} --wait")
        stack.callback(remove_service, spec.name, env)
        deployed = subprocess.run([*BERTH, "deploy", str(config_path), "--wait", "--json", "--timeout", "600"],
                                  stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        if deployed.returncode != 0:
            subprocess.run([*BERTH, "logs", spec.name, "--tail", "30"], env=env)
            say(f"the deploy failed (exit {deployed.returncode}); see above")
            return 1
        service = json.loads(deployed.stdout)
        instance = service["instances"][0]
        say("berth get " + spec.name)
        subprocess.run([*BERTH, "get", spec.name], env=env, check=True)

        phases = instance["cold_start"]
        say("cold start, phase by phase (seconds):")
        for key in ("image_pull_s", "prepare_s", "download_s", "pip_s", "engine_start_s", "warmup_s", "ready_s"):
            value = phases[key]
            print(f"    {key.removesuffix('_s'):<14} {'?' if value is None else f'{value:7.2f}'}", flush=True)

        say(f"the service's address on the node gateway: {service['gateway_url']}")
        url = f"{service['gateway_url']}/hello"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = response.read().decode()
        say(f"GET {url} -> {response.status}")
        print(answer, flush=True)
        if answer.strip() != EXPECTED:
            say(f"the service answered {answer.strip()[:200]!r}, not {EXPECTED!r}")
            return 1
        return 0


def remove_service(name: str, env: dict[str, str]) -> None:
    result = subprocess.run([*BERTH, "rm", name], env=env, capture_output=True, text=True, timeout=60)
    say(f"removed the service {name}" if result.returncode == 0 else f"could not remove {name}: {result.stderr.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "hello.json", help="the EAS service config")
    parser.add_argument("--code", type=Path, default=ROOT / "examples" / "hello" / "app.py", help="the code to upload")
    parser.add_argument("--s3-python", default=sys.executable, help="a Python with moto[server] (default this one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state, cache) at exit")
    args = parser.parse_args()
    # SIGTERM and SIGHUP end the run like Ctrl-C does: through the clean-up below. SIGINT too,
    # explicitly: a shell starting this in the background hands it SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="berth-quickstart-"))
    try:
        return run(args.config.resolve(), args.code.resolve(), args.s3_python, workdir)
    except KeyboardInterrupt:
        say("interrupted: everything this run started was stopped")
        return 130
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        say(f"quickstart finished in {time.monotonic() - began:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
