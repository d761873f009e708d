"""Docker's timestamps (RFC 3339 with nanoseconds) as epoch seconds: one parser for every caller."""

from __future__ import annotations

import re
from datetime import datetime


def docker_time(stamp: str | None) -> float | None:
    """"2026-11-23T05:54:00.123456789Z" -> epoch seconds; None for Docker's zero time ("0001-...") or nothing."""
    if not stamp or stamp.startswith("0001-"):
        return None
    microseconds = re.sub(r"(\.\d{6})\d+", r"\1", stamp)  # Python reads at most 6 fraction digits
    try:
        return datetime.fromisoformat(microseconds.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
