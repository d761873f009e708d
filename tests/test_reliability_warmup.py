"""The built-in vLLM warmup never fails a healthy engine: prompts sized in tokens, a refused
built-in request skipped with a warning; a user's warmup file stays strict."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from bootstrap import warmup
from serving import vllm
from tests.harness.parts import free_port, port_open, wait_until


def _prompt_words(entry: dict) -> int:
    body = entry["body"]
    return len((body.get("prompt") or body["messages"][0]["content"]).split())


@pytest.mark.parametrize("tokens_per_word", [1.0, 2.5, 5.0])
def test_builtin_prompts_fit_a_256_token_context_whatever_the_tokenizer_makes_of_a_word(tokens_per_word):
    profile = vllm.warmup_profile("tiny", 256, tokens_per_word)
    longest = max(_prompt_words(entry) for entry in profile) * tokens_per_word
    assert longest + vllm.WARMUP_MAX_TOKENS + vllm.TEMPLATE_MARGIN_TOKENS <= 256
    assert len({_prompt_words(entry) for entry in profile}) >= 2  # still short and long prompts


def test_builtin_warmup_skips_a_refused_request_and_a_users_file_stays_strict(tmp_path):
    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "tests.apps.slowapp", "--port", str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "slowapp")
        lines = ['{"path": "/no-such-page", "expect_status": 200}', '{"path": "/warm", "repeat": 2}']
        builtin = warmup.parse_lines(lines, "profile", builtin=True)
        results = asyncio.run(warmup.replay(builtin, f"http://127.0.0.1:{port}"))
        assert results[0] == {"request": "GET /no-such-page", "skipped": "status 404"}
        assert results[1]["repeat"] == 2  # the next request still ran
        with pytest.raises(warmup.WarmupError, match="status 404"):
            asyncio.run(warmup.replay(warmup.parse_lines(lines, "warmup.jsonl"), f"http://127.0.0.1:{port}"))
    finally:
        app.kill()
        app.wait()
