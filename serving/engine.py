"""The seam for engine adapters (vLLM ...): what `berth boot` asks of the engine it runs.

An adapter (1) turns its arguments into the child's argv and env, (2) may bring a built-in
warmup profile (JSON lines, the same format as --warmup files), (3) may report the engine's
own in-flight and waiting requests (drain waits on them with --no-proxy, where the proxy
cannot count), (4) may add metrics text to /metrics. `UserCommand`, the default, runs the
user's own command and knows nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int

    @property
    def busy(self) -> bool:
        return self.running + self.waiting > 0


class Engine:
    """Base and generic default: override only what the engine can do better."""

    name = "command"

    def launch(self, port: int) -> Launch:
        raise NotImplementedError

    def warmup_profile(self) -> list[str]:
        """Built-in warmup requests, as JSON lines; used when no warmup file is given."""
        return []

    async def sized_warmup_profile(self, port: int) -> list[str]:
        """The built-in profile, sized against the running engine where it can tell (tokens)."""
        return self.warmup_profile()

    async def load(self, port: int) -> EngineLoad | None:
        """The engine's own in-flight and waiting counts; None when it cannot tell."""
        return None

    async def metrics_text(self, port: int) -> str:
        """Prometheus text appended to the bootstrap's /metrics."""
        return ""


class UserCommand(Engine):
    """The user's own command, from `--` or the spec."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env or {})

    def launch(self, port: int) -> Launch:
        return Launch(self.argv, self.env)
