"""The fuse mode: a lazy FUSE mount of an OSS/S3 prefix (fsspec over s3fs, `berth[fuse]`).

For read-write prefixes, or trees too large to copy. Nothing is downloaded up front: each
read becomes ranged GETs. The mount is served by a thread of the boot process (PID 1 in the
container), so it lives exactly as long as the instance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from bootstrap.objectstore import Location

log = logging.getLogger("berth.prepare")

CAP_SYS_ADMIN = 21
FUSE_DEVICE = Path("/dev/fuse")
MOUNT_WAIT_S = 15.0


class FuseUnavailable(Exception):
    """The container cannot FUSE-mount; the message says what to change."""


def missing_privileges(device: Path = FUSE_DEVICE) -> list[str]:
    """What this process lacks for a FUSE mount: /dev/fuse, CAP_SYS_ADMIN, fusepy or libfuse."""
    missing = []
    if not device.exists():
        missing.append(f"{device} (run the container with --device /dev/fuse)")
    if not _has_capability(CAP_SYS_ADMIN):
        missing.append("CAP_SYS_ADMIN (run the container with --cap-add SYS_ADMIN)")
    try:
        import fuse  # noqa: F401 - fusepy, which also loads libfuse.so.2
    except ImportError:
        missing.append("fusepy (install berth[fuse])")
    except OSError:
        missing.append("libfuse2 (apt-get install libfuse2 in the image)")
    return missing


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def mount(location: Location, mount_path: Path, *, read_only: bool) -> None:
    """FUSE-mount the prefix at mount_path and wait until the kernel shows the mount."""
    missing = missing_privileges()
    if missing:
        raise FuseUnavailable(
            f"mode 'fuse' needs {', '.join(missing)}; or use mode 'cache' with readOnly: true, which needs no privileges"
        )
    import s3fs
    from fsspec.fuse import FUSEr
    from fuse import FUSE

    keys = {}
    if not location.anonymous:
        keys = {"key": location.access_key.get_secret_value(), "secret": location.secret_key.get_secret_value()}
    fs = s3fs.S3FileSystem(
        anon=location.anonymous, endpoint_url=location.endpoint,
        client_kwargs={"region_name": location.region},
        config_kwargs={"s3": {"addressing_style": location.addressing_style}}, **keys,
    )
    mount_path.mkdir(parents=True, exist_ok=True)
    root = f"{location.bucket}/{location.prefix}".rstrip("/") + "/"
    options = {"ro": True} if read_only else {}

    def serve() -> None:
        FUSE(FUSEr(fs, root), str(mount_path), nothreads=True, foreground=True, allow_other=True, **options)

    threading.Thread(target=serve, name=f"fuse {mount_path}", daemon=True).start()
    deadline = time.monotonic() + MOUNT_WAIT_S
    while not os.path.ismount(mount_path):
        if time.monotonic() > deadline:
            raise FuseUnavailable(f"the FUSE mount at {mount_path} did not appear within {MOUNT_WAIT_S:.0f} s")
        time.sleep(0.05)
    log.info("%s: FUSE-mounted at %s (%s)", location.url, mount_path, "read-only" if read_only else "read-write")
