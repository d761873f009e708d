"""prepare() for local and NAS paths, empty_dir, the fuse mode's preconditions, and pip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

import pytest

from bootstrap import fuse
from bootstrap.prepare import PrepareError
from bootstrap.spec import parse_spec
from tests.prepare_support import object_spec, run_prepare


def _spec(storage: list[dict] | None = None, prepare: dict | None = None):
    container = {"image": "app:1", **({"prepare": prepare} if prepare else {})}
    return parse_spec({"metadata": {"name": "svc"}, "containers": [container], "storage": storage or []}).spec


def test_a_local_path_that_was_not_mounted_is_a_clear_error(tmp_path: Path) -> None:
    spec = _spec([{"mount_path": str(tmp_path / "absent"), "local": {"path": "/srv/models"}}])
    with pytest.raises(PrepareError, match=r"absent: not mounted \(the agent should bind-mount the local path here\)"):
        run_prepare(spec, tmp_path / "cache", {})


def test_a_mounted_local_path_passes_and_is_timed(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    spec = _spec([{"mount_path": str(tmp_path / "models"), "local": {"path": "/srv/models"}}])
    assert f"storage {tmp_path / 'models'}" in run_prepare(spec, tmp_path / "cache", {})


# Root reads every directory through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: the check runs without them.
WITHOUT_READ_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]

CHECK_UNREADABLE = """
import asyncio, sys
from bootstrap.prepare import PrepareContext, PrepareError, prepare
from bootstrap.spec import parse_spec
spec = parse_spec({"metadata": {"name": "svc"}, "containers": [{"image": "app:1"}],
                   "storage": [{"mount_path": sys.argv[1], "nfs": {"server": "nas", "path": "/export"}}]}).spec
try:
    asyncio.run(prepare(PrepareContext(spec, sys.argv[2], {})))
except PrepareError as exc:
    print(exc)
"""


def test_an_unreadable_nfs_path_is_a_clear_error() -> None:
    base = Path(tempfile.mkdtemp(prefix="berth-nas-"))
    try:
        (base / "nas").mkdir(mode=0)
        (base / "cache").mkdir(mode=0o777)
        result = subprocess.run(
            [*(WITHOUT_READ_OVERRIDE if os.getuid() == 0 else []), sys.executable, "-c", CHECK_UNREADABLE,
             str(base / "nas"), str(base / "cache")],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f"storage {base / 'nas'}: not readable by uid" in result.stdout
    finally:
        (base / "nas").chmod(0o755)
        shutil.rmtree(base)


def test_empty_dir_is_created(tmp_path: Path) -> None:
    run_prepare(_spec([{"mount_path": str(tmp_path / "scratch"), "empty_dir": {}}]), tmp_path / "cache", {})
    assert (tmp_path / "scratch").is_dir() and not os.path.ismount(tmp_path / "scratch")


@pytest.mark.skipif(not fuse._has_capability(fuse.CAP_SYS_ADMIN), reason="tmpfs needs CAP_SYS_ADMIN")
def test_empty_dir_in_memory_is_a_tmpfs_of_the_limit(tmp_path: Path) -> None:
    target = tmp_path / "shm"
    spec = _spec([{"mount_path": str(target), "empty_dir": {"medium": "memory", "size_limit": "8Mi"}}])
    try:
        run_prepare(spec, tmp_path / "cache", {})
        assert os.path.ismount(target)
        stats = os.statvfs(target)
        assert stats.f_blocks * stats.f_frsize == 8 * 1024 * 1024
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_fuse_names_what_is_missing(tmp_path: Path) -> None:
    missing = fuse.missing_privileges(device=tmp_path / "no-fuse-device")
    assert any("--device /dev/fuse" in item for item in missing)


def test_fuse_mode_without_privileges_fails_clearly_and_suggests_cache_mode(s3_server, tmp_path: Path) -> None:
    if not fuse.missing_privileges():
        pytest.skip("this machine can FUSE-mount; the error path needs one that cannot")
    spec = object_spec(f"oss://{s3_server.new_bucket()}/m/", tmp_path / "mnt", mode="fuse")
    with pytest.raises(PrepareError, match=r"mode 'fuse' needs .*; or use mode 'cache' with readOnly: true"):
        run_prepare(spec, tmp_path / "cache", s3_server.env())


# --- pip ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> str:
    """A throwaway Python with pip, standing in for the image's own."""
    root = tmp_path_factory.mktemp("image-python")
    venv.create(root, with_pip=True)
    return str(root / "bin" / "python")


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """A local index (PIP_FIND_LINKS) holding one tiny wheel made here."""
    house = tmp_path / "wheels"
    house.mkdir()
    info = "berth_probe-1.0.dist-info"
    with zipfile.ZipFile(house / "berth_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("berth_probe/__init__.py", "ANSWER = 42\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: berth-probe\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return house


def _offline(house: Path) -> dict[str, str]:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(house), "PATH": os.environ["PATH"]}


def test_requirements_are_installed_into_the_image_python(image_python: str, wheelhouse: Path, tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("berth-probe==1.0\n")
    spec = _spec(prepare={"pythonRequirementsPath": str(requirements)})

    steps = run_prepare(spec, tmp_path / "cache", _offline(wheelhouse), python=image_python)

    assert "pip" in steps
    answer = subprocess.run([image_python, "-c", "import berth_probe; print(berth_probe.ANSWER)"],
                            capture_output=True, text=True, check=True).stdout
    assert answer.strip() == "42"


def test_a_bad_requirement_stops_with_pips_own_error(image_python: str, wheelhouse: Path, tmp_path: Path) -> None:
    spec = _spec(prepare={"pythonRequirements": ["berth-no-such-package==9.9"]})
    with pytest.raises(PrepareError, match=r"(?s)pip install failed \(exit 1\).*No matching distribution found for berth-no-such-package==9\.9"):
        run_prepare(spec, tmp_path / "cache", _offline(wheelhouse), python=image_python)


def test_a_missing_requirements_file_names_the_field(tmp_path: Path) -> None:
    spec = _spec(prepare={"pythonRequirementsPath": str(tmp_path / "nope.txt")})
    with pytest.raises(PrepareError, match="pythonRequirementsPath: .*nope.txt does not exist"):
        run_prepare(spec, tmp_path / "cache", {}, python=sys.executable)
