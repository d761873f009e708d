"""The `process` runtime: each instance is `berth boot` run as a local process group, no engine needed.

For nodes without a container engine (and for developing berth itself). Each instance runs
in its own session with its own proxy and admin ports (as in host network mode), from a
per-service virtualenv under the state directory that sees the agent's own packages, so the
spec's pip libraries land there and nowhere else. A JSON record per instance (pid, start
time, ports, labels) lets a restarted agent re-adopt live processes; the exit code comes
from the status file `berth boot` writes (BERTH_STATUS_FILE).

Each instance's output goes to `logs/<name>.log`, rotated like Docker's json-file (the
operator's log_max_size_bytes and log_max_files). The virtualenv is built aside and renamed
into place once complete, so a kill or a full disk mid-way never leaves a half-made one.
`remove` deletes an instance's logs too; `remove_service` the service's virtualenv.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path
from typing import Callable, Iterator

import psutil

from agent import logs as log_files
from agent.config import AgentConfig
from agent.launch import service_root
from agent.runtime import LABEL_SERVICE, ExitInfo, Handle, LaunchError, LaunchRequest

log = logging.getLogger("berth.agent.process")

LIMITATIONS = [
    "cpu and memory limits are not enforced (no cgroup of its own)",
    "shm_size is not applied: instances share the host's /dev/shm",
    "GPU isolation is by CUDA_VISIBLE_DEVICES only",
    "the image is not used: berth and the service's command must exist on this host",
    "storage: mount paths must lie under <state_dir>/mounts/SERVICE (or a process_mount_roots entry); local paths "
    "are linked there, so readOnly is not enforced; nfs is not mounted",
    "the system-disk limit (extra-ephemeral-storage) is neither enforced nor measured",
    "a lost GPU is not detected (no in-container check)",
]
BOOT_ENTRY = "from bootstrap.cli import main; raise SystemExit(main())"
VENV_MARK = "berth-agent.pth"  # written last: a virtualenv without it is incomplete


_VENV_LOCK = threading.Lock()

class ProcessRuntime:
    name = "process"
    limitations = LIMITATIONS

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self._records = config.state_dir / "processes"
        self._logs = config.state_dir / "logs"
        self._venvs = config.state_dir / "venvs"
        for folder in (self._records, self._logs, self._venvs):
            folder.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}  # started by this agent: reaped here
        self._lock = threading.Lock()

    def has_image(self, image: str) -> bool:
        return True

    def ensure_image(self, image: str, *, always: bool, auth: str | None, progress: Callable[[str], None]) -> None:
        return None  # no images here (see LIMITATIONS)

    def start(self, request: LaunchRequest) -> Handle:
        python = self._service_python(request.service)
        argv = [python, "-c", BOOT_ENTRY, *request.argv[1:]] if request.bootstrap else list(request.argv)
        if not argv:
            raise LaunchError("bootstrap is off and the spec has no command: the process runtime has no image to run",
                              permanent=True)
        self._prepare_mounts(request)
        env = self._environment(request, Path(python).parent)
        log_path = self._logs / f"{request.name}.log"
        status_path = self._records / f"{request.name}.status.json"
        status_path.unlink(missing_ok=True)
        env["BERTH_STATUS_FILE"] = str(status_path)
        with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as output:
            try:
                child = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self._config.state_dir)
            except OSError as exc:
                raise LaunchError(f"cannot run {argv[0]}: {exc.strerror}", permanent=True) from None
        with self._lock:
            self._children[request.name] = child
        record = {
            "id": request.name, "pid": child.pid, "create_time": psutil.Process(child.pid).create_time(),
            "labels": request.labels, "host_ip": request.host_ip, "proxy_port": request.proxy_port,
            "admin_port": request.admin_port, "app_port": None if request.proxy else request.app_port,
            "log": str(log_path), "status": str(status_path), "root": service_root(self._config, request.service),
            "storage_paths": list(request.storage_paths),
        }
        self._record_path(request.name).write_text(json.dumps(record))
        return self._handle(record)

    def _service_python(self, service: str) -> str:
        """A per-service virtualenv that also sees the agent's packages (berth itself)."""
        folder = self._venvs / service
        python = folder / "bin" / "python"
        with _VENV_LOCK:  # a service's instances start at once, each in a thread of its own
            if python.exists() and any(folder.glob(f"lib/python*/site-packages/{VENV_MARK}")):
                return str(python)
            if folder.exists():
                log.warning("the virtualenv %s is incomplete (a kill or a full disk while it was made): made again", folder)
                shutil.rmtree(folder, ignore_errors=True)
            building = self._venvs / f".{service}.building"
            shutil.rmtree(building, ignore_errors=True)
            try:
                venv.EnvBuilder(with_pip=False, symlinks=True).create(building)
                purelib = next(building.glob("lib/python*/site-packages"))
                # addsitedir (not a bare path) so that the agent's own .pth files, editable installs
                # included, are processed too.
                dirs = [path for path in site.getsitepackages() if Path(path).is_dir()]
                (purelib / VENV_MARK).write_text("".join(f"import site; site.addsitedir({path!r})\n" for path in dirs))
                os.rename(building, folder)  # complete, or not there at all
            except OSError as exc:
                raise LaunchError(f"cannot make the virtualenv {folder}: {exc.strerror or exc}") from None
            finally:
                shutil.rmtree(building, ignore_errors=True)
        return str(python)

    def _prepare_mounts(self, request: LaunchRequest) -> None:
        Path(service_root(self._config, request.service)).mkdir(parents=True, exist_ok=True, mode=0o700)
        for mount in request.mounts:
            target = Path(mount.target)
            if mount.kind == "bind" and mount.source and not target.exists() and mount.source != mount.target:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(mount.source)
            elif mount.kind in ("volume", "tmpfs"):
                target.mkdir(parents=True, exist_ok=True)
        for target, content in request.secret_files.items():
            path = self._config.state_dir / "secrets" / request.name / Path(target).name
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)

    def _environment(self, request: LaunchRequest, bin_dir: Path) -> dict[str, str]:
        # PYTHONPATH: the instance runs the same berth as the agent (a checkout on PYTHONPATH included).
        env = {key: os.environ[key] for key in ("HOME", "LANG", "TZ", "SSL_CERT_FILE", "PYTHONPATH") if key in os.environ}
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
        env.update(request.env)
        env["BERTH_ADMIN_PORT"] = str(request.admin_port)
        if request.proxy:
            env["BERTH_PROXY_PORT"] = str(request.proxy_port)
        if request.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(request.gpus)
        env["BERTH_LISTEN_HOST"] = request.host_ip
        # Files the request places at container paths (token, a large spec) live under the state directory here.
        for target in request.secret_files:
            local = str(self._config.state_dir / "secrets" / request.name / Path(target).name)
            env.update({name: local for name, value in env.items() if value == target})
        return env

    def remove_service(self, service: str) -> None:
        """What deploy made for the service beyond its instances: its virtualenv."""
        shutil.rmtree(self._venvs / service, ignore_errors=True)

    def _record_path(self, instance_id: str) -> Path:
        return self._records / f"{instance_id}.json"

    def _read(self, instance_id: str) -> dict | None:
        try:
            return json.loads(self._record_path(instance_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _alive(self, record: dict) -> bool:
        with self._lock:
            child = self._children.get(record["id"])
        if child is not None and child.poll() is not None:
            return False  # reaped just now
        try:
            process = psutil.Process(record["pid"])
            # A recycled pid has another start time.
            return abs(process.create_time() - record["create_time"]) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _handle(self, record: dict) -> Handle:
        running = self._alive(record)
        return Handle(
            id=record["id"], labels=record["labels"], running=running, created_at=record["create_time"],
            host_ip=record["host_ip"], proxy_port=record["proxy_port"], admin_port=record["admin_port"],
            app_port=record.get("app_port"), exit=None if running else self._exit_info(record),
        )

    def _exit_info(self, record: dict) -> ExitInfo:
        code, message = None, ""
        try:
            status = json.loads(Path(record["status"]).read_text())
            code = status.get("exit_code")
            message = (status.get("failure_reason") or "") if code else ""  # berth boot's own account
        except (OSError, json.JSONDecodeError):
            pass
        with self._lock:
            child = self._children.get(record["id"])
        if code is None and child is not None and child.returncode is not None:
            code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        reason = "Completed" if code == 0 else ("Error" if code is not None else "Unknown")
        at = Path(record["status"]).stat().st_mtime if Path(record["status"]).exists() else time.time()
        return ExitInfo(code=code, reason=reason, at=at, message=message, log_tail=self._tail(record))

    def _tail(self, record: dict) -> list[str]:
        lines = self._config.timings.exit_log_lines
        try:
            with open(record["log"], "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                return handle.read().decode(errors="replace").splitlines()[-lines:] if lines else []
        except OSError:
            return []

    def list(self) -> list[Handle]:
        return [self._handle(record) for path in sorted(self._records.glob("*.json"))
                if not path.name.endswith(".status.json") and (record := self._read(path.stem))]

    def inspect(self, instance_id: str) -> Handle | None:
        record = self._read(instance_id)
        return None if record is None else self._handle(record)

    def stop(self, instance_id: str, grace_s: float) -> None:
        record = self._read(instance_id)
        if record is None or not self._alive(record):
            return
        self._signal(record, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._alive(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._alive(record):
            self._signal(record, signal.SIGKILL)
            while self._alive(record):
                time.sleep(0.05)

    @staticmethod
    def _signal(record: dict, signum: int) -> None:
        try:
            os.killpg(record["pid"], signum)  # the whole session: berth boot and its child
        except ProcessLookupError:
            pass

    def remove(self, instance_id: str) -> None:
        record = self._read(instance_id)
        if record is not None:
            self.stop(instance_id, 0)
            # The directory is the service's: a stray's removal must not pull it from under a live instance.
            if not any(other.id != instance_id and other.running and other.service == record["labels"].get(LABEL_SERVICE)
                       for other in self.list()):
                self._undo_storage(record)
            shutil.rmtree(self._config.state_dir / "secrets" / instance_id, ignore_errors=True)
            for path in (self._record_path(instance_id), Path(record["status"]),
                         *log_files.rotated(Path(record["log"]), self._config.log_max_files)):
                path.unlink(missing_ok=True)
        with self._lock:
            self._children.pop(instance_id, None)

    @staticmethod
    def _undo_storage(record: dict) -> None:
        """Undo what the instance and its `berth boot` placed: mounts (a tmpfs, a bind, FUSE), links, directories.

        Never a recursive delete through a mount: the tree is removed only once nothing is mounted in it.
        """
        root = record.get("root")
        paths = [path for path in record.get("storage_paths", []) if not (root and _within(path, root))]
        for mount_point in sorted(_mounts_under([root, *paths] if root else paths), key=len, reverse=True):
            result = subprocess.run(["umount", "-l", mount_point], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("storage %s: cannot unmount: %s", mount_point, result.stderr.strip())
        for path in map(Path, paths):  # under an operator's root: only what the instance made
            if path.is_symlink():
                path.unlink()
            elif path.is_dir() and not os.path.ismount(path) and not any(path.iterdir()):
                path.rmdir()
        if root and Path(root).exists():
            if _mounts_under([root]):
                log.warning("storage %s: still mounted; left in place", root)
            else:
                shutil.rmtree(root, ignore_errors=True)

    def logs(self, instance_id: str, *, tail: int | None, follow: bool) -> Iterator[bytes]:
        record = self._read(instance_id)
        if record is None:
            return
        *older, current = log_files.rotated(Path(record["log"]), self._config.log_max_files) or [Path(record["log"])]
        with open(current, "rb") as handle:
            lines = b"".join(path.read_bytes() for path in older) + handle.read()
            lines = lines.splitlines(keepends=True)
            yield b"".join(lines if tail is None else lines[-tail:] if tail else [])
            while follow and self._alive(record):
                chunk = handle.read()
                yield chunk  # empty while idle: a heartbeat, so that a follower who left is noticed
                if not chunk:
                    time.sleep(0.2)
            if follow:
                yield handle.read()

    def watch_exits(self, on_exit: Callable[[str], None], stopped: Callable[[], bool]) -> None:
        """Processes adopted after an agent restart are not its children: poll them all."""
        reported: set[tuple[str, float]] = set()  # ids are reused by restarts; start times are not
        while not stopped():
            for handle in self.list():
                if not handle.running and (handle.id, handle.created_at) not in reported:
                    reported.add((handle.id, handle.created_at))
                    on_exit(handle.id)
            self._rotate_logs()
            time.sleep(self._config.timings.process_poll_s)

    def _rotate_logs(self) -> None:
        for path in self._logs.glob("*.log"):
            try:
                log_files.rotate_if_needed(path, self._config.log_max_size_bytes, self._config.log_max_files)
            except OSError as exc:  # a full disk: the next pass tries again
                log.warning("cannot rotate %s: %s", path, exc.strerror or exc)

    def node_info(self) -> dict:
        return {"engine": f"local processes (Python {sys.version.split()[0]})", "images": []}

    def disk_usage(self, instance_id: str, empty_dir_paths: list[str]) -> None:
        return None  # see LIMITATIONS

    def instance_of_pid(self, pid: int) -> str | None:
        """Each instance runs in its own session, led by the recorded process: a PID belongs to
        the record whose pid is its session id."""
        try:
            session = os.getsid(pid)
        except OSError:
            return None
        for path in self._records.glob("*.json"):
            record = None if path.name.endswith(".status.json") else self._read(path.stem)
            if record is not None and record["pid"] == session and self._alive(record):
                return record["id"]
        return None

    def check_gpus(self, instance_id: str, uuids: list[str]) -> None:
        return None  # see LIMITATIONS

    def collect_images(self, keep) -> None:  # noqa: ANN001 - no images here
        return None

    def close(self) -> None:
        return None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _mounts_under(roots: list[str]) -> list[str]:
    """Mount points at or under any of `roots`, from this process's mount table."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    return [point for point in points if any(_within(point, root) for root in roots)]
