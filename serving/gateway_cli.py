"""`berth gateway` (run the node gateway) and `berth gateway stop`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bootstrap.errors import UsageError

DEFAULT_LISTEN = "127.0.0.1:7080"
DEFAULT_ADMIN = "127.0.0.1:7081"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    gateway = subparsers.add_parser(
        "gateway", help="the node gateway: one address per service and group (/api/predict/NAME)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Route http://LISTEN/api/predict/NAME[/PATH] to the Ready instances of service or group NAME\n"
            "(as /PATH), with the service's token, power-of-two-choices balancing, a group's weights,\n"
            "mirror and header routes, and requests held while NAME has no Ready instance.\n\n"
            "Routes come from the agent (--agent URL --token-file FILE: the agent's API token), or from a\n"
            "static --routes-file (JSON: {\"services\": {NAME: {\"token\": ..., \"instances\": [{\"id\": ...,\n"
            "\"url\": \"http://HOST:PORT\"}]}}, \"groups\": {NAME: {\"routes\": [...]}}}; re-read when it changes).\n"
            "The admin address serves /metrics, /healthz, /routes (tokens redacted) and /v1/stats.\n\n"
            "`berth agent` starts one itself (--gateway); `berth gateway stop --state-dir DIR` stops it."
        ),
    )
    gateway.add_argument("action", nargs="?", choices=["run", "stop"], default="run",
                         help="run (default), or stop the gateway of --state-dir")
    gateway.add_argument("--agent", metavar="URL", help="the agent whose routes to serve: http://HOST:PORT or unix:/path")
    gateway.add_argument("--token-file", type=Path, metavar="FILE", help="the agent's API token (<state-dir>/token)")
    gateway.add_argument("--routes-file", type=Path, metavar="FILE", help="a static route table instead of an agent")
    gateway.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                         help=f"where clients connect (default {DEFAULT_LISTEN}; port 0 picks a free one)")
    gateway.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT",
                         help=f"metrics, health and routes (default {DEFAULT_ADMIN})")
    gateway.add_argument("--state-dir", type=Path, metavar="DIR",
                         help="write gateway.pid and gateway.json (addresses) here; with stop: whose gateway to stop")
    gateway.add_argument("--hold-timeout", type=float, default=300.0, metavar="S",
                         help="how long a request waits for a Ready instance (default 300, Knative's request timeout)")
    gateway.add_argument("--hold-queue", type=int, default=1000, metavar="N",
                         help="requests held at once; beyond, 503 at once (default 1000)")
    gateway.add_argument("--mirror-inflight", type=int, default=100, metavar="N",
                         help="mirror copies in flight at once; beyond, copies are dropped and counted (default 100)")
    gateway.add_argument("--trust-forwarded", action="store_true",
                         help="keep a client's X-Forwarded-For (behind a proxy you run); by default it is replaced")
    gateway.add_argument("--access-log", type=Path, metavar="FILE", help="append one JSON line per request")
    gateway.set_defaults(handler=run_gateway)


def parse_address(value: str, flag: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{flag} {value!r}: give HOST:PORT, e.g. 127.0.0.1:7080 (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def run_gateway(args: argparse.Namespace) -> int:
    if args.action == "stop":
        return stop_gateway(args)
    from bootstrap.log import configure
    from serving.gateway import GatewayConfig, serve
    from serving.routing import TableError

    if (args.agent is None) == (args.routes_file is None):
        raise UsageError("give either --agent URL (with --token-file) or --routes-file FILE")
    token = None
    if args.agent is not None:
        if args.token_file is None:
            raise UsageError("--agent needs --token-file FILE (the agent's API token, <state-dir>/token)")
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {args.token_file}: cannot read it: {exc.strerror or exc}") from None
    if args.hold_queue < 0 or args.hold_timeout < 0 or args.mirror_inflight < 0:
        raise UsageError("--hold-timeout, --hold-queue and --mirror-inflight take values of 0 or more")
    config = GatewayConfig(
        listen=parse_address(args.listen, "--listen"), admin=parse_address(args.admin, "--admin"), agent_url=args.agent,
        agent_token=token, routes_file=args.routes_file, state_dir=args.state_dir, hold_timeout=args.hold_timeout,
        hold_queue=args.hold_queue, trust_forwarded=args.trust_forwarded, access_log=args.access_log,
        mirror_inflight=args.mirror_inflight,
    )
    configure()
    try:
        import uvloop

        uvloop.run(serve(config, ready=_announce))
    except TableError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc} (--listen {args.listen}, --admin {args.admin})") from None
    return 0


def _announce(url: str, admin_url: str) -> None:
    print(f"berth gateway: listening on {url}, admin {admin_url} (pid {os.getpid()})", file=sys.stderr, flush=True)


def stop_gateway(args: argparse.Namespace) -> int:
    from agent.gateway_process import stop

    state_dir = args.state_dir or Path(os.environ.get("BERTH_STATE_DIR", "/var/lib/berth"))
    pid = stop(state_dir)
    print(f"berth gateway: stopped pid {pid}" if pid else f"berth gateway: none runs for {state_dir}", file=sys.stderr)
    return 0
