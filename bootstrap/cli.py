"""The `berth` command: one console script, a subcommand per job.

Each subcommand lives in the package that owns it and registers itself through an
`add_commands(subparsers)` function that imports nothing heavy; the handler imports what it
needs when it runs, so `berth boot` never loads the Docker SDK or FastAPI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from bootstrap.errors import EXIT_FAILED, EXIT_USAGE, CommandFailed, UsageError
from bootstrap.spec import SpecError

# Modules that contribute subcommands, in the order `berth --help` lists them.
COMMAND_MODULES = ("bootstrap.spec_cli", "bootstrap.boot_cli", "agent.cli", "serving.gateway_cli")

DESCRIPTION = """\
berth: serve models on a GPU node.

  berth spec check FILE   validate an EAS-style service config
  berth boot -- CMD ARGS  container entrypoint: prepare, launch, warm up, proxy, drain
  berth agent             the node daemon: runs services, probes, restarts, re-adopts
  berth deploy FILE       run a service on the agent (--wait: until every instance is Ready)
  berth ls | get NAME     list services; one service's instances, endpoints, last exits
  berth logs NAME [-f]    an instance's logs
  berth rm NAME           stop (SIGTERM, grace, SIGKILL) and remove a service
  berth node              the node: runtime, CPU, memory, disks, images
  berth render k8s FILE   Kubernetes manifests from the same JSON (docs/kubernetes.md)
  berth gateway           one address per service and group: /api/predict/NAME
  berth group apply FILE  a service group: weights, mirror, header routes

Exit codes: 0 done, 1 the operation failed, 2 bad usage or invalid input.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="berth", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SpecError as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
