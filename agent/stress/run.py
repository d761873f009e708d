"""`berth stress`: resolve the target, build the workload, run the mode's steps, write the report."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from agent.stress import search as searching
from agent.stress import service, slo, stats, workload
from agent.stress.generator import Generator, Load, Run
from bootstrap.errors import EXIT_FAILED, CommandFailed, UsageError

CALIBRATION_S = 5  # one request at a time, to measure the start rate
SAMPLED_PER_STEP = 200  # requests kept per step in report.json
SAMPLED_ERRORS_PER_STEP = 20


def main(args: argparse.Namespace) -> int:
    llm = bool(args.openai or args.sharegpt)
    bounds = slo.parse(args.slo, llm)
    values = _check(args)
    target = service.resolve(args.target, args.agent, args.state_dir)
    headers = dict(args.header or [])
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    load_from = _workload(args, target, headers)
    requests = [replace(r, headers=tuple({**dict(r.headers), **headers}.items())) for r in load_from.requests]

    try:
        from agent.stress.console import Screen
    except ImportError as exc:
        raise UsageError(f"berth stress needs rich and matplotlib ({exc}): pip install 'berth[stress]'") from None

    screen = Screen()
    # The generator's loop thread shares the GIL with this one (progress display, sampler): a
    # short switch interval keeps it from waiting 5 ms to send a request that is due.
    sys.setswitchinterval(0.0005)
    screen.say(f"berth stress: {target.route}\n  workload: {load_from.description}\n  mode {args.mode}, SLO {args.slo}, "
               f"errors at most {args.max_errors:g}%, {args.step:g} s steps, at most {args.duration:g} s in all")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    origin = time.perf_counter()
    deadline = time.monotonic() + args.duration
    sampler = service.Sampler(target, origin).start() if target.services else None
    steps: list[dict] = []
    timeline: list[dict] = []
    sampled: list[dict] = []
    rng = random.Random(args.seed)
    try:
        generator = Generator(requests, target.urls, workers=args.workers, timeout=args.timeout)
    except ValueError as exc:
        raise CommandFailed(f"cannot start the load generator: {exc}") from None

    def probe(kind: str, value: float) -> dict:
        seconds = args.step if kind != "calibration" else min(args.step, CALIBRATION_S)
        left = deadline - time.monotonic()
        if left < min(seconds, max(1.0, seconds / 2)):
            raise searching.OutOfTime
        seconds = min(seconds, left)
        load = (Load(rate=value, seconds=seconds, burstiness=args.burstiness, seed=args.seed + len(steps)) if kind == "rate"
                else Load(concurrency=int(value), seconds=seconds, seed=args.seed + len(steps)))
        started_s = time.perf_counter() - origin + 0.05
        label = f"step {len(steps)} {kind} {value:.4g}"
        interrupted = False
        with screen.step(label, seconds, lambda: generator.progress):
            try:
                run = generator.run(load)
            except KeyboardInterrupt:
                run, interrupted = generator.last, True
        end_s = time.perf_counter() - origin
        samples = sampler.between(started_s, end_s) if sampler else None
        step = stats.summarize(run, kind, value, started_s, samples, llm)
        step["index"] = len(steps)
        broken = slo.broken(step, bounds, args.max_errors / 100)
        step["slo"] = {"passed": not broken and bool(step["requests"]), "broken": broken}
        steps.append(step)
        timeline.extend(stats.timeline(run, started_s))
        sampled.extend(_sample(run, step["index"], started_s, rng))
        screen.step_done(step)
        if interrupted:
            raise KeyboardInterrupt
        return step

    search = searching.Search(probe)
    interrupted = False
    try:
        start = args.start_rate
        if args.mode in ("scan", "find") and (args.mode == "scan" or args.search == "rate") and start is None:
            calibration = probe("calibration", 1)
            if not calibration["ok"]:
                raise CommandFailed(f"the target failed one request at a time: {calibration['error_kinds'] or calibration['statuses']}")
            start = calibration["achieved_rate"]
        if args.mode == "scan":
            search.scan(start, args.growth, args.max_rate)
        elif args.mode in ("rate", "concurrency"):
            search.fixed(args.mode, values)
        elif args.search == "rate":
            search.find("rate", start, args.max_rate, args.precision)
        else:
            search.find("concurrency", 1, args.max_concurrency, args.precision)
    except searching.OutOfTime:
        search.limit = search.limit or "duration"
    except KeyboardInterrupt:
        interrupted = True
        screen.say("interrupted: writing the report of what ran")
    finally:
        if sampler:
            sampler.stop()
        generator.close()

    report = _report(args, target, load_from, bounds, steps, search, interrupted, timeline,
                     sampler.samples if sampler else [], sampled)
    from agent.stress import report as reporting

    verdict = reporting.verdict_lines(report)
    screen.final(report, verdict)
    if out:
        written = [reporting.write_json(out, report)]
        try:
            from agent.stress import charts

            pictures = charts.draw(out, report)
        except ImportError:
            pictures = []
            screen.say("charts skipped: matplotlib is not installed (pip install 'berth[stress]')")
        written.append(reporting.write_html(out, report, pictures))
        screen.say("wrote " + ", ".join(str(p) for p in written + pictures))
    return EXIT_FAILED if not steps else 0


def _check(args: argparse.Namespace) -> list[float]:
    """Mode-specific options; returns the fixed steps' values."""
    if args.mode == "rate":
        if not args.rate:
            raise UsageError("--mode rate needs --rate R[,R...] (requests per second)")
        return args.rate
    if args.mode == "concurrency":
        if not args.concurrency:
            raise UsageError("--mode concurrency needs --concurrency N[,N...]")
        return args.concurrency
    for name in ("rate", "concurrency"):
        if getattr(args, name):
            raise UsageError(f"--{name} is for --mode {name}; --mode {args.mode} chooses its own steps")
    if args.growth <= 1:
        raise UsageError("--growth must be more than 1 (e.g. 1.5)")
    if not 0 < args.precision < 1:
        raise UsageError("--precision is a fraction between 0 and 1 (e.g. 0.05)")
    return []


