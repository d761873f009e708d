"""Each handler of the proxy's chain alone, on a real port, with a trivial next handler."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp

from serving.http import Request, Response
from serving.metrics import Metrics
from serving.proxy import Auth, Drain, Limits, ProxyConfig, Timeout, start_server
from serving.server import ServerLimits
from serving.state import BootState, State
from tests.harness.parts import free_port


async def _ok(request: Request) -> Response:
    query = parse_qs(urlsplit(request.target).query)
    await asyncio.sleep(float(query.get("sleep", ["0"])[0]))
    return Response(200, b"ok")


def _serve(make_chain, exchange):
    """Serve `make_chain(state, metrics)` on a free port and run `exchange(url, state)` against it."""

    async def main():
        state = BootState()
        metrics = Metrics(state)
        port = free_port()
        server, listener = await start_server(make_chain(state, metrics), "127.0.0.1", port, ServerLimits(header_timeout=0.3))
        try:
            async with aiohttp.ClientSession() as session:
                return await exchange(session, f"http://127.0.0.1:{port}", state)
        finally:
            listener.close()
            await server.shutdown(0.5)

    return asyncio.run(main())


def test_drain_gates_by_state():
    async def exchange(session, url, state):
        codes = []
        for set_state in (State.LAUNCHING, State.READY, State.DRAINING):
            state.set(set_state)
            async with session.get(url) as response:
                codes.append(response.status)
        state.refusing = True
        async with session.get(url) as response:
            codes.append((response.status, response.headers.get("Connection")))
        return codes

    codes = _serve(lambda state, metrics: Drain(state, ProxyConfig(upstream_port=1), metrics, _ok), exchange)
    assert codes == [503, 200, 200, (503, "close")]


def test_drain_counts_in_flight_and_wakes_every_wait_for_zero():
    async def exchange(session, url, state):
        state.set(State.READY)
        await state.inflight.wait_idle()  # nothing in flight: at once
        slow = asyncio.ensure_future(session.get(url + "/?sleep=0.4"))
        while state.inflight.count == 0:
            await asyncio.sleep(0.01)
        with_deadline = asyncio.ensure_future(asyncio.wait_for(state.inflight.wait_idle(), 0.1))
        patient = asyncio.ensure_future(state.inflight.wait_idle())
        try:
            await with_deadline
            return "the short wait ended with a request in flight"
        except asyncio.TimeoutError:
            pass
        started = time.monotonic()
        await asyncio.wait_for(patient, 5)  # still woken although the other wait was cancelled
        waited = time.monotonic() - started
        status = (await slow).status
        return status, state.inflight.count, waited > 0.1

    outcome = _serve(lambda state, metrics: Drain(state, ProxyConfig(upstream_port=1), metrics, _ok), exchange)
    assert outcome == (200, 0, True)


def test_timeout_answers_504():
    async def exchange(session, url, state):
        async with session.get(url + "/?sleep=0.5") as slow, session.get(url + "/?sleep=0") as fast:
            return slow.status, fast.status

    assert _serve(lambda state, metrics: Timeout(0.2, _ok), exchange) == (504, 200)


def test_limits_count_body_bytes_and_queue():
    async def exchange(session, url, state):
        first = asyncio.ensure_future(session.get(url + "/?sleep=0.3"))
        await asyncio.sleep(0.1)
        async with session.get(url) as refused:
            queue = refused.status, (await first).status
        async with session.post(url, data=b"x" * 11) as big, session.post(url, data=b"x" * 10) as fits:
            return queue, (big.status, fits.status)

    config = ProxyConfig(upstream_port=1, max_body=10, concurrency=1, queue=0)
    assert _serve(lambda state, metrics: Limits(config, state, _ok), exchange) == ((503, 200), (413, 200))


def test_auth_accepts_the_token_plain_or_bearer():
    async def exchange(session, url, state):
        codes = []
        for header in (None, "nope", "s3cret", "Bearer s3cret", "bearer s3cret"):
            async with session.get(url, headers={"Authorization": header} if header else {}) as response:
                codes.append(response.status)
        return codes

    assert _serve(lambda state, metrics: Auth("s3cret", _ok), exchange) == [401, 401, 200, 200, 200]


def test_a_connection_that_sends_no_request_head_is_closed():
    async def exchange(session, url, state):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: slow")  # never finished
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 3)
        return data, time.monotonic() - started

    data, waited = _serve(lambda state, metrics: _ok, exchange)
    assert data == b"" and waited < 1.5
