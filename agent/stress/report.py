"""The verdict, the autoscaler strategy it implies, and the report files (report.json, report.html).

The HTML report stands alone: its charts are PNGs inlined as data: URIs, its style inline, no
script at all, so it opens offline and from a mail attachment (GuideLLM's loads its page
from the internet).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from agent.stress.search import Search
from agent.stress.slo import format_ms

# The seed's rule: scale on concurrency at 70% of what saturates one instance.
AUTOSCALE_FRACTION = 0.7
LIMIT_WORDS = {"p50": "p50", "p90": "p90", "p99": "p99", "ttft_p99": "TTFT p99", "itl_p99": "ITL p99", "e2e_p99": "end-to-end p99"}


def saturation(search: Search) -> dict | None:
    """report.json's `saturation`: the highest step that met the SLO, and where it broke."""
    best, failing = search.best, search.failing
    if best is None and failing is None:
        return None
    per_instance = ((best.get("service") or {}).get("per_instance") if best else None)
    return {
        "rate": best["achieved_rate"] if best else None,
        "concurrency": best["concurrency"] if best else None,
        "per_instance": per_instance,
        "first_failing_rate": _rate(failing) if failing else None,
        "limit": search.limit,
        "step": best["index"] if best else None,
        "first_failing_step": failing["index"] if failing else None,
    }


def autoscaler(found: dict | None, url_target: bool) -> dict | None:
    """The EAS strategy the saturation implies: {"metricName": "concurrency", "threshold": 70% of the
    saturating per-instance concurrency}. A URL target has no instances: the URL is taken as one."""
    if not found or found["rate"] is None:
        return None
    per_instance = found["per_instance"]
    concurrency = per_instance["concurrency"] if per_instance else found["concurrency"]
    threshold = max(0.1, round(AUTOSCALE_FRACTION * concurrency, 1))
    return {"strategy": {"metricName": "concurrency", "threshold": threshold},
            "basis": "the URL taken as one instance (no service-side data)" if url_target or not per_instance
            else "per Ready instance, from the agent"}


def verdict_lines(report: dict) -> list[str]:
    found, scaler = report["saturation"], report["autoscaler"]
    if found is None:
        return ["no verdict: no step completed"]
    lines = []
    if found["rate"] is None:
        lines.append(f"saturation: below the first step: {_broke(report, found)}")
    else:
        per = found["per_instance"]
        if per:
            head = (f"saturation: {per['rate']:.4g} req/s per instance (concurrency {per['concurrency']:.2g} per instance); "
                    f"{found['rate']:.4g} req/s in all")
        else:
            head = f"saturation: {found['rate']:.4g} req/s (concurrency {found['concurrency']:.2g})"
        lines.append(f"{head}; {_broke(report, found)}")
    if report["target"]["kind"] == "url":
        lines.append("no per-instance figure: a URL target has no service-side data (give a service name for it)")
    if scaler:
        lines.append(f"autoscaler ({scaler['basis']}): {json.dumps(scaler['strategy'])}")
    limited = [step["index"] for step in report["steps"] if step["generator"]["limit"]]
    if limited:
        lines.append(f"warning: the generator itself was near its limit in step(s) {', '.join(map(str, limited))}: "
                     "add --workers or run from a less busy machine")
    return lines


def _broke(report: dict, found: dict) -> str:
    limit = found["limit"]
    failing = next((s for s in report["steps"] if s["index"] == found["first_failing_step"]), None)
    at = f"{found['first_failing_rate']:.4g} req/s" if found["first_failing_rate"] is not None else "?"
    if limit == "errors" and failing:
        return f"errors reached {failing['error_rate']:.2%} (over {report['settings']['max_errors']:.2%}) at {at}"
    if limit in LIMIT_WORDS and failing:
        broken = next(b for b in failing["slo"]["broken"] if b["limit"] == limit)
        return f"{LIMIT_WORDS[limit]} crossed {format_ms(broken['bound'])} at {at} ({format_ms(round(broken['value'], 1))})"
    if limit == "max_rate":
        return "every step met the SLO up to the highest load asked for (--max-rate or the last step)"
    if limit == "duration":
        return "--duration ran out before a limit broke"
    return "stopped before a limit broke (interrupted)"


def _rate(step: dict) -> float:
    return step["offered_rate"] if step["offered_rate"] is not None else step["achieved_rate"]


def write_json(out: Path, report: dict) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


def write_html(out: Path, report: dict, charts: list[Path]) -> Path:
    esc = html.escape
    rows = []
    for step in report["steps"]:
        latency = step["latency_ms"] or {}
        llm = step["llm"] or {}
        service = step["service"] or {}
        rows.append("<tr>" + "".join(f"<td>{esc(str(cell))}</td>" for cell in (
            step["index"], step["kind"], _num(step["value"]), _num(step["offered_rate"]), _num(step["achieved_rate"]),
            _num(step["concurrency"]), _num(latency.get("p50")), _num(latency.get("p90")), _num(latency.get("p99")),
            _num((llm.get("ttft_ms") or {}).get("p99")), _num((llm.get("itl_ms") or {}).get("p99")),
            f"{step['error_rate']:.2%}", _num(service.get("instances_ready_avg")),
            "pass" if step["slo"]["passed"] else "FAIL " + ", ".join(b["limit"] for b in step["slo"]["broken"]))) + "</tr>")
    figures = "".join(
        f'<figure><img alt="{esc(path.stem)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        f"<figcaption>{esc(path.stem)}</figcaption></figure>" for path in charts)
    settings = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in report["settings"].items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>berth stress: {esc(report['target']['label'])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f4f4f4; }}
figure {{ display: inline-block; margin: 0.5em; }}
img {{ width: 640px; border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 0.6em; }}
</style></head><body>
<h1>berth stress: {esc(report['target']['label'])}</h1>
<p>{esc(report['target']['route'])}; {esc(report['workload'])}; mode {esc(report['settings']['mode'])}; SLO {esc(report['settings']['slo'])}</p>
<pre>{esc(chr(10).join(verdict_lines(report)))}</pre>
<h2>Charts</h2>
{figures}
<h2>Steps</h2>
<table><tr><th>#</th><th>kind</th><th>value</th><th>offered req/s</th><th>achieved req/s</th><th>concurrency</th>
<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>TTFT p99 ms</th><th>ITL p99 ms</th><th>errors</th><th>instances</th><th>SLO</th></tr>
{''.join(rows)}</table>
<h2>Settings</h2><table>{settings}</table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _num(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
