"""The proxy's upstream pool against a real socket server that answers in every HTTP/1.1 framing."""

from __future__ import annotations

import asyncio

import pytest

from serving.upstream import ClosedEarly, UpstreamPool

BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB

ANSWERS = {
    b"/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",  # HEAD: a length but no body
    b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG,
}


class Server:
    """Counts connections; `/close-delimited` answers without a length and closes;
    `/drop-next` makes it close the connection on the next request without answering."""

    def __init__(self) -> None:
        self.connections = 0
        self.drop_next = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if self.drop_next:
                    self.drop_next = False
                    return  # the keep-alive race: closed before any answer
                if target == b"/close-delimited":
                    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 70000)
                    await writer.drain()
                    return
                if target == b"/arm-drop":
                    self.drop_next = True
                    target = b"/length"
                writer.write(ANSWERS[target])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _with_server(test) -> None:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = UpstreamPool("127.0.0.1", port, idle_timeout=0.5)
    try:
        await test(pool, server)
    finally:
        await pool.close()
        listener.close()


async def fetch(pool: UpstreamPool, target: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    response = await pool.request(method, target, [(b"Host", b"t")], body)
    body = await response.read()
    response.release()
    return response.status, body


def run(test) -> None:
    asyncio.run(_with_server(test))


def test_every_framing_is_read_whole_and_the_connection_reused():
    async def test(pool: UpstreamPool, server: Server) -> None:
        assert await fetch(pool, "/length") == (200, b"hello")
        assert await fetch(pool, "/head", "HEAD") == (200, b"")  # no body follows a HEAD's length
        assert await fetch(pool, "/chunked") == (200, b"abcdefg")
        assert await fetch(pool, "/big") == (200, BIG)
        assert server.connections == 1  # all four on one keep-alive connection
        assert await fetch(pool, "/close-delimited") == (200, b"x" * 70000)
        assert await fetch(pool, "/length") == (200, b"hello")
        assert server.connections == 2  # a close-delimited answer cannot be reused

    run(test)


def test_idle_connections_past_the_idle_timeout_are_not_reused():
    async def test(pool: UpstreamPool, server: Server) -> None:
        await fetch(pool, "/length")
        await fetch(pool, "/length")
        assert server.connections == 1
        await asyncio.sleep(0.6)  # past idle_timeout: the child may be closing it
        await fetch(pool, "/length")
        assert server.connections == 2

    run(test)


def test_a_reused_connection_closed_before_any_answer_is_retried_once_on_a_new_one():
    async def test(pool: UpstreamPool, server: Server) -> None:
        assert await fetch(pool, "/arm-drop") == (200, b"hello")
        assert await fetch(pool, "/length") == (200, b"hello")  # sent on the pooled one, dropped, resent
        assert server.connections == 2

    run(test)


@pytest.mark.parametrize("method, body", [("POST", None), ("PATCH", b"x"), ("PUT", b"x")])
def test_a_request_the_child_may_have_acted_on_is_never_sent_twice(method, body):
    """Not idempotent, or a body that may have been read: the keep-alive race is an error, not a resend."""
    async def test(pool: UpstreamPool, server: Server) -> None:
        assert await fetch(pool, "/arm-drop") == (200, b"hello")
        with pytest.raises(ClosedEarly):
            await fetch(pool, "/length", method, body)
        assert server.connections == 1

    run(test)


def test_a_fresh_connection_closed_before_any_answer_is_an_error_not_a_retry():
    async def test(pool: UpstreamPool, server: Server) -> None:
        server.drop_next = True
        with pytest.raises(ClosedEarly):
            await fetch(pool, "/length")
        assert server.connections == 1

    run(test)
