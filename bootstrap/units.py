"""Units pinned by the service spec: Kubernetes quantities, EAS's MB and GB, percentages."""

from __future__ import annotations

import math
import re
from decimal import Decimal

MIB = 1024**2
GIB = 1024**3

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
MAX_QUANTITY = 1024**5  # 1 PiB: more than any one node's disk or memory
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([KMGTPE]i|[kMGTPE])?\s*$")


def parse_quantity(value: str | int | float) -> int:
    """Bytes in a Kubernetes quantity such as "100Gi", "512Mi", "1.5G" or 1024.

    Raises ValueError with a message that shows the accepted forms, or the upper bound (1Pi).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; use a number of bytes or a quantity like '100Gi'")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a size; use a number of bytes or a quantity like '100Gi'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value} is negative; a size must be 0 or more")
        size = Decimal(value)
    else:
        match = _QUANTITY.match(value)
        if not match:
            raise ValueError(f"{value[:64]!r} is not a size; use a quantity like '100Gi', '512Mi' or '10G'")
        number, suffix = match.groups()
        size = Decimal(number) * (_BINARY.get(suffix or "") or _DECIMAL.get(suffix or "") or 1)
    if size > MAX_QUANTITY:
        raise ValueError(f"{str(value)[:64]} is too large: at most 1Pi ({MAX_QUANTITY} bytes)")
    return int(size)


def mebibytes(mb: int | float) -> int:
    """EAS's `memory` is in MB, meaning MiB: 512 -> 536870912 bytes."""
    return int(mb * MIB)


def gibibytes(gb: int | float) -> int:
    """EAS's `shm_size` is in GB, meaning GiB; fractions are allowed."""
    return int(gb * GIB)


def resolve_count(value: int | str, total: int, *, round_up: bool) -> int:
    """An absolute count from a number or a percentage of `total` ("25%").

    Kubernetes rounds max_surge up and max_unavailable down; the caller picks which.
    """
    if isinstance(value, int):
        return value
    percent = float(value.rstrip("%"))
    exact = total * percent / 100
    return math.ceil(exact) if round_up else math.floor(exact)


def format_bytes(size: int) -> str:
    """A short human form: 1536 -> '1.5 KiB'."""
    step = 1024.0
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < step or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= step
    raise AssertionError("unreachable")
