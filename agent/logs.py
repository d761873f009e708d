"""Container logs: Docker's json-file driver with rotation, so a chatty service cannot fill the disk.

Defaults are the kubelet's (containerLogMaxSize 10 Mi, containerLogMaxFiles 5): at most
50 MiB of logs per container. `docker logs` (and `berth logs`) still read every rotated file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from bootstrap.units import MIB

if TYPE_CHECKING:
    import docker.types

DEFAULT_LOG_MAX_SIZE_BYTES = 10 * MIB
DEFAULT_LOG_MAX_FILES = 5


def log_config(max_size_bytes: int = DEFAULT_LOG_MAX_SIZE_BYTES, max_files: int = DEFAULT_LOG_MAX_FILES) -> "docker.types.LogConfig":
    """The `log_config` for a container create call: json-file, rotated at `max_size_bytes`."""
    import docker.types

    if max_size_bytes < 1:
        raise ValueError(f"log_max_size must be at least 1 byte, got {max_size_bytes}")
    if max_files < 1:
        raise ValueError(f"log_max_files must be at least 1, got {max_files}")
    return docker.types.LogConfig(
        type=docker.types.LogConfig.types.JSON,
        config={"max-size": str(max_size_bytes), "max-file": str(max_files)},
    )


def log_files(container: Mapping[str, Any]) -> list[Path]:
    """A container's log file and its rotated siblings (`<id>-json.log.1`, ...), from its inspect."""
    current = container.get("LogPath")
    if not current:
        return []  # a log driver that keeps no local file
    path = Path(current)
    return sorted(p for p in path.parent.glob(path.name + "*") if p.is_file())
