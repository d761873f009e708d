"""`berth agent` (the node daemon) and its client commands: deploy, update, scale, ls, get, logs, rm, node.

Imports here stay light: the daemon's FastAPI/uvicorn/docker are loaded only by `berth agent`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from bootstrap.errors import EXIT_FAILED, CommandFailed, UsageError

FAILING_STATES = ("BackOff", "Failed", "Evicted")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_agent(subparsers)
    from agent.k8s.cli import add_commands as add_render  # `berth render k8s`

    add_render(subparsers)
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--agent", metavar="URL", help="the agent: http://HOST:PORT or unix:/path (default "
                        "$BERTH_AGENT_URL, else http://127.0.0.1:7070)")
    client.add_argument("--state-dir", metavar="DIR", help="the agent's state directory, whose token file is read when "
                        "BERTH_TOKEN is not set (default $BERTH_STATE_DIR, else /var/lib/berth)")
    client.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")

    deploy = subparsers.add_parser("deploy", parents=[client], help="run a service (EAS-style JSON) on the agent",
                                   description="Send a service config to the agent, which pulls its image and starts "
                                               "its instances. Exit 2 lists every problem with its JSON path.")
    deploy.add_argument("file", metavar="FILE", help="the JSON service config ('-' reads stdin)")
    deploy.add_argument("--wait", action="store_true", help="wait until every instance is Ready, showing progress; "
                        "fail with the reason when one cannot start")
    deploy.add_argument("--timeout", type=float, default=900, metavar="S", help="give up waiting after S seconds (900)")
    deploy.set_defaults(handler=run_deploy)

    update = subparsers.add_parser(
        "update", parents=[client], help="roll a service to a new config, or back (--rollback)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Roll a running service to a new config, instance by instance, under its\n"
            "metadata.rolling_strategy: up to max_surge new instances start beside the old ones, and an\n"
            "old instance is drained (SIGTERM: it leaves the endpoints and finishes what it serves) only\n"
            "once its replacement is Ready; max_unavailable old ones may go first. A new instance that\n"
            "fails pauses the rollout (the old ones keep serving) and says why; --rollback returns to the\n"
            "revision deployed before the current one. Clients should send requests to the service's\n"
            "current `endpoints` (`berth get NAME --json`), which both revisions serve during a rollout."
        ),
    )
    update.add_argument("name", metavar="NAME")
    update.add_argument("file", metavar="FILE", nargs="?", help="the new JSON service config ('-' reads stdin)")
    update.add_argument("--rollback", action="store_true", help="return to the previous revision (no FILE)")
    update.add_argument("--wait", action="store_true", help="wait until the rollout completes, showing progress; "
                        "exit 1 with the reason when it pauses")
    update.add_argument("--timeout", type=float, default=900, metavar="S", help="give up waiting after S seconds (900)")
    update.set_defaults(handler=run_update)

    scale = subparsers.add_parser(
        "scale", parents=[client], help="set a service's instance count",
        description="Set how many instances of a service run. Refused for a service with an autoscaler (it owns the "
                    "count: change autoscaler.min/max with `berth update`); a cronscaler job that fires later sets the "
                    "count again. Scaling in drains like a rollout: out of the endpoints first, then SIGTERM.")
    scale.add_argument("name", metavar="NAME")
    scale.add_argument("count", metavar="N", type=int, help="the instance count (0 stops every instance)")
    scale.add_argument("--wait", action="store_true", help="wait until N instances are Ready (or gone), showing progress")
    scale.add_argument("--timeout", type=float, default=900, metavar="S", help="give up waiting after S seconds (900)")
    scale.set_defaults(handler=run_scale)

    ls = subparsers.add_parser("ls", parents=[client], help="list the agent's services")
    ls.set_defaults(handler=run_ls)

    get = subparsers.add_parser("get", parents=[client], help="show one service and its instances",
                                description="A service's revision and each instance's state, restarts, GPUs, "
                                            "proxy endpoint and last exit; then each instance's cold start "
                                            "(image pull, prepare: download and pip, engine start, warmup, "
                                            "launch-to-ready), as JSON under cold_start with --json.")
    get.add_argument("name", metavar="NAME")
    get.set_defaults(handler=run_get)

    logs = subparsers.add_parser("logs", parents=[client], help="print an instance's logs")
    logs.add_argument("name", metavar="NAME")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--instance", metavar="ID", help="which instance (default the first)")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.add_argument("-p", "--previous", action="store_true", help="the last run of a restarted instance")
    logs.set_defaults(handler=run_logs)

    rm = subparsers.add_parser("rm", parents=[client], help="stop (SIGTERM, grace period, SIGKILL) and remove a service")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--no-wait", action="store_true", help="return once the agent has started stopping it")
    rm.set_defaults(handler=run_rm)

    node = subparsers.add_parser("node", parents=[client], help="show the node: runtime, gateway, GPUs (holders, shares, NVML-measured use), CPU, memory, disks, images")
    node.set_defaults(handler=run_node)

    group = subparsers.add_parser(
        "group", help="service groups: one endpoint split by weight, mirror and header over member services",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "A service group is one gateway endpoint, /api/predict/GROUP, over member services:\n"
            '  {"name": "qwen-chat", "token": "...", "routes": [\n'
            '     {"service": "qwen-v23", "weight": 90},\n'
            '     {"service": "qwen-v24", "weight": 10, "mirror_weight": 5},\n'
            '     {"service": "qwen-v24", "match": {"headers": {"User-Agent": "~^CherryStudio"}}}]}\n'
            "weight: relative share (0..1000) per request; mirror_weight: percent of the group's requests\n"
            "also copied to that service (answer discarded); match.headers: exact value or ~regex, tried first,\n"
            "in order. A service with metadata.group joins with weight 100 unless the file lists it.\n"
            "A change reaches new requests within 1 s; streams in flight are not cut."
        ),
    )
    actions = group.add_subparsers(dest="group_action", metavar="ACTION")
    actions.required = True
    apply = actions.add_parser("apply", parents=[client], help="create or change a group from its JSON file")
    apply.add_argument("file", metavar="FILE", help="the group file ('-' reads stdin)")
    apply.set_defaults(handler=run_group_apply)
    group_get = actions.add_parser("get", parents=[client], help="a group's routes, configured and observed split")
    group_get.add_argument("name", metavar="NAME")
    group_get.set_defaults(handler=run_group_get)
    actions.add_parser("ls", parents=[client], help="list the groups").set_defaults(handler=run_group_ls)
    group_rm = actions.add_parser("rm", parents=[client], help="remove a group's file (members keep running)")
    group_rm.add_argument("name", metavar="NAME")
    group_rm.set_defaults(handler=run_group_rm)


def _add_agent(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser(
        "agent", help="run the node daemon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run berth's node daemon: an HTTP API (token in <state-dir>/token) that runs EAS-style services as\n"
            "containers (or local processes), with probes, restarts with backoff, graceful stop and\n"
            "re-adoption of running instances after its own restart.\n\n"
            "Settings come from --config FILE (JSON; every timing lives there under \"timings\"), then\n"
            "BERTH_* variables (BERTH_LISTEN, BERTH_STATE_DIR, BERTH_CACHE_DIR, BERTH_RUNTIME, BERTH_NETWORK,\n"
            "BERTH_HOST_IP, BERTH_IMAGE_PULL_POLICY, BERTH_GPU_INVENTORY_FILE, BERTH_INSECURE_LISTEN, BERTH_TLS_CERT,\n"
            "BERTH_TLS_KEY, BERTH_MAX_SPEC_BYTES; BERTH_ALLOW_HOST_PATHS, BERTH_READ_ONLY_MOUNTS and\n"
            "BERTH_PROCESS_MOUNT_ROOTS comma-separated), then these flags. docs/security.md lists what the\n"
            "token, a spec and the operator can reach.\n\n"
            "GPU shares (spec metadata.gpu_memory, in GiB of one GPU, as EAS's GB) are packed best fit onto GPUs no\n"
            "instance holds whole; NVML's per-process memory is checked every timings.gpu_watch_period_s (soft:\n"
            "over the share by 5% twice in a row evicts), and an MPS daemon whose pipe is in mps_pipe_directory\n"
            "caps memory and gpu_core_percentage in the driver."
        ),
    )
    agent.add_argument("--config", type=Path, metavar="FILE", default=os.environ.get("BERTH_CONFIG"),
                       help="operator configuration, JSON (default $BERTH_CONFIG)")
    agent.add_argument("--listen", metavar="HOST:PORT", help="API address, or unix:/path (a socket only the agent's user "
                       "may use, removed at exit) (default 127.0.0.1:7070); off loopback it needs --tls-cert/--tls-key "
                       "or --insecure-listen")
    agent.add_argument("--tls-cert", metavar="FILE", help="serve the API over HTTPS with this PEM certificate (and --tls-key)")
    agent.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    agent.add_argument("--insecure-listen", action="store_true", default=None,
                       help="allow --listen off loopback without TLS: the token crosses the network in clear")
    agent.add_argument("--max-spec-bytes", type=int, metavar="N", help="largest request body the API reads, in bytes "
                       "(413 beyond; default 1048576)")
    agent.add_argument("--state-dir", metavar="DIR", help="SQLite state, token, logs (default /var/lib/berth)")
    agent.add_argument("--cache-dir", metavar="DIR", help="node cache mounted into every instance (default /var/cache/berth)")
    agent.add_argument("--runtime", choices=["auto", "docker", "process"],
                       help="docker, process, or auto: docker when an engine answers (default auto)")
    agent.add_argument("--network", choices=["bridge", "host"], help="instances' network (default bridge)")
    agent.add_argument("--host-ip", metavar="ADDR", help="address instances' ports are published on (default 127.0.0.1)")
    agent.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for every instance; "
                       "wins over a spec's variable of the same name (env_for in --config scopes one to a service)")
    agent.add_argument("--allow-host-path", action="append", default=[], metavar="DIR",
                       help="allow `local` storage under DIR (or `nfs` under SERVER:/EXPORT); none by default")
    agent.add_argument("--recover-from-runtime", action="store_true",
                       help="the state database is lost or corrupt: move a damaged one aside and rebuild each "
                            "service from its running instances' labels (secrets excepted), adopting them as they run")
    agent.add_argument("--gateway", metavar="HOST:PORT|off|external",
                       help="the node gateway (/api/predict/NAME) the agent starts as a process of its own, found again "
                            "by <state-dir>/gateway.pid after an agent restart (default 127.0.0.1:7080; port 0 picks a "
                            "free one); off: none; external: one runs under its own unit, the agent only publishes routes")
    agent.add_argument("--gateway-admin", metavar="HOST:PORT", help="the gateway's metrics and routes (default 127.0.0.1:7081)")
    agent.set_defaults(handler=run_agent)


# --- the daemon -------------------------------------------------------------------------------


def run_agent(args: argparse.Namespace) -> int:
    from agent.config import load_config
    from bootstrap.log import configure

    configure()
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: give NAME=VALUE")
        env[name] = value
    config = load_config(args.config, {
        "listen": args.listen, "state_dir": args.state_dir, "cache_dir": args.cache_dir, "runtime": args.runtime,
        "network": args.network, "host_ip": args.host_ip, "env": env, "allow_host_paths": args.allow_host_path,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "insecure_listen": args.insecure_listen,
        "max_spec_bytes": args.max_spec_bytes,
        "gateway": args.gateway, "gateway_admin": args.gateway_admin,
    })
    return serve(config, recover=args.recover_from_runtime)


def serve(config, recover: bool = False) -> int:
    import logging

    import uvicorn

    from agent.api import create_app
    from agent.config import is_loopback
    from agent.state import Store
    from agent.supervisor import Supervisor

    log = logging.getLogger("berth.agent")
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if config.state_dir.stat().st_mode & 0o077:
        # Logs, process records and secrets live here: no other local user may read them.
        log.warning("state directory %s was mode %o, readable by other users; set to 700",
                    config.state_dir, config.state_dir.stat().st_mode & 0o777)
        config.state_dir.chmod(0o700)
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    token = _ensure_token(config.token_path)
    runtime, why = _pick_runtime(config)
    print(f"berth agent: runtime {runtime.name} ({why})", file=sys.stderr, flush=True)
    for limitation in runtime.limitations:
        log.warning("runtime %s cannot enforce: %s", runtime.name, limitation)
    supervisor = Supervisor(config, runtime, _open_store(config, runtime, recover))
    _gateway(config, supervisor.routes)
    app = create_app(supervisor, token)
    tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)} if config.tls_cert else {}
    host, _, port = config.listen.rpartition(":")
    # Open streams (`berth logs -f`, events) end 1 s after SIGTERM: systemd's stop timeout is 30 s.
    server_config = uvicorn.Config(app, host=host.strip("[]") or "127.0.0.1", port=int(port) if port.isdigit() else 0,
                                   log_config=None, access_log=False, **tls,
                                   timeout_graceful_shutdown=1)  # open streams (the gateway's routes) end 1 s after SIGTERM
    if not is_loopback(host.strip("[]")) and not config.listen.startswith("unix:") and not tls:
        log.warning("listening on %s without TLS (--insecure-listen): the token crosses the network in clear", config.listen)
    log.info("listening on %s%s; state in %s; token in %s", config.listen, " (TLS)" if tls else "", config.state_dir,
             config.token_path)
    server = uvicorn.Server(server_config)
    # uvicorn shuts down on SIGTERM, then raises it again: exit through Python, so cleanup (the socket) runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if config.listen.startswith("unix:"):
            with _unix_socket(Path(config.listen[5:])) as sock:
                server.run(sockets=[sock])
        else:
            server.run()
    finally:
        runtime.close()
    return 0 if server.started else EXIT_FAILED


def _open_store(config, runtime, recover: bool):
    """The state database, checked before anything runs; StateError stops the agent, touching nothing."""
    import logging

    from agent.state import StateError, Store, check_database, recover_from_runtime

    path = config.database_path
    try:
        if not recover:
            check_database(path, runtime.list())
            return Store(path)
        try:
            store = Store(path)
        except StateError:
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{path}{suffix}").exists():
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            logging.getLogger("berth.agent").warning("moved the damaged state database aside to %s", aside)
            store = Store(path)
        recovered = recover_from_runtime(store, runtime.list())
        logging.getLogger("berth.agent").warning("recovered %d service(s) from the runtime: %s", len(recovered),
                                                 ", ".join(recovered) or "none")
        return store
    except StateError as exc:
        runtime.close()
        raise CommandFailed(str(exc)) from None


def _gateway(config, routes) -> None:
    """Find the gateway of this state directory, or start it (`--gateway HOST:PORT`); note its addresses."""
    import logging

    from agent import gateway_process

    log = logging.getLogger("berth.agent")
    if config.gateway == "off":
        return
    running = gateway_process.find(config.state_dir)
    if running is None and config.gateway_managed:
        if config.listen.startswith("unix:"):
            agent_url = config.listen
        else:
            host, _, port = config.listen.rpartition(":")
            agent_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '[::]', '::') else host}:{port}"
        running = gateway_process.start(config.state_dir, listen=config.gateway, admin=config.gateway_admin, agent_url=agent_url)
        log.info("gateway started: %s (admin %s, pid %d)", running.url, running.admin_url, running.pid)
    elif running is not None:
        log.info("gateway found: %s (admin %s, pid %d)", running.url, running.admin_url, running.pid)
    if running is not None:
        routes.gateway_url, routes.gateway_admin_url = running.url, running.admin_url


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


@contextmanager
def _unix_socket(path: Path) -> Iterator[socket.socket]:
    """The API's socket, 0600 from its creation (uvicorn's own is 0666), removed at exit."""
    if path.is_socket():
        path.unlink()  # left by an agent that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        raise UsageError(f"--listen unix:{path}: cannot create the socket: {exc.strerror}") from None
    finally:
        os.umask(umask)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def _ensure_token(path: Path) -> str:
    """The API token, generated at first start, readable by the agent's user alone."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def _pick_runtime(config):
    if config.runtime in ("auto", "docker"):
        from agent.docker_runtime import DockerRuntime, engine_reachable

        if engine_reachable():
            return DockerRuntime(config), "a Docker engine answers"
        if config.runtime == "docker":
            raise CommandFailed("--runtime docker: no Docker engine answers (is dockerd running? DOCKER_HOST?)")
    from agent.process_runtime import ProcessRuntime

    why = "asked for" if config.runtime == "process" else "no Docker engine answers"
    return ProcessRuntime(config), why


