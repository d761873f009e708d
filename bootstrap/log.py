"""Log lines a person can read (or JSON lines for machines), one setup for every subcommand."""

from __future__ import annotations

import json
import logging
import os
import sys
import time


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.name} {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "logger": record.name,
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(*, json_lines: bool | None = None, level: str | None = None) -> None:
    """Log to stderr; BERTH_LOG_JSON=1 and BERTH_LOG_LEVEL=debug pick the form and the level."""
    if json_lines is None:
        json_lines = os.environ.get("BERTH_LOG_JSON", "0") in ("1", "true", "yes")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else _HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("BERTH_LOG_LEVEL", "info")).upper())
