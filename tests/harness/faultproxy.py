"""A TCP proxy of the suite's own that injects network faults between a client and a server.

Restarting a server is not a network fault; cutting a connection mid-transfer is. The proxy
forwards 127.0.0.1:<port> to a target and, when told, cuts connections after a number of
bytes from the server, stalls them (stops forwarding, keeps them open, as a hung registry or a
black-holed route does), or refuses new connections, while counting what passed. It can also
answer the next requests itself with an HTTP error (an S3 503 SlowDown, say) and records when
each request was in flight, so a test can see how many ran at once.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Faults:
    cut_after_bytes: int | None = None  # total server->client bytes, across connections, before every cut
    stall_after_bytes: int | None = None  # total server->client bytes, across connections, then nothing more
    refuse: bool = False
    error_responses: int = 0  # answer this many next requests with `error_response`, not forwarding them
    error_response: bytes = b""


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0
        self.stalled = threading.Event()  # set once a connection has held back data
        self.errors_sent = 0
        self.spans: list[list[float]] = []  # [start, end] of each request: request bytes in, last response bytes out
        self._current: dict[int, list[float]] = {}  # connection id -> its request in flight
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="faultproxy-accept").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut_after(self, total_bytes: int | None) -> None:
        """Cut every connection once `total_bytes` more server->client bytes have passed (None heals)."""
        with self._lock:
            self.faults.cut_after_bytes = None if total_bytes is None else self.bytes_down + total_bytes

    def stall_after(self, total_bytes: int | None) -> None:
        """Forward `total_bytes` more server->client bytes, then hold every connection open with nothing
        passing (no RST, no FIN) until healed with None or the proxy is closed."""
        with self._lock:
            self.faults.stall_after_bytes = None if total_bytes is None else self.bytes_down + total_bytes

    def fail_requests(self, count: int, status: int = 503, code: str = "SlowDown",
                      headers: dict[str, str] | None = None) -> None:
        """Answer the next `count` requests with an S3-style XML error and close their connections."""
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        lines = [f"HTTP/1.1 {status} Injected", "Content-Type: application/xml", f"Content-Length: {len(body)}",
                 "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        with self._lock:
            self.faults.error_response = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            self.faults.error_responses = count

    def peak_requests_in_flight(self) -> int:
        """The most requests that were in flight at one moment, over the proxy's life."""
        with self._lock:
            events = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        peak = current = 0
        for _, step in events:
            current += step
            peak = max(peak, current)
        return peak

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in list(self._open):
            _reset(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.faults.refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._open.update((client, upstream))
            finished = itertools.count()  # the second direction to end closes the pair
            conn = next(self._ids)
            threading.Thread(target=self._pump, args=(client, upstream, False, finished, conn), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True, finished, conn), daemon=True).start()

    _ids = itertools.count()

    def _track(self, conn: int, downstream: bool) -> bool:
        """Note request/response timing; True when this new request must get the injected error."""
        now = time.monotonic()
        with self._lock:
            span = self._current.get(conn)
            if downstream:
                if span is not None:
                    span[1] = now
                return False
            if span is not None and span[1] > span[0]:  # the previous response has begun: a new request
                self._current.pop(conn)
                span = None
            if span is None:
                if self.faults.error_responses > 0:
                    self.faults.error_responses -= 1
                    self.errors_sent += 1
                    return True
                span = [now, now]
                self._current[conn] = span
                self.spans.append(span)
            return False

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool, finished: itertools.count,
              conn: int = 0) -> None:
        broken = False
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self._track(conn, downstream):
                    source.sendall(self.faults.error_response)
                    _end_politely(source, sink)
                    return
                cut = False
                if downstream:
                    with self._lock:
                        limit = self.faults.cut_after_bytes
                        if limit is not None and self.bytes_down + len(data) > limit:
                            data, cut = data[: max(0, limit - self.bytes_down)], True
                            self.cuts += 1
                        self.bytes_down += len(data)
                    held = self._hold_back(data) if not cut else b""
                    if held:
                        sink.sendall(data[: len(data) - len(held)])
                        data = self._wait_while_stalled(held)
                if data:
                    sink.sendall(data)
                if cut:
                    broken = True
                    break
        except OSError:
            broken = True
        if broken:
            for sock in (source, sink):
                _reset(sock)
                with self._lock:
                    self._open.discard(sock)
            return
        try:
            sink.shutdown(socket.SHUT_WR)  # pass the end of stream on, keep what was sent
        except OSError:
            pass
        if next(finished) == 1:  # atomic under the GIL: the other direction already ended
            for sock in (source, sink):
                sock.close()
                with self._lock:
                    self._open.discard(sock)


    def _hold_back(self, data: bytes) -> bytes:
        """The tail of `data` (already counted in bytes_down) beyond the stall limit."""
        with self._lock:
            limit = self.faults.stall_after_bytes
            if limit is None or self.bytes_down <= limit:
                return b""
            return data[max(0, len(data) - (self.bytes_down - limit)):]

    def _wait_while_stalled(self, held: bytes) -> bytes:
        self.stalled.set()
        while not self._closed and self.faults.stall_after_bytes is not None:
            time.sleep(0.05)
        if self._closed:
            raise OSError("the proxy closed while stalled")
        return held


def _end_politely(client: socket.socket, upstream: socket.socket) -> None:
    """Close after an injected answer with FIN, so the client reads the answer before the end."""
    for sock in (upstream, client):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    client.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a broken network does, rather than a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        # Wakes the other pump thread blocked in recv() on this socket: until that recv
        # returns, close() alone releases nothing and the client would wait for its timeout.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
