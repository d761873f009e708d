"""A stand-in for vLLM's OpenAI server where vLLM cannot run (no GPU): it records its command
line and when it started and became ready (JSON lines in FAKE_VLLM_LOG), takes FAKE_VLLM_DELAY
seconds to "load" before it listens, then answers every request 200 with a small JSON body.
Only on the test's PYTHONPATH; tests/test_gpu_share.py checks berth's serialized starts with it."""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def note(event: str) -> None:
    with open(os.environ["FAKE_VLLM_LOG"], "a") as log:
        log.write(json.dumps({"event": event, "at": time.time(), "argv": sys.argv[1:]}) + "\n")


class Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"choices": [{"text": "ok", "message": {"content": "ok"}}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    note("start")
    time.sleep(float(os.environ.get("FAKE_VLLM_DELAY", "2")))
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler)
    note("listening")
    server.serve_forever()


main()
