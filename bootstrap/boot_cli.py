"""`berth boot [options] -- CMD ARGS...`: the container entrypoint.

Every setting comes, in this order, from its flag, its BERTH_* environment variable
(booleans as 1/0), the service spec (`--spec FILE` or BERTH_SPEC, JSON text or a path), or
the default. The service token comes only from BERTH_SERVICE_TOKEN or BERTH_SERVICE_TOKEN_FILE.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bootstrap.errors import UsageError

log = logging.getLogger("berth.boot")

MiB = 1024 * 1024
DEFAULT_STARTUP_TIMEOUT_S = 600.0  # KServe's vLLM template allows 60 x 10 s
SECRET_ENV = ("BERTH_SERVICE_TOKEN", "BERTH_SERVICE_TOKEN_FILE")


@dataclass(frozen=True)
class Setting:
    flag: str
    env: str
    type: Callable[[str], Any]
    default: Any
    help: str
    from_spec: Callable[[Any], Any] | None = None  # ServiceSpec -> value or None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no", ""):
        return False
    raise ValueError(f"{value!r} is not 1 or 0")


def _seconds(value: str) -> float:
    """A duration of 0 or more seconds (nan, inf and negatives refused)."""
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("give 0 or more seconds")
    return seconds


def _positive_seconds(value: str) -> float:
    """A timeout: more than 0 seconds."""
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("give more than 0 seconds")
    return seconds


def _size(value: str) -> int:
    from bootstrap.units import parse_quantity

    return parse_quantity(value)


def _startup_timeout(spec) -> float | None:
    probe = spec.container.startup_check
    if probe is None:
        return None
    return probe.initial_delay_seconds + probe.period_seconds * probe.failure_threshold


SETTINGS = (
    Setting("--port", "BERTH_PORT", int, 8000, "the child's own port on 127.0.0.1 (spec: containers[0].port)",
            lambda s: s.container.port, "PORT"),
    Setting("--proxy-port", "BERTH_PROXY_PORT", int, 8080, "the traffic proxy's port", metavar="PORT"),
    Setting("--admin-port", "BERTH_ADMIN_PORT", int, 9090, "the admin port: /ready /live /status /metrics", metavar="PORT"),
    Setting("--app-metrics-path", "BERTH_APP_METRICS_PATH", str, "/metrics", "the app's own Prometheus page, re-exported on "
            "the admin /metrics (for custom[GAUGE] autoscaling); off when it answers 404, or with ''", metavar="PATH"),
    Setting("--listen-host", "BERTH_LISTEN_HOST", str, "0.0.0.0", "the address the proxy and admin ports bind: 0.0.0.0 in a "
            "container (the engine's port mapping decides who reaches it); the agent passes its host IP under the process "
            "runtime and host networking", metavar="ADDR"),
    Setting("--warmup", "BERTH_WARMUP", str, None, "warmup requests, JSON lines (spec: warm_up_data_path)",
            lambda s: s.warm_up_data_path, "FILE"),
    Setting("--warmup-policy", "BERTH_WARMUP_POLICY", str, "fail", "fail: a failed warmup fails the boot (exit 1); ignore: log it and go READY",
            metavar="fail|ignore"),
    Setting("--drain-delay", "BERTH_DRAIN_DELAY", _seconds, 5.0, "seconds after SIGTERM during which new requests are still served, "
            "so load balancers notice /ready turning 503", metavar="S"),
    Setting("--grace", "BERTH_GRACE", _seconds, 30.0, "seconds from SIGTERM to the child's SIGKILL (spec: eas.termination_grace_period)",
            lambda s: s.metadata.grace_s, "S"),
    Setting("--stop-timeout", "BERTH_STOP_TIMEOUT", _seconds, 10.0, "seconds the child gets between SIGTERM and SIGKILL; at most half of --grace, so a drain keeps the rest",
            metavar="S"),
    Setting("--startup-timeout", "BERTH_STARTUP_TIMEOUT", _positive_seconds, DEFAULT_STARTUP_TIMEOUT_S,
            "seconds the child gets to pass its startup check (spec: startup_check period x failure_threshold)", _startup_timeout, "S"),
    Setting("--probe-interval", "BERTH_PROBE_INTERVAL", _positive_seconds, 0.05, "seconds between startup checks (one in flight at a time)", metavar="S"),
    Setting("--no-proxy", "BERTH_NO_PROXY", _flag, False, "no traffic proxy: clients reach the child's port directly "
            "(/ready, warmup and drain still work) (spec: containers[0].proxy false)", lambda s: not s.container.proxy),
    Setting("--max-body", "BERTH_MAX_BODY", _size, 1 * MiB, "largest request body, bytes or a quantity like 10Mi (413 beyond)", metavar="SIZE"),
    Setting("--request-timeout", "BERTH_REQUEST_TIMEOUT", _positive_seconds, 600.0, "seconds a request may take (504) (spec: rpc.keepalive)",
            lambda s: s.metadata.request_timeout_s, "S"),
    Setting("--header-timeout", "BERTH_HEADER_TIMEOUT", _positive_seconds, 30.0, "seconds a client gets to send a whole request head, "
            "counted from its first byte (from the connection's start for the first): slow clients are cut", metavar="S"),
    Setting("--body-timeout", "BERTH_BODY_TIMEOUT", _positive_seconds, 60.0, "seconds a client may pause while sending a request body "
            "(as nginx's client_body_timeout)", metavar="S"),
    Setting("--keepalive-timeout", "BERTH_KEEPALIVE_TIMEOUT", _positive_seconds, 75.0, "seconds an idle client connection is kept "
            "open (nginx's default; longer than clients' pools keep theirs, so none reuses one being closed)", metavar="S"),
    Setting("--max-header-size", "BERTH_MAX_HEADER_SIZE", _size, 64 * 1024, "largest request header section (431 beyond); URLs over "
            "8 KiB get 414", metavar="SIZE"),
    Setting("--concurrency", "BERTH_CONCURRENCY", int, 0, "requests passed to the child at once; 0 for no limit", metavar="N"),
    Setting("--queue", "BERTH_QUEUE", int, None, "requests waiting beyond --concurrency before 503 (default 10 x concurrency) "
            "(spec: rpc.max_queue_size)", lambda s: s.metadata.rpc.max_queue_size, "N"),
    Setting("--wait-ready", "BERTH_WAIT_READY", _seconds, 0.0, "before READY, hold requests up to S seconds instead of answering 503",
            metavar="S"),
    Setting("--upstream-idle", "BERTH_UPSTREAM_IDLE", _positive_seconds, 4.0, "seconds a pooled connection to the child may idle; keep it below "
            "the child's keep-alive (uvicorn: 5 s)", metavar="S"),
    Setting("--cache-dir", "BERTH_CACHE_DIR", Path, Path("/var/cache/berth"), "the node-shared cache (weights, pip wheels)", metavar="DIR"),
    Setting("--status-file", "BERTH_STATUS_FILE", Path, None, "write the state as JSON here on every change and at exit", metavar="FILE"),
)


BOOT_DESCRIPTION = """\
The container entrypoint:  ENTRYPOINT ["berth", "boot"]  then  CMD ["python", "app.py"]

