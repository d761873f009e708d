"""`berth stress TARGET`: registered with the other client commands; imports nothing heavy."""

from __future__ import annotations

import argparse
import math
import re
import signal

from bootstrap.errors import UsageError

DESCRIPTION = """\
Find where a service saturates: send load in steps, measure each, stop when the SLO breaks.

TARGET is a service or group name (sent through the node gateway; the agent is found as
`berth deploy` finds it) or a URL (no service-side data, so no per-instance figure).

Load is open loop by default: arrivals on a schedule (Poisson; --burstiness as vLLM's bench),
latency counted from the scheduled send, so queueing shows. --mode concurrency is closed
loop. An error is a non-2xx answer (or not the --data line's expect_status), a transport
error or a timeout.

Modes:
  scan         (default) from --start-rate (default: the rate of one request at a time,
               measured) up by --growth every --step seconds until the SLO breaks, errors
               exceed --max-errors, or --max-rate
  rate         fixed steps: --rate 10,20,40
  concurrency  fixed closed-loop steps: --concurrency 1,4,16
  find         the highest rate (--search rate) or concurrency (--search concurrency) that
               meets the SLO: doubling, then bisection; each verdict from two agreeing trials

The verdict names the saturation (per Ready instance for a service), the first failing
point and the limit that broke, and the EAS autoscaler strategy it implies:
{"metricName": "concurrency", "threshold": 70% of the saturating per-instance concurrency}.
--out DIR writes report.json, report.html (opens offline) and PNG charts. Ctrl-C stops the
run and still writes the report of what ran.

Examples:
  berth stress http://127.0.0.1:8000/predict --slo "p99<=500ms" --out /tmp/stress
  berth stress qwen-chat --openai --input-tokens 1024 --output-tokens 128 \\
      --mode find --slo "ttft_p99<=2s,itl_p99<=50ms" --out /tmp/qwen
"""


def _list(kind: type):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 10,20,40") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, e.g. 10,20,40")
        return values
    return parse


def _seconds(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration such as 600, 90s or 10m")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
        return value
    return parse


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME: VALUE")
    return name.strip(), value.strip()


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stress", help="find a service's saturation point and the autoscaler setting it implies",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", metavar="TARGET", help="a service or group name, or an http(s):// URL")
    where = parser.add_argument_group("the agent (for a service or group name)")
    where.add_argument("--agent", metavar="URL", help="the agent (default $BERTH_AGENT_URL, else http://127.0.0.1:7070)")
    where.add_argument("--state-dir", metavar="DIR", help="the agent's state directory, whose token file is read when "
                       "BERTH_TOKEN is not set (default $BERTH_STATE_DIR, else /var/lib/berth)")
    what = parser.add_argument_group("requests (default: GET the target)")
    kinds = what.add_mutually_exclusive_group()
    kinds.add_argument("--data", metavar="FILE", help="JSON lines in the warmup format (method, path, headers, body, "
                       "body_file, expect_status), sent round-robin; repeat and concurrency are ignored")
    kinds.add_argument("--openai", action="store_true", help="streamed OpenAI completions of --input-tokens and "
                       "--output-tokens (ignore_eos); time to first token, inter-token latency, TPOT")
    kinds.add_argument("--sharegpt", metavar="FILE", help="prompts and reply lengths from a ShareGPT-format JSON file")
    what.add_argument("--model", help="the model to ask for (default: the first of the server's /v1/models)")
    what.add_argument("--input-tokens", type=_positive(int), default=1024, metavar="N",
                      help="prompt length, sized with the server's /tokenize where it has one (1024)")
    what.add_argument("--output-tokens", type=_positive(int), default=128, metavar="M", help="tokens to generate (128)")
    what.add_argument("--token", help="the service's token, sent as Authorization: Bearer (through the gateway)")
    what.add_argument("--header", type=_header, action="append", metavar="'NAME: VALUE'", help="an extra header (repeatable)")
    how = parser.add_argument_group("load and modes")
    how.add_argument("--mode", choices=("scan", "rate", "concurrency", "find"), default="scan", help="(scan) see above")
    how.add_argument("--rate", type=_list(float), metavar="R[,R...]", help="--mode rate: requests per second of each step")
    how.add_argument("--concurrency", type=_list(int), metavar="N[,N...]", help="--mode concurrency: senders of each step")
    how.add_argument("--search", choices=("rate", "concurrency"), default="rate", help="--mode find: what to search (rate)")
    how.add_argument("--start-rate", type=_positive(float), metavar="R", help="scan and find: the first rate (default: the "
                     "rate of one request at a time, measured for 5 s)")
    how.add_argument("--growth", type=float, default=1.5, metavar="X", help="scan: each step's rate is X times the last (1.5)")
    how.add_argument("--step", type=_seconds, default=20.0, metavar="S", help="seconds per step (20)")
    how.add_argument("--max-rate", type=_positive(float), default=math.inf, metavar="R", help="never offer more (unbounded)")
    how.add_argument("--max-concurrency", type=_positive(int), default=1024, metavar="N", help="find --search concurrency: "
                     "never more (1024)")
    how.add_argument("--precision", type=float, default=0.05, metavar="F", help="find: stop bisecting when the bracket is "
                     "within this fraction of its top (0.05)")
    how.add_argument("--burstiness", type=float, default=1.0, metavar="B", help="gamma shape of the arrivals: 1 Poisson (default), "
                     "below 1 burstier, 'inf' evenly spaced")
    how.add_argument("--duration", type=_seconds, default=600.0, metavar="S", help="the whole run's limit, e.g. 600 or 10m (10m)")
    how.add_argument("--timeout", type=_positive(float), default=60.0, metavar="S", help="a request slower than this, from its "
                     "scheduled send, is an error (60)")
    how.add_argument("--workers", type=_positive(int), default=1, metavar="N", help="generator processes (1); the report says "
                     "when the generator itself was the limit")
    how.add_argument("--seed", type=int, default=0, help="seed of the arrivals and samples (0)")
    judge = parser.add_argument_group("the verdict")
    judge.add_argument("--slo", default="p99<=1s", help="limits all steps must meet, comma-separated: p50|p90|p99 and, with "
                       "--openai, ttft_p99, itl_p99, e2e_p99 (also _p50, _p90); e.g. \"p99<=500ms\" (p99<=1s)")
    judge.add_argument("--max-errors", type=float, default=0.1, metavar="PCT", help="percent of requests that may fail (0.1)")
    judge.add_argument("--out", metavar="DIR", help="write report.json, report.html and PNG charts here")
    parser.set_defaults(handler=run_stress)


def run_stress(args: argparse.Namespace) -> int:
    if args.max_errors < 0 or args.max_errors > 100:
        raise UsageError("--max-errors is a percent between 0 and 100 (e.g. 0.1)")
    if args.burstiness <= 0:
        raise UsageError("--burstiness must be more than 0 (1 is Poisson; inf is evenly spaced)")
    from agent.stress.run import main

    # Ctrl-C (or kill -INT) stops the run and writes the report of what ran, even where the
    # shell started this process with SIGINT ignored (a background job without job control).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main(args)