def _workload(args: argparse.Namespace, target: service.Target, headers: dict[str, str]) -> workload.Workload:
    if args.data:
        return workload.from_file(Path(args.data))
    if not (args.openai or args.sharegpt):
        return workload.plain(target.default_path)
    base = target.urls()[0]
    if args.sharegpt:
        return workload.sharegpt(Path(args.sharegpt), base, headers, args.model, args.output_tokens)
    return workload.openai(base, headers, args.model, args.input_tokens, args.output_tokens)


def _sample(run: Run, index: int, started_s: float, rng: random.Random) -> list[dict]:
    errors = [r for r in run.results if not r.ok][:SAMPLED_ERRORS_PER_STEP]
    answered = [r for r in run.results if r.ok]
    chosen = errors + rng.sample(answered, min(len(answered), SAMPLED_PER_STEP))
    return [{"step": index, "t": round(started_s + r.scheduled, 4), "latency_ms": round(r.latency * 1000, 3), "status": r.status,
             "ok": r.ok, "error": r.error, "lag_ms": round(r.lag * 1000, 3),
             "ttft_ms": round(r.ttft * 1000, 3) if r.ttft is not None else None, "tokens": r.tokens or None,
             "worker": r.worker} for r in chosen]


def _report(args, target, load_from, bounds, steps, search, interrupted, timeline, samples, sampled) -> dict:
    from agent.stress import report as reporting

    found = reporting.saturation(search)
    url_target = not target.services
    return {
        "berth": "stress", "version": 1, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": {"label": target.label, "kind": "url" if url_target else ("group" if target.services != [target.label] else "service"),
                   "route": target.route, "services": target.services},
        "workload": load_from.description, "llm": load_from.llm,
        "settings": {"mode": args.mode, "search": args.search if args.mode == "find" else None, "slo": args.slo,
                     "max_errors": args.max_errors / 100, "step_s": args.step, "growth": args.growth, "start_rate": args.start_rate,
                     "max_rate": None if math.isinf(args.max_rate) else args.max_rate, "precision": args.precision,
                     "burstiness": "even" if math.isinf(args.burstiness) else args.burstiness, "duration_s": args.duration,
                     "workers": args.workers, "timeout_s": args.timeout, "rates": args.rate, "concurrencies": args.concurrency},
        "slo": [{"name": b.name, "limit_ms": b.limit_ms, "strict": b.strict} for b in bounds],
        "steps": steps, "saturation": found, "autoscaler": reporting.autoscaler(found, url_target), "interrupted": interrupted,
        "timeline": timeline, "service_samples": samples, "requests": sampled,
    }
