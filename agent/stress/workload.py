"""The requests a stress run sends, round-robin: a warmup-format file (`--data`), synthetic
OpenAI completions of an exact size (`--openai`), a ShareGPT data set (`--sharegpt`), or a
plain GET of the target.

OpenAI requests are streamed completions with `ignore_eos` (the output is exactly
`max_tokens` long) and vLLM's per-chunk usage (`continuous_usage_stats`), so the generator
counts tokens exactly even when a chunk holds back a partial UTF-8 character. Prompts are
sized with the server's `/tokenize` where it has one (vLLM's), else estimated at one token a
word and the report says so.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from agent.stress.generator import Request
from bootstrap.errors import CommandFailed, UsageError

PADDING = (" a", " I", ".", ",", " 1", "a", "!")  # short pieces that top a prompt up, a token or so each
PROMPTS = 16  # distinct prompts (no two share a prefix), so a prefix cache does not flatter the run
SHAREGPT_SAMPLE = 256  # conversations drawn from a ShareGPT file
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


@dataclass
class Workload:
    requests: list[Request]
    description: str
    llm: dict | None = None  # model, sizes and how they were sized (report.json)


def plain(path: str) -> Workload:
    return Workload([Request(path)], f"GET {path or '/'}")


def from_file(path: Path) -> Workload:
    from bootstrap.warmup import WarmupError, load_file

    try:
        lines = load_file(path)
    except WarmupError as exc:
        raise UsageError(f"--data: {exc}") from None
    requests = [Request(line.path, line.method, tuple(line.headers.items()), line.body, line.expect_status) for line in lines]
    return Workload(requests, f"{len(requests)} request(s) from {path}, round-robin")


class _Server:
    """The OpenAI-compatible server's own endpoints: models and /tokenize."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.base = base.rstrip("/")
        self.headers = headers
        self.has_tokenize = True

    def call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.base + path, data, method=method,
                                         headers={**self.headers, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def model(self) -> str:
        try:
            models = self.call("GET", "/v1/models").get("data") or []
        except (OSError, ValueError) as exc:
            raise CommandFailed(f"cannot list the models at {self.base}/v1/models ({exc}); give --model NAME") from None
        if not models:
            raise CommandFailed(f"{self.base}/v1/models lists no model; give --model NAME")
        return models[0]["id"]

    def count(self, model: str, text: str, special: bool = True) -> int | None:
        """Tokens in `text` by the server's tokenizer (None: no /tokenize here)."""
        if not self.has_tokenize:
            return None
        try:
            return self.call("POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": special})["count"]
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 405, 501):
                self.has_tokenize = False
                return None
            raise CommandFailed(f"{self.base}/tokenize answered {exc.code}: {exc.read()[:200]!r}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise CommandFailed(f"{self.base}/tokenize failed: {exc}") from None


def _completion(model: str, prompt: str, output_tokens: int) -> Request:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return Request("/v1/completions", "POST", (("Content-Type", "application/json"),), json.dumps(body).encode(), stream=True)


def _sized_prompt(server: _Server, model: str, tokens: int, rng: random.Random) -> tuple[str, int | None]:
    """A prompt of random words with exactly `tokens` tokens where the server can count them
    (the closest below otherwise), and that count (None: estimated, no /tokenize).

    Every word is at least one token: the longest run of the first n words that fits is
    found by bisection, then short pieces are added one at a time while they still fit."""
    words = [rng.choice(WORDS) for _ in range(tokens)]

    def count(n: int) -> int | None:
        return server.count(model, " ".join(words[:n]))

    total = count(tokens)
    if total is None:
        return " ".join(words), None
    low, high = (tokens, tokens) if total <= tokens else (0, tokens)
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) <= tokens:
            low = middle
        else:
            high = middle
    prompt = " ".join(words[:low])
    size = server.count(model, prompt)
    for _ in range(4 * (tokens - size) + 8):
        if size >= tokens:
            break
        for piece in PADDING:
            grown = server.count(model, prompt + piece)
            if grown <= tokens:
                prompt, size = prompt + piece, grown
                break
        else:
            break
    return prompt, size


def openai(base: str, headers: dict[str, str], model: str | None, input_tokens: int, output_tokens: int) -> Workload:
    server = _Server(base, headers)
    model = model or server.model()
    rng = random.Random(0)
    prompts = [_sized_prompt(server, model, input_tokens, rng) for _ in range(PROMPTS)]
    counts = [count for _, count in prompts if count is not None]
    sizing = (f"exactly {input_tokens} tokens by the server's /tokenize" if counts and all(c == input_tokens for c in counts)
              else f"{min(counts)}-{max(counts)} tokens by the server's /tokenize (closest to {input_tokens})" if counts
              else f"about {input_tokens} tokens (one a word: the server has no /tokenize)")
    requests = [_completion(model, prompt, output_tokens) for prompt, _ in prompts]
    return Workload(requests, f"OpenAI completions, model {model}: prompts {sizing}, {output_tokens} output tokens (ignore_eos), streamed",
                    {"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens, "prompt_sizing": sizing})


def sharegpt(path: Path, base: str, headers: dict[str, str], model: str | None, output_tokens: int) -> Workload:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"--sharegpt {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--sharegpt {path}: not JSON ({exc}); a ShareGPT file is a JSON list of "
                         "{\"conversations\": [{\"from\": \"human\", \"value\": ...}, {\"from\": \"gpt\", \"value\": ...}]}") from None
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in data if isinstance(c, dict)
             and isinstance(c.get("conversations"), list) and len(c["conversations"]) >= 2
             and all(isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in c["conversations"][:2])]
    if not pairs:
        raise UsageError(f"--sharegpt {path}: no conversation with a prompt and a reply (\"conversations\": [{{\"value\": ...}}, {{\"value\": ...}}])")
    random.Random(0).shuffle(pairs)
    server = _Server(base, headers)
    model = model or server.model()
    requests = []
    for prompt, reply in pairs[:SHAREGPT_SAMPLE]:
        reply_tokens = server.count(model, reply, special=False)
        requests.append(_completion(model, prompt, max(1, reply_tokens if reply_tokens is not None else output_tokens)))
    how = "the replies' lengths by /tokenize" if server.has_tokenize else f"{output_tokens} output tokens each (no /tokenize)"
    return Workload(requests, f"{len(requests)} ShareGPT prompts from {path}, model {model}, {how}, streamed",
                    {"model": model, "sharegpt": str(path), "conversations": len(requests), "output_sizing": how})
