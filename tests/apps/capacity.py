"""A service with a known capacity: each request takes a fixed time, a fixed number at a time,
the rest wait their turn (as an engine's batch slots would). 50 ms and 4 at a time: 80 req/s.

    python -m tests.apps.capacity --port 8000 [--service-ms 50] [--concurrency 4]

ANY /...   200 "done" after waiting for a slot and then the service time
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    async def serve() -> None:
        slots = asyncio.Semaphore(args.concurrency)

        async def handle(_: web.Request) -> web.Response:
            async with slots:
                await asyncio.sleep(args.service_ms / 1000)
            return web.Response(text="done")

        server = web.Server(handle, access_log=None)
        await asyncio.get_running_loop().create_server(server, args.host, args.port, backlog=4096)
        print(f"capacity app listening on {args.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