# --- client commands --------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    from agent.client import AgentClient, find_token

    return AgentClient(args.agent, find_token(args.state_dir))


def _call(args: argparse.Namespace, method: str, path: str, payload: bytes | None = None) -> Any:
    from agent.client import ApiError

    try:
        return _client(args).call(method, path, payload)
    except ApiError as exc:
        if exc.status == 422 and isinstance(exc.detail, list):
            lines = "\n".join(f"  {item['path']}: {item['message']}" if item.get("path") else f"  {item['message']}"
                              for item in exc.detail)
            raise UsageError(f"the agent refused it:\n{lines}") from None
        raise CommandFailed(str(exc.detail)) from None


def run_deploy(args: argparse.Namespace) -> int:
    try:
        payload = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.file}: cannot read the file: {exc.strerror or exc}") from None
    service = _call(args, "POST", "/v1/services", payload)
    for warning in service.get("warnings", []):
        print(f"warning: {warning['path']}: {warning['message']}", file=sys.stderr)
    print(f"deployed {service['name']} revision {service['revision']} ({service['instance']} instance(s), "
          f"runtime {service['runtime']})", file=sys.stderr)
    if args.wait:
        service = _wait_ready(args, service["name"], args.timeout)
    if args.json:
        print(json.dumps(service, indent=2))
    return 0


