"""One JSON object read from a file, its errors naming the file and what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bootstrap.errors import UsageError


def read_json_object(path: Path, what: str, *, error: type[Exception] = UsageError) -> dict[str, Any]:
    """The file's JSON object; `error` (UsageError by default) when it cannot be read, is not
    JSON or is not an object. `what` names the file's role: "the agent config"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data
