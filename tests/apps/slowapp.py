"""A small service for the bootstrap's tests: slow start, streaming, slow and crash endpoints.

    python -m tests.apps.slowapp --port 8000 [--start-delay S] [--start-exit CODE] [--on-term die|ignore|exit]
                                 [--workers N]

--workers N forks N idle worker processes in its own process group (as nginx or vLLM's engine
core do), for the tests that the whole tree dies with berth boot.

GET /                 200 "ok"
GET /warm             counts warmup requests and their peak concurrency (each takes 50 ms)
GET /counters         {"warm": n, "warm_peak": k}
GET /stream?n=&gap=   Server-Sent Events: n events, `gap` seconds apart, each carrying the time it was written
GET /slow?s=          answers after s seconds; counts requests abandoned by the client
GET|POST /crash?code= exits at once with that code
ANY /echo             the request as JSON: method, path, headers, body length
GET /arm-close        200; the next request on the same connection gets the connection closed, unanswered
GET /orphan           leaves a grandchild that outlives its parent (for the reaping test); returns its pid
GET /ws               WebSocket echo
GET /whoami           this instance's port (which instance answered, through a gateway)
GET /status?code=     answers with that status code (the app's own, e.g. 503)
POST /v1/chat/completions  an OpenAI chat completion ("stream": true: chunk by chunk, as SSE)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from aiohttp import WSMsgType, web

counters = {"warm": 0, "warm_peak": 0, "warm_now": 0, "slow_started": 0, "slow_abandoned": 0}
armed: set = set()


async def root(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def warm(_: web.Request) -> web.Response:
    counters["warm"] += 1
    counters["warm_now"] += 1
    counters["warm_peak"] = max(counters["warm_peak"], counters["warm_now"])
    await asyncio.sleep(0.05)
    counters["warm_now"] -= 1
    return web.Response(text="warm")


async def counter_values(_: web.Request) -> web.Response:
    return web.json_response(counters)


async def stream(request: web.Request) -> web.StreamResponse:
    events, gap = int(request.query.get("n", "5")), float(request.query.get("gap", "0.1"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for index in range(events):
        await response.write(f"data: {index} {time.time():.6f}\n\n".encode())
        if index < events - 1:
            await asyncio.sleep(gap)
    await response.write(b"data: [DONE]\n\n")
    return response


async def slow(request: web.Request) -> web.Response:
    counters["slow_started"] += 1
    deadline = time.monotonic() + float(request.query.get("s", "1"))
    while time.monotonic() < deadline:
        if request.transport is None or request.transport.is_closing():
            counters["slow_abandoned"] += 1  # the client (the proxy) dropped the request
            raise asyncio.CancelledError()
        await asyncio.sleep(0.02)
    return web.Response(text="slow done")


async def status(request: web.Request) -> web.Response:
    code = int(request.query.get("code", "200"))
    return web.Response(status=code, text=f"the app's own {code}")


async def chat_completion(request: web.Request) -> web.StreamResponse:
    """What the official OpenAI client expects of /v1/chat/completions, answering 'hello from berth'."""
    asked = await request.json()
    head = {"id": "chatcmpl-slowapp", "created": int(time.time()), "model": asked.get("model", "slowapp")}
    words = ["hello", " from", " berth"]
    if not asked.get("stream"):
        return web.json_response({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1 + len(words)}})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index, word in enumerate(words):
        finish = "stop" if index == len(words) - 1 else None
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": finish}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.05)
    await response.write(b"data: [DONE]\n\n")
    return response


async def crash(request: web.Request) -> web.Response:
    sys.stdout.flush()
    os._exit(int(request.query.get("code", "3")))


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method, "path": request.path_qs, "headers": dict(request.headers), "body_length": len(body),
    })


async def arm_close(request: web.Request) -> web.Response:
    armed.add(request.transport)
    return web.Response(text="armed")


async def orphan(_: web.Request) -> web.Response:
    # sh backgrounds a sleep and exits: the sleep is re-parented to the nearest subreaper.
    out = subprocess.run(["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    return web.Response(text=out.stdout.strip())


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str("echo: " + message.data)
    return ws


@web.middleware
async def close_armed(request: web.Request, handler):
    # What a server that closed an idle keep-alive connection looks like to the client that
    # just sent on it: the request is read, and the connection closes without an answer.
    if request.transport in armed and request.path != "/arm-close":
        armed.discard(request.transport)
        request.transport.close()
        raise asyncio.CancelledError()
    return await handler(request)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--start-exit", type=int, default=None)
    parser.add_argument("--on-term", choices=("die", "ignore", "exit"), default="die")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    print(f"slowapp starting (pid {os.getpid()})", flush=True)
    workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"]) for _ in range(args.workers)]
    if workers:
        print(f"slowapp workers: {' '.join(str(worker.pid) for worker in workers)}", flush=True)
    time.sleep(args.start_delay)
    if args.start_exit is not None:
        print("slowapp: cannot load the model: weights.bin is missing", file=sys.stderr, flush=True)
        sys.exit(args.start_exit)
    app = web.Application(middlewares=[close_armed])

    async def whoami(_: web.Request) -> web.Response:
        return web.Response(text=str(args.port))

    app.router.add_get("/whoami", whoami)
    for path, handler in (("/", root), ("/warm", warm), ("/counters", counter_values), ("/stream", stream), ("/slow", slow),
                          ("/crash", crash), ("/arm-close", arm_close), ("/orphan", orphan), ("/ws", websocket), ("/status", status)):
        app.router.add_get(path, handler)
    app.router.add_post("/v1/chat/completions", chat_completion)
    app.router.add_post("/crash", crash)
    app.router.add_route("*", "/echo", echo)

    async def serve() -> None:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print(f"slowapp listening on {args.port}", flush=True)
        stopped = asyncio.Event()
        if args.on_term == "ignore":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif args.on_term == "exit":
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            asyncio.get_running_loop().add_signal_handler(sig, lambda s=sig: print(f"slowapp got {signal.Signals(s).name}", flush=True))
        await stopped.wait()
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
