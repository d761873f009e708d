"""The report's PNG charts, drawn with matplotlib (headless: the Agg backend)."""

from __future__ import annotations

from pathlib import Path


def draw(out: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    steps = [s for s in report["steps"] if s["kind"] != "calibration" and s["latency_ms"]]
    answered = [s for s in report["steps"] if s["latency_ms"]]
    plain_bounds = [b for b in report["slo"] if "_" not in b["name"]]
    paths: list[Path] = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        path = out / f"{name}.png"
        figure.savefig(path, dpi=100)
        pyplot.close(figure)
        paths.append(path)

    def x_rate(step: dict) -> float:
        return step["offered_rate"] if step["offered_rate"] is not None else step["achieved_rate"]

    by_rate = sorted(steps, key=x_rate)
    if by_rate:
        figure, axes = pyplot.subplots(figsize=(7, 4))
        xs = [x_rate(s) for s in by_rate]
        for q in ("p50", "p90", "p99"):
            axes.plot(xs, [s["latency_ms"][q] for s in by_rate], marker="o", label=q)
        for bound in plain_bounds:
            axes.axhline(bound["limit_ms"], color="red", linestyle="--", label=f"SLO {bound['name']}")
        axes.set(xlabel="rate (req/s; offered, or achieved in closed loop)", ylabel="latency (ms)", title="Latency percentiles vs rate")
        axes.set_yscale("log")
        axes.legend()
        save(figure, "latency_vs_rate")

    llm = [s for s in by_rate if s["llm"] and s["llm"]["ttft_ms"]]
    if llm:
        figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 4))
        xs = [x_rate(s) for s in llm]
        for q in ("p50", "p99"):
            left.plot(xs, [s["llm"]["ttft_ms"][q] for s in llm], marker="o", label=f"TTFT {q}")
            right.plot(xs, [(s["llm"]["itl_ms"] or {}).get(q) for s in llm], marker="o", label=f"ITL {q}")
        left.set(xlabel="rate (req/s)", ylabel="ms", title="Time to first token vs rate")
        right.set(xlabel="rate (req/s)", ylabel="ms", title="Inter-token latency vs rate")
        left.legend()
        right.legend()
        save(figure, "ttft_itl_vs_rate")

    if answered:
        by_concurrency = sorted(answered, key=lambda s: s["concurrency"])
        figure, axes = pyplot.subplots(figsize=(7, 4))
        axes.plot([s["concurrency"] for s in by_concurrency], [s["achieved_rate"] for s in by_concurrency], marker="o", label="req/s")
        axes.set(xlabel="concurrency (requests in flight, average)", ylabel="achieved req/s", title="Throughput vs concurrency")
        if any(s["llm"] for s in by_concurrency):
            tokens = axes.twinx()
            tokens.plot([s["concurrency"] for s in by_concurrency], [(s["llm"] or {}).get("output_tokens_per_s") for s in by_concurrency],
                        marker="s", color="tab:green", label="output tokens/s")
            tokens.set_ylabel("output tokens/s")
        save(figure, "throughput_vs_concurrency")

        by_throughput = sorted(answered, key=lambda s: s["achieved_rate"])
        figure, axes = pyplot.subplots(figsize=(7, 4))
        axes.plot([s["achieved_rate"] for s in by_throughput], [s["latency_ms"]["p99"] for s in by_throughput], marker="o", label="p99")
        axes.plot([s["achieved_rate"] for s in by_throughput], [s["latency_ms"]["p50"] for s in by_throughput], marker="o", label="p50")
        found = report["saturation"]
        if found and found["rate"] is not None:
            axes.axvline(found["rate"], color="green", linestyle=":", label="saturation")
        axes.set(xlabel="achieved req/s", ylabel="latency (ms)", title="The knee: latency vs throughput")
        axes.set_yscale("log")
        axes.legend()
        save(figure, "knee")

    if report["steps"]:
        figure, axes = pyplot.subplots(figsize=(7, 4))
        indices = [s["index"] for s in report["steps"]]
        axes.bar(indices, [100 * s["error_rate"] for s in report["steps"]], color="tab:red")
        axes.axhline(100 * report["settings"]["max_errors"], color="black", linestyle="--", label="--max-errors")
        axes.set(xlabel="step", ylabel="errors (%)", title="Errors per step")
        axes.legend()
        save(figure, "errors")

    seconds, samples = report["timeline"], report["service_samples"]
    if seconds:
        rows = 4 if samples else 3
        figure, axes = pyplot.subplots(rows, 1, figsize=(9, 2.2 * rows), sharex=True)
        ts = [row["t"] for row in seconds]
        axes[0].plot(ts, [row["due"] for row in seconds], label="sent (due) /s")
        axes[0].plot(ts, [row["ok"] for row in seconds], label="answered /s")
        axes[0].set_ylabel("req/s")
        axes[0].legend(loc="upper left")
        axes[1].plot(ts, [row["inflight"] for row in seconds], label="client")
        if samples:
            axes[1].plot([s["t"] for s in samples], [sum(i.get("inflight") or 0 for i in s["instances"].values()) for s in samples],
                         label="instances' proxies")
        axes[1].set_ylabel("in flight")
        axes[1].legend(loc="upper left")
        axes[2].plot(ts, [row["p99_ms"] for row in seconds], color="tab:purple")
        axes[2].set_ylabel("p99 (ms)")
        if samples:
            axes[3].step([s["t"] for s in samples], [s["ready"] for s in samples], where="post", color="tab:green")
            axes[3].set_ylabel("Ready instances")
        axes[-1].set_xlabel("seconds since the start")
        axes[0].set_title("Over time: rate, in flight, latency" + (", instances" if samples else ""))
        save(figure, "timeline")
    return paths