Phases, each timed (/status, the log): prepare storage and libraries -> launch the command
-> wait until it answers on --port -> replay warmup requests -> READY (/ready is 200 on the
admin port; the proxy on --proxy-port forwards to the child).

On SIGTERM or SIGINT: /ready turns 503 at once; new requests are still served for
--drain-delay; then they get 503 while in-flight ones finish, within --grace; then the
child's process group gets SIGTERM, and SIGKILL after --stop-timeout. A SIGTERM during
prepare, launch or warmup stops at once.

Each setting: its flag, else its BERTH_* environment variable (booleans 1/0), else the spec
(--spec FILE or BERTH_SPEC, JSON text or a path), else the default. The service token comes
from BERTH_SERVICE_TOKEN or BERTH_SERVICE_TOKEN_FILE only. BERTH_LOG_JSON=1 logs JSON lines.

Exit codes: 0 clean stop (also when the child ended on berth's SIGTERM); 1 the child never
became ready or its warmup failed; 2 bad usage; 3 berth's own prepare failed (spec, storage,
pip); otherwise the child's own code (128+N when signal N, not sent by berth, ended it).
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "boot",
        help="run a service in a container: prepare, launch, warm up, proxy, drain",
        description=BOOT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--spec", metavar="FILE", help="the service spec (env BERTH_SPEC: JSON text or a path)")
    for setting in SETTINGS:
        help_text = f"{setting.help} [env {setting.env}; default {setting.default}]"
        if setting.type is _flag:
            parser.add_argument(setting.flag, action="store_const", const=True, default=None, help=help_text)
        else:
            parser.add_argument(setting.flag, default=None, metavar=setting.metavar, help=help_text)
    parser.add_argument("--vllm", metavar="MODEL_DIR", help="serve MODEL_DIR with vLLM's OpenAI-compatible server; extra "
                        "engine arguments follow '--' (a spec command `vllm serve ...` is handled the same way)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the service's command")
    parser.set_defaults(handler=run_boot)


def resolve(args: argparse.Namespace, env: dict[str, str], spec) -> dict[str, Any]:
    """Each setting from its flag, else its BERTH_* variable, else the spec, else the default."""
    values = {}
    for setting in SETTINGS:
        raw, origin = getattr(args, setting.dest), setting.flag
        if raw is None and env.get(setting.env, "") != "":
            raw, origin = env[setting.env], setting.env
        if raw is None:
            from_spec = setting.from_spec(spec) if (spec is not None and setting.from_spec) else None
            values[setting.dest] = setting.default if from_spec is None else from_spec
            continue
        try:
            values[setting.dest] = raw if raw is True else setting.type(raw)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{origin}: {raw!r} is not valid ({exc})") from None
    if values["warmup_policy"] not in ("fail", "ignore"):
        raise UsageError(f"--warmup-policy: {values['warmup_policy']!r}; use fail or ignore")
    return values


