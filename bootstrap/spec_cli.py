"""`berth spec check FILE`: validate a service config and print it normalized."""

from __future__ import annotations

import argparse
import sys

from bootstrap.errors import EXIT_USAGE
from bootstrap.spec import SpecError, load_spec_file


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    spec = subparsers.add_parser("spec", help="work with service specs (EAS-style JSON)")
    spec_sub = spec.add_subparsers(dest="spec_command", metavar="COMMAND")
    spec_sub.required = True
    check = spec_sub.add_parser(
        "check",
        help="validate a service config",
        description=(
            "Validate an EAS-style JSON service config. Prints the normalized spec (defaults filled "
            "in, secrets redacted) on stdout and warnings on stderr, exit 0; or every error with its "
            "JSON path on stderr, exit 2. Units as EAS's: metadata.memory in MB means MiB; shm_size and "
            "gpu_memory in GB mean GiB (gpu_memory: a share of one GPU, with gpu 0 or absent)."
        ),
    )
    check.add_argument("file", metavar="FILE", help="the JSON service config ('-' reads stdin)")
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    try:
        parsed = load_spec_file("/dev/stdin" if args.file == "-" else args.file)
    except SpecError as exc:
        for warning in exc.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        source = f"{exc.source}: " if exc.source else ""
        print(f"{source}{len(exc.issues)} error(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        return EXIT_USAGE
    for warning in parsed.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(parsed.spec.to_json())
    return 0