def run_update(args: argparse.Namespace) -> int:
    if args.rollback == bool(args.file):
        raise UsageError("give either FILE (the new config) or --rollback, not both or neither")
    if args.rollback:
        service = _call(args, "POST", f"/v1/services/{quote(args.name)}/rollback")
    else:
        try:
            payload = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"{args.file}: cannot read the file: {exc.strerror or exc}") from None
        service = _call(args, "PUT", f"/v1/services/{quote(args.name)}", payload)
        for warning in service.get("warnings", []):
            print(f"warning: {warning['path']}: {warning['message']}", file=sys.stderr)
    print(f"{service['name']}: rolling to revision {service['revision']} ({service['instance']} instance(s))", file=sys.stderr)
    if args.wait:
        service = _wait_rollout(args, service["name"], service["revision"], args.timeout)
    if args.json:
        print(json.dumps(service, indent=2))
    return 0


def run_scale(args: argparse.Namespace) -> int:
    service = _call(args, "POST", f"/v1/services/{quote(args.name)}/scale", json.dumps({"instance": args.count}).encode())
    print(f"{service['name']}: scaling to {service['instance']} instance(s)", file=sys.stderr)
    if args.wait:
        service = _wait_ready(args, service["name"], args.timeout)
    if args.json:
        print(json.dumps(service, indent=2))
    return 0