def load_spec(args: argparse.Namespace, env: dict[str, str]):
    """The spec from --spec FILE or BERTH_SPEC (JSON text or a path), parsed leniently."""
    from bootstrap.spec import load_spec_file, parse_spec

    if args.spec:
        parsed = load_spec_file(args.spec, lenient=True)
    elif env.get("BERTH_SPEC", "").strip():
        text = env["BERTH_SPEC"].strip()
        parsed = parse_spec(text, lenient=True, source="BERTH_SPEC") if text.startswith("{") else load_spec_file(text, lenient=True)
    else:
        return None
    for warning in parsed.warnings:
        log.warning("spec: %s", warning)
    if parsed.spec.token is not None:
        log.warning("spec: token is ignored by berth boot; pass it as BERTH_SERVICE_TOKEN or BERTH_SERVICE_TOKEN_FILE")
    return parsed.spec


def service_token(env: dict[str, str]) -> str | None:
    if env.get("BERTH_SERVICE_TOKEN"):
        return env["BERTH_SERVICE_TOKEN"]
    path = env.get("BERTH_SERVICE_TOKEN_FILE")
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"BERTH_SERVICE_TOKEN_FILE: cannot read {path}: {exc.strerror}") from None
    if not token:
        raise UsageError(f"BERTH_SERVICE_TOKEN_FILE: {path} is empty")
    return token


def warmup_file(value: str | None, spec) -> Path | None:
    """A local path, or an oss:// / s3:// object under one of the spec's storage mounts."""
    if not value:
        return None
    if "://" not in value:
        return Path(value)
    for entry in spec.storage if spec is not None else ():
        store = entry.object_store
        if store is not None and value.startswith(store.path.rstrip("/") + "/"):
            return Path(entry.mount_path) / value[len(store.path.rstrip("/")) + 1:]
    raise UsageError(f"warm_up_data_path: {value} is under none of the spec's storage paths; add a storage entry "
                     "that mounts its bucket prefix, or give a local path")


def run_boot(args: argparse.Namespace) -> int:
    from bootstrap.log import configure
    from bootstrap.spec import SpecError

    configure()
    env = dict(os.environ)
    try:
        spec = load_spec(args, env)
    except SpecError as exc:
        # The agent reads this from the status file: berth's own preparation failed.
        return _spec_failed(exc, resolve(args, env, None)["status_file"])
    values = resolve(args, env, spec)
    return _boot(args, env, spec, values)


def _spec_failed(exc: Exception, status_file: Path | None) -> int:
    from serving.state import BootState, State

    log.error("%s", exc)
    state = BootState(status_file)
    state.set(State.FAILED, error=str(exc))
    state.finish(3)
    return 3


def _boot(args: argparse.Namespace, env: dict[str, str], spec, values: dict[str, Any]) -> int:
    from bootstrap.boot import Boot, BootConfig, child_stop_timeout
    from serving.engine import UserCommand
    from serving.proxy import ProxyConfig

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and spec is not None and not args.vllm:
        command = spec.container.argv or []
    if not command and not args.vllm:
        raise UsageError("no command to run: give it after '--' (berth boot -- python app.py) or in the spec's containers[0].command")
    child_env = {k: v for k, v in env.items() if k not in SECRET_ENV}
    if spec is not None:  # what the environment sets (the operator's, through the agent) wins over the spec
        child_env = {**spec.container.env_dict(), **child_env}
    # The port to listen on (Cloud Run's and Knative's convention): each instance may have its own.
    child_env["PORT"] = str(values["port"])
    proxy = None
    if not values["no_proxy"]:
        proxy = ProxyConfig(
            upstream_port=values["port"], max_body=values["max_body"], request_timeout=values["request_timeout"],
            header_timeout=values["header_timeout"], body_timeout=values["body_timeout"], keepalive_timeout=values["keepalive_timeout"],
            max_header_size=values["max_header_size"], concurrency=values["concurrency"], queue=values["queue"],
            token=service_token(env), wait_ready=values["wait_ready"], upstream_idle=values["upstream_idle"],
        )
    from serving.vllm import engine_for

    engine = engine_for(args.vllm, command, service_name=spec.metadata.name if spec else None, env=child_env,
                        cache_dir=values["cache_dir"], stop_timeout_s=child_stop_timeout(values["stop_timeout"], values["grace"]))
    config = BootConfig(
        engine=engine or UserCommand(command), spec=spec, app_port=values["port"], proxy=proxy, proxy_port=values["proxy_port"],
        admin_port=values["admin_port"], host=values["listen_host"], app_metrics_path=None if engine else values["app_metrics_path"] or None,
        warmup_file=warmup_file(values["warmup"], spec), warmup_policy=values["warmup_policy"],
        drain_delay=values["drain_delay"], grace=values["grace"], stop_timeout=values["stop_timeout"],
        startup_timeout=values["startup_timeout"], probe_interval=values["probe_interval"], cache_dir=values["cache_dir"],
        status_file=values["status_file"], env=child_env,
    )
    return _run(Boot(config).run())


def _run(main) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop is a core dependency; only odd platforms lack it
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)
