"""What `berth stress` shows in the terminal (rich): a live line per step, a row when it ends, and
the final table with the verdict."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.stress.generator import Progress


def _cell(value, fmt: str = "{:.4g}") -> str:
    return "-" if value is None else fmt.format(value)


class Screen:
    def __init__(self) -> None:
        # Piped or logged output gets a table wide enough for its columns.
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 170)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False)

    @contextlib.contextmanager
    def step(self, label: str, seconds: float, progress: Callable[[], Progress]) -> Iterator[None]:
        began = time.monotonic()

        def line() -> Text:
            now = progress()
            return Text(f"{label}: {time.monotonic() - began:4.0f}/{seconds:.0f} s  sent {now.sent}  answered {now.done - now.errors}"
                        f"  errors {now.errors}  in flight {now.inflight}", style="cyan")

        with Live(get_renderable=line, console=self.console, refresh_per_second=2, transient=True):
            yield

    def step_done(self, step: dict) -> None:
        latency = step["latency_ms"] or {}
        verdict = "[green]pass[/]" if step["slo"]["passed"] else "[red]FAIL " + ", ".join(b["limit"] for b in step["slo"]["broken"]) + "[/]"
        extra = ""
        if step["llm"] and step["llm"]["ttft_ms"]:
            extra = f"  TTFT p99 {step['llm']['ttft_ms']['p99']:.0f} ms  ITL p99 {_cell((step['llm']['itl_ms'] or {}).get('p99'), '{:.1f}')} ms"
        service = step["service"] or {}
        instances = f"  instances {service['instances_ready_avg']:.2g}" if service.get("instances_ready_avg") is not None else ""
        self.console.print(
            f"step {step['index']} {step['kind']} {step['value']:.4g}: offered {_cell(step['offered_rate'])} req/s, "
            f"achieved {step['achieved_rate']:.4g} req/s, concurrency {step['concurrency']:.3g}, p50 {_cell(latency.get('p50'), '{:.1f}')} ms, "
            f"p99 {_cell(latency.get('p99'), '{:.1f}')} ms, errors {step['error_rate']:.2%}{extra}{instances}  {verdict}"
            + (f"  [yellow]{step['generator']['limit']}[/]" if step["generator"]["limit"] else ""))

    def final(self, report: dict, verdict: list[str]) -> None:
        llm = any(step["llm"] for step in report["steps"])
        table = Table(title=f"berth stress {report['target']['label']}", show_lines=False)
        columns = ["#", "kind", "value", "offered/s", "achieved/s", "conc.", "p50 ms", "p90 ms", "p99 ms"]
        columns += ["TTFT p99", "ITL p99", "tok/s"] if llm else []
        columns += ["errors", "inst.", "SLO"]
        for name in columns:
            table.add_column(name, justify="right")
        for step in report["steps"]:
            latency = step["latency_ms"] or {}
            row = [str(step["index"]), step["kind"], _cell(step["value"]), _cell(step["offered_rate"]), _cell(step["achieved_rate"]),
                   _cell(step["concurrency"], "{:.3g}"), _cell(latency.get("p50"), "{:.1f}"), _cell(latency.get("p90"), "{:.1f}"),
                   _cell(latency.get("p99"), "{:.1f}")]
            if llm:
                tokens = step["llm"] or {}
                row += [_cell((tokens.get("ttft_ms") or {}).get("p99"), "{:.1f}"), _cell((tokens.get("itl_ms") or {}).get("p99"), "{:.2f}"),
                        _cell(tokens.get("output_tokens_per_s"), "{:.0f}")]
            row += [f"{step['error_rate']:.2%}", _cell((step["service"] or {}).get("instances_ready_avg"), "{:.2g}"),
                    "pass" if step["slo"]["passed"] else "FAIL"]
            table.add_row(*row, style=None if step["slo"]["passed"] else "red")
        self.console.print(table)
        for line in verdict:
            self.console.print(line, markup=False, style="bold" if line.startswith(("saturation", "autoscaler")) else None)