def _wait_rollout(args: argparse.Namespace, name: str, revision: str, timeout: float) -> dict:
    started = time.monotonic()
    seen: set[tuple] = set()
    while True:
        service = _call(args, "GET", f"/v1/services/{quote(name)}")
        for inst in service["instances"]:
            key = (inst["id"], inst["revision"], inst["state"])
            if key not in seen:
                seen.add(key)
                print(f"[{time.monotonic() - started:6.1f}s] {inst['id']} {inst['revision']}: {inst['state']}"
                      + (f" ({inst['reason']})" if inst["reason"] else ""), file=sys.stderr)
        rollout = service.get("rollout") or {}
        if service["revision"] != revision:
            raise CommandFailed(f"{name}: another update (revision {service['revision']}) superseded this one")
        if rollout.get("state") == "Paused":
            raise CommandFailed(f"{name}: rollout paused: {rollout['reason']}")
        if rollout.get("state") == "Complete":
            print(f"{name}: every instance on revision {revision} in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return service
        if time.monotonic() - started > timeout:
            raise CommandFailed(f"{name}: rollout not complete within {timeout:.0f} s")
        time.sleep(0.25)


def _wait_ready(args: argparse.Namespace, name: str, timeout: float) -> dict:
    started = time.monotonic()
    seen: dict[str, tuple[str, str]] = {}
    while True:
        service = _call(args, "GET", f"/v1/services/{quote(name)}")
        for inst in service["instances"]:
            now = (inst["state"], inst["reason"])
            if seen.get(inst["id"]) != now:
                seen[inst["id"]] = now
                print(f"[{time.monotonic() - started:6.1f}s] {inst['id']}: {inst['state']}"
                      + (f" ({inst['reason']})" if inst["reason"] else ""), file=sys.stderr)
            if inst["state"] in FAILING_STATES:
                raise CommandFailed(f"{inst['id']} cannot start: {inst['state']}: {inst['reason']}" + _log_tail(inst))
        # Zero instances asked for: nothing to wait for.
        if len(service["instances"]) == service["instance"] and all(inst["ready"] for inst in service["instances"]):
            print(f"{name}: {service['ready']}/{service['instance']} ready in {time.monotonic() - started:.1f} s",
                  file=sys.stderr)
            return service
        if time.monotonic() - started > timeout:
            raise CommandFailed(f"{name}: not ready within {timeout:.0f} s ({service['ready']}/{service['instance']} ready)")
        time.sleep(0.25)


def _log_tail(inst: dict) -> str:
    tail = (inst.get("last_exit") or {}).get("log_tail") or []
    return ("\nlast log lines:\n  " + "\n  ".join(tail[-10:])) if tail else ""


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _age(created: float) -> str:
    seconds = max(0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def run_ls(args: argparse.Namespace) -> int:
    services = _call(args, "GET", "/v1/services")
    if args.json:
        print(json.dumps(services, indent=2))
        return 0
    rows = [["NAME", "READY", "REVISION", "RUNTIME", "IMAGE", "AGE"]]
    marks = {"Deleting": " (removing)", "Idle": " (idle)"}
    rows += [[s["name"], f"{s['ready']}/{s['instance']}" + marks.get(s["state"], ""), s["revision"],
              s["runtime"], s["image"], _age(s["created"])] for s in services]
    print(_table(rows) if services else "no services")
    return 0


def run_get(args: argparse.Namespace) -> int:
    service = _call(args, "GET", f"/v1/services/{quote(args.name)}")
    if args.json:
        print(json.dumps(service, indent=2))
        return 0
    print(f"{service['name']}  {service['state']}  revision {service['revision']}  runtime {service['runtime']}  "
          f"image {service['image']}  {service['ready']}/{service['instance']} ready")
    for line in _scaling_lines(service.get("autoscaler")):
        print(line)
    if service.get("gateway_url"):
        print(f"gateway   {service['gateway_url']}")
    rollout = service.get("rollout")
    if rollout and rollout["state"] != "Complete":
        print(f"rollout {rollout['state']} to {rollout['revision']}" + (f": {rollout['reason']}" if rollout["reason"] else ""))
    rows = [["INSTANCE", "REVISION", "STATE", "READY", "RESTARTS", "GPUS", "ENDPOINT", "LAST EXIT", "REASON"]]
    for inst in service["instances"]:
        last = inst["last_exit"]
        rows.append([inst["id"], inst["revision"], inst["state"], "yes" if inst["ready"] else "no", str(inst["restarts"]),
                     ",".join(inst["gpus"]) or "-", inst["endpoint"] or "-",
                     f"{last['code']} {last['reason']}" if last else "-", inst["reason"] or "-"])
    print(_table(rows))
    from agent.coldstart import summary

    for inst in service["instances"]:
        if inst.get("cold_start"):
            print(f"{inst['id']} cold start: {summary(inst['cold_start'])}")
        if inst["last_exit"] and inst["last_exit"]["message"]:
            print(f"{inst['id']} last exit: {inst['last_exit']['message']}")
    return 0


def _scaling_lines(scaler: dict | None) -> list[str]:
    """min..max, desired and current, each metric against its threshold, the last decision and why."""
    if not scaler:
        return []
    lines = []
    if "min" in scaler:
        floor = f" (cron min {scaler['floor']})" if scaler["floor"] != scaler["min"] else ""
        lines.append(f"autoscaler {scaler['min']}..{scaler['max']}{floor}  desired {scaler['desired']}  "
                     f"current {scaler['current']}  ready {scaler['ready']}")
        for metric in scaler["metrics"]:
            value = "-" if metric["value"] is None else f"{metric['value']:g}"
            wants = "" if metric["wants"] is None else f" -> wants {metric['wants']}"
            lines.append(f"  {metric['metric']:<20} {value} / {metric['threshold']:g} per instance{wants}")
    if scaler.get("cron"):
        cron = scaler["cron"]
        lines.append(f"cron job {cron['job']!r} set {cron['target']} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(cron['at']))}")
    if scaler.get("decision"):
        decision = scaler["decision"]
        lines.append(f"last decision {_age(decision['at'])} ago: {decision['from']} -> {decision['to']}: {decision['why']}")
    return lines


def run_logs(args: argparse.Namespace) -> int:
    query = f"follow={'true' if args.follow else 'false'}"
    if args.instance:
        query += f"&instance={quote(args.instance)}"
    if args.tail is not None:
        query += f"&tail={args.tail}"
    if args.previous:
        query += "&previous=true"
    from agent.client import ApiError

    try:
        for chunk in _client(args).stream(f"/v1/services/{quote(args.name)}/logs?{query}"):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    except ApiError as exc:
        raise CommandFailed(str(exc.detail)) from None
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from agent.client import ApiError

    _call(args, "DELETE", f"/v1/services/{quote(args.name)}")
    print(f"{args.name}: stopping (SIGTERM, then SIGKILL after the grace period)", file=sys.stderr)
    started = time.monotonic()
    while not args.no_wait:
        try:
            _client(args).call("GET", f"/v1/services/{quote(args.name)}")
        except ApiError as exc:
            if exc.status == 404:
                print(f"{args.name}: removed in {time.monotonic() - started:.1f} s", file=sys.stderr)
                return 0
            raise CommandFailed(str(exc.detail)) from None
        time.sleep(0.2)
    return 0


def run_node(args: argparse.Namespace) -> int:
    from bootstrap.units import format_bytes

    node = _call(args, "GET", "/v1/node")
    if args.json:
        print(json.dumps(node, indent=2))
        return 0
    print(f"runtime   {node['runtime']} ({node['engine']})")
    for limitation in node["limitations"]:
        print(f"          cannot enforce: {limitation}")
    print(f"cpu       {node['cpu']['count']} cores, load {' '.join(f'{x:.2f}' for x in node['cpu']['load'])}")
    print(f"memory    {format_bytes(node['memory']['available'])} available of {format_bytes(node['memory']['total'])}")
    for label, disk in node["disks"].items():
        print(f"disk      {label}: {disk['path']} {format_bytes(disk['free'])} free of {format_bytes(disk['total'])}")
    gateway = node.get("gateway") or {}
    print(f"gateway   {gateway.get('url') or '-'} ({gateway.get('mode')}; admin {gateway.get('admin_url') or '-'}, "
          f"routes version {gateway.get('routes_version')}, acknowledged {gateway.get('acked_version')})")
    print(f"gpus      {len(node['gpus'])}")
    for gpu in node["gpus"]:
        utilization = "?" if gpu["utilization_percent"] is None else f"{gpu['utilization_percent']}%"
        print(f"          {gpu['uuid']}  {gpu['name']}  {format_bytes(gpu['memory_used_bytes'])} of "
              f"{format_bytes(gpu['memory_total_bytes'])} used, {utilization} busy, held by {gpu['instance'] or '-'}")
        shares = gpu.get("shares", [])
        if shares:
            print(f"            shared: {format_bytes(gpu['booked_bytes'])} of {format_bytes(gpu['memory_total_bytes'])} booked")
        for share in shares:
            print(f"            share {share['instance']}: {format_bytes(share['memory_bytes'])}, "
                  f"{format_bytes(share['used_bytes'])} used (NVML)")
        for process in gpu["processes"]:
            owner = process["instance"] or (process["container"] or "")[:12] or "host"
            used = "" if process["used_memory_bytes"] is None else f", {format_bytes(process['used_memory_bytes'])}"
            print(f"            pid {process['pid']} ({owner}{used})")
    images = node["images"]
    print(f"images    {len(images)}" + (f" ({format_bytes(sum(i['size'] for i in images))})" if images else ""))
    for image in images:
        print(f"          {', '.join(image['tags']) or image['id'][:19]}  {format_bytes(image['size'])}")
    return 0




# --- service groups ---------------------------------------------------------------------------


def run_group_apply(args: argparse.Namespace) -> int:
    from bootstrap.group import parse_group
    from bootstrap.spec import read_document

    raw = sys.stdin.read() if args.file == "-" else read_document(args.file)
    group, _ = parse_group(raw, source=args.file)  # the same errors here as from the agent, before any call
    view = _call(args, "PUT", f"/v1/groups/{quote(group.name)}", json.dumps(group.to_json_dict(reveal_secrets=True)).encode())
    for warning in view.get("warnings", []):
        print(f"warning: {warning['path']}: {warning['message']}", file=sys.stderr)
    print(f"group {group.name}: {len(group.routes)} route(s) applied; " +
          (f"endpoint {view['gateway_url']}" if view.get("gateway_url") else "no gateway on this node"), file=sys.stderr)
    if args.json:
        print(json.dumps(view, indent=2))
    return 0


def run_group_get(args: argparse.Namespace) -> int:
    view = _call(args, "GET", f"/v1/groups/{quote(args.name)}")
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"{view['name']}  endpoint {view['gateway_url'] or '-'}  members {', '.join(view['members']) or '-'}"
          + ("" if view["serving"] else "  (not served: no member can answer)"))
    observed = view.get("observed_split_percent") or {}
    rows = [["SERVICE", "WEIGHT", "MIRROR %", "MATCH", "CONFIGURED %", "OBSERVED % (1 min)"]]
    for route in view["routes"]:
        match = route.get("match")
        rows.append([route["service"], "-" if match else str(route.get("weight", 100)), str(route.get("mirror_weight", 0)),
                     json.dumps(match["headers"]) if match else "-",
                     "-" if match else str(view["configured_split_percent"].get(route["service"], 0)),
                     str(observed.get(route["service"], "-"))])
    print(_table(rows))
    return 0


def run_group_ls(args: argparse.Namespace) -> int:
    groups = _call(args, "GET", "/v1/groups")
    if args.json:
        print(json.dumps(groups, indent=2))
        return 0
    rows = [["NAME", "MEMBERS", "SPLIT %", "ENDPOINT"]]
    rows += [[g["name"], ", ".join(g["members"]), " / ".join(f"{k} {v}" for k, v in g["configured_split_percent"].items()) or "-",
              g["gateway_url"] or "-"] for g in groups]
    print(_table(rows) if groups else "no service groups")
    return 0


def run_group_rm(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/v1/groups/{quote(args.name)}")
    print(f"group {args.name}: removed (its member services keep running)", file=sys.stderr)
    return 0
