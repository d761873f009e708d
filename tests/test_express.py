"""berth boot's express lane (serving/express.py) against its chain, on real sockets: the
same bytes reach the app and come back either way, and every case the lane hands over (a
streamed or split answer, the keep-alive race, a timeout, a client gone, an invalid answer,
draining) ends as the chain alone would end it."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from serving import express as lane_module
from serving.express import PYTHON_SCANS
from serving.metrics import Metrics
from serving.proxy import Express, ProxyConfig, build_chain, start_server, upstream_pool
from serving.state import BootState, State
from tests.harness.parts import unavailable


def compiled_scans():
    """The C scans (serving/_express.c): missing is a failure in CI, a skip elsewhere."""
    try:
        from serving import _express
    except ImportError as exc:
        unavailable("serving._express (the lane's scans in C, built by pip install where gcc is)", str(exc))
    return _express.scan_request, _express.read_answer


@pytest.fixture(autouse=True, params=["c", "python"])
def scans(request, monkeypatch):
    """Every test here runs on both forms of the lane's scans: C (serving/_express.c) and the
    Python fallback (serving/express.py)."""
    chosen = compiled_scans() if request.param == "c" else PYTHON_SCANS
    monkeypatch.setattr(lane_module, "scan_request", chosen[0])
    monkeypatch.setattr(lane_module, "read_answer", chosen[1])
    return chosen


PLAIN = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
BIG = b"y" * 100_000


class App:
    """A scripted upstream that keeps every request it receives, raw."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.closed = 0
        self.dropped: set[bytes] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                path = head.split(b" ")[1].split(b"?")[0]
                if path == b"/drop" and path + head.split(b" ")[0] not in self.dropped:
                    self.dropped.add(path + head.split(b" ")[0])
                    return  # the keep-alive race: closed with no answer
                if path == b"/never":
                    await reader.read()
                    return
                if path == b"/slow":
                    await asyncio.sleep(0.2)
                if path == b"/split":
                    writer.write(PLAIN[:-5])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(PLAIN[-5:])
                elif path == b"/chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                elif path == b"/big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BIG), BIG))
                elif path == b"/bad":
                    writer.write(b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 2\r\n\r\nok")
                else:
                    writer.write(PLAIN)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def _counting(lane):
    """`lane`, counting in `lane.taken` the requests its take() accepts."""
    take, lane.taken = lane.take, 0

    def counted(exchange):
        plan = take(exchange)
        lane.taken += plan is not None
        return plan

    lane.take = counted
    return lane


async def _proxy(app_port: int, *, lane: bool, state: State = State.READY, **config):
    boot = BootState()
    boot.set(state)
    proxy = ProxyConfig(upstream_port=app_port, **config)
    metrics = Metrics(boot)
    pool = upstream_pool(proxy)
    express = _counting(Express(boot, proxy, metrics, pool)) if lane else None
    server, listener = await start_server(build_chain(boot, proxy, metrics, pool), "127.0.0.1", 0, proxy.server_limits, metrics, express)
    return server, listener, listener.sockets[0].getsockname()[1], express, metrics, boot


async def _ask(port: int, *requests: bytes, pause: float = 0.0) -> bytes:
    """Send each request on one connection (`pause` apart); what came back until the answers stop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for request in requests:
        writer.write(request)
        await asyncio.sleep(pause)
    data = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 0.15 if data else 5)
            if not chunk:
                break
            data += chunk
    except asyncio.TimeoutError:
        pass
    writer.close()
    return data


def _run(test, **config):
    async def main():
        app = App()
        listener = await asyncio.start_server(app.handle, "127.0.0.1", 0)
        try:
            return await test(app, listener.sockets[0].getsockname()[1], **config)
        finally:
            listener.close()

    return asyncio.run(main())


def _parsed(request: bytes) -> tuple:
    head, _, body = request.partition(b"\r\n\r\n")
    line, *headers = head.split(b"\r\n")
    return line, [(name.lower(), value.strip()) for name, _, value in (h.partition(b":") for h in headers)], body


WARM = b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n"  # opens the pool's first connection (the lane only reuses one)
CASES = [
    b"GET /plain?x=1&y=%20 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: svc:8080\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}",
    b"POST /empty HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n",
    b"DELETE /plain HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: outer\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nhost:svc\r\nX-Spaced:   a b  \r\nauthorization: Bearer tok\r\n\r\n",
    b"PUT /plain HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 10.0.0.1, 10.0.0.2\r\nContent-Length: 3\r\n\r\nabc",
]


@pytest.mark.parametrize("token", [None, "tok"])
def test_the_lane_sends_and_answers_what_the_chain_does(token):
    cases = CASES if token is None else [
        case if b"uthorization" in case else case.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer tok\r\n\r\n", 1) for case in CASES]

    async def test(app, app_port):
        seen = {}
        for lane in (False, True):
            server, listener, port, express, _, _ = await _proxy(app_port, lane=lane, token=token)
            try:
                await _ask(port, WARM.replace(b"\r\n\r\n", b"\r\nAuthorization: tok\r\n\r\n"))
                app.requests.clear()
                answers = [await _ask(port, WARM.replace(b"\r\n\r\n", b"\r\nAuthorization: tok\r\n\r\n"), case, pause=0.05)
                           for case in cases]
                seen[lane] = (answers, [_parsed(request) for request in app.requests])
                if lane:
                    # every one (the warm-up too, which found no idle connection and went to the chain)
                    assert express.taken == 2 * len(CASES) + 1
            finally:
                listener.close()
                await server.shutdown(0.5)
        chain, lane = seen[False], seen[True]
        assert lane[1] == chain[1]  # the app saw the same requests
        assert lane[0] == chain[0]  # the clients the same answers
        assert all(answer.count(b"HTTP/1.1 200 OK") == 2 for answer in lane[0]), lane[0]
        if token is None:
            assert any(pair == (b"authorization", b"Bearer tok") for pair in lane[1][9][1])
        else:
            assert not any(name == b"authorization" for _, headers, _ in lane[1] for name, _ in headers)

    _run(test)


def _get(path: str, method: str = "GET", body: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if method == "POST" else b""
    return b"%s %s HTTP/1.1\r\nHost: svc\r\n%s\r\n%s" % (method.encode(), path.encode(), length, body)


def _lane_case(check, **config):
    """Run `check(app, port, express, metrics, boot)` against a lane-served proxy with a warm pool."""

    async def test(app, app_port):
        server, listener, port, express, metrics, boot = await _proxy(app_port, lane=True, **config)
        try:
            await _ask(port, WARM)
            app.requests.clear()
            await check(app, port, express, metrics, boot)
        finally:
            listener.close()
            await server.shutdown(0.5)

    _run(test)


def test_answers_the_lane_does_not_pass_whole_go_through_the_chain():
    async def check(app, port, express, metrics, boot):
        split = await _ask(port, _get("/split"))
        assert split.endswith(b"\r\n\r\nok") and b"Content-Length: 2" in split
        chunked = await _ask(port, _get("/chunked"))
        assert chunked.endswith(b"chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"), chunked  # the chain streams it as it comes
        big = await _ask(port, _get("/big"))
        assert big.endswith(BIG) and b"Content-Length: 100000" in big
        bad = await _ask(port, _get("/bad"))
        assert bad.startswith(b"HTTP/1.1 502 "), bad  # llhttp refuses "Bad Name" in the lane's check and in the chain's parser
        assert express.taken == 5 and len(app.requests) == 4  # each sent once, by the lane (and the warm-up by the chain)
        assert metrics.by_status == {200: 4, 502: 1}  # the warm-up and three answers; the 502 counted once

    _lane_case(check)


def test_a_request_behind_one_on_the_lane_is_answered_after_it():
    async def check(app, port, express, metrics, boot):
        answers = await _ask(port, _get("/slow"), _get("/plain?second"), pause=0.05)
        assert answers.count(b"HTTP/1.1 200 OK") == 2
        assert [request.split(b" ")[1] for request in app.requests] == [b"/slow", b"/plain?second"]

    _lane_case(check)


def test_the_keep_alive_race_resends_only_what_the_chain_would():
    async def check(app, port, express, metrics, boot):
        resent = await _ask(port, _get("/drop"))
        assert resent.startswith(b"HTTP/1.1 200 OK"), resent  # a GET the app closed on unanswered: sent again
        assert [request.split(b" ")[1] for request in app.requests] == [b"/drop", b"/drop"]
        app.requests.clear()
        await _ask(port, _get("/plain"))  # a connection back in the pool for the POST
        posted = await _ask(port, _get("/drop", "POST", b"once"))
        assert posted.startswith(b"HTTP/1.1 502 "), posted  # a POST is never sent twice
        assert [request.split(b" ")[0] for request in app.requests] == [b"GET", b"POST"]

    _lane_case(check)


def test_the_request_timeout_answers_504_on_the_lane():
    async def check(app, port, express, metrics, boot):
        started = time.monotonic()
        answer = await _ask(port, _get("/never"))
        assert answer.startswith(b"HTTP/1.1 504 "), answer
        assert 0.3 <= time.monotonic() - started < 2
        assert express.taken == 2 and boot.inflight.count == 0  # (the warm-up's, and this one)

    _lane_case(check, request_timeout=0.3)


def test_a_client_gone_mid_request_drops_the_upstream_connection_and_counts_499():
    async def check(app, port, express, metrics, boot):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get("/never"))
        await asyncio.sleep(0.1)
        closed = app.closed
        assert boot.inflight.count == 1
        writer.close()
        await asyncio.sleep(0.2)
        assert app.closed == closed + 1  # the app saw its request's connection go
        assert boot.inflight.count == 0 and metrics.by_status.get(499) == 1

    _lane_case(check)


def test_draining_answers_close_the_connection():
    async def check(app, port, express, metrics, boot):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get("/slow"))
        await asyncio.sleep(0.05)
        boot.set(State.DRAINING)  # while it is under way: its client moves on, as Drain makes it
        answer = await reader.read(65536)
        assert express.taken == 2
        assert b"Connection: close" in answer
        assert await reader.read(65536) == b""
        writer.close()

    _lane_case(check)


@pytest.mark.parametrize("token", [None, "tok"])
def test_the_gateways_lane_sends_and_answers_what_its_chain_does(token):
    """`berth gateway`'s express form against its chain: paths cut to the instance's, the
    client's X-Forwarded-* replaced, the token checked; berth boot's refusal retried elsewhere."""
    from serving.gateway import Express as GatewayExpress
    from serving.gateway import Gateway, GatewayConfig
    from serving.server import Server

    cases = [case.replace(b" /", b" /api/predict/svc/", 1) for case in CASES] + [
        b"GET /api/predict/svc?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n", b"GET /api/predict/nobody/x HTTP/1.1\r\nHost: svc\r\n\r\n"]
    if token is not None:
        cases = [case if b"uthorization" in case else case.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer tok\r\n\r\n", 1)
                 for case in cases]

    async def test(app, app_port):
        seen = {}
        for lane in (False, True):
            gateway = Gateway(GatewayConfig())
            entry = {"instances": [{"id": "a", "url": f"http://127.0.0.1:{app_port}"}], **({"token": token} if token else {})}
            gateway.apply({"version": 1, "services": {"svc": entry}})
            express = _counting(GatewayExpress(gateway)) if lane else None
            server = Server(gateway, express=express)
            listener = await server.listen("127.0.0.1", 0)
            port = listener.sockets[0].getsockname()[1]
            warm = cases[0]
            try:
                await _ask(port, warm)
                app.requests.clear()
                answers = [await _ask(port, warm, case, pause=0.05) for case in cases]
                seen[lane] = ([re.sub(rb"Date: [^\r]*\r\n", b"", answer) for answer in answers], [_parsed(r) for r in app.requests])
                if lane:
                    stats = gateway.service_stats()["services"]["svc"]
                    assert stats["inflight"] == 0 and stats["requests_total"] == 2 * len(cases), stats  # (the warm-up, then two a case but "nobody")
                    assert express.taken == 2 * len(cases)  # each but "nobody" (the warm-up's found no idle connection)
            finally:
                listener.close()
                await server.shutdown(0.5)
        assert seen[True][1] == seen[False][1]
        assert seen[True][0] == seen[False][0]
        assert [_parsed(r)[0] for r in app.requests[1::2]][:3] == [b"GET /plain?x=1&y=%20 HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1",
                                                                    b"POST /empty HTTP/1.1"]
        assert all(dict(headers)[b"x-forwarded-for"] == b"127.0.0.1" for _, headers, _ in seen[True][1])  # a client's claim replaced

    _run(test)
