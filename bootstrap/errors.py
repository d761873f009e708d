"""Errors every `berth` command maps onto its exit code: 0 done, 1 failed, 2 bad usage or input."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandFailed(Exception):
    """The operation was attempted and failed; the message says why (exit 1)."""


class UsageError(Exception):
    """The command line or an input file is wrong; the message says what to fix (exit 2)."""
