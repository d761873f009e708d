"""A TCP proxy of the suite's own that injects network faults between a client and a server.

Restarting a server is not a network fault; cutting a connection mid-transfer is. The proxy
forwards 127.0.0.1:<port> to a target and, when told, cuts connections after a number of
bytes from the server, or refuses new connections, while counting what passed.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    cut_after_bytes: int | None = None  # total server->client bytes, across connections, before every cut
    refuse: bool = False


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self.bytes_down = 0
        self.connections = 0
        self.cuts = 0
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
            threading.Thread(target=self._pump, args=(client, upstream, False, finished), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True, finished), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool, finished: itertools.count) -> None:
        broken = False
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                cut = False
                if downstream:
                    with self._lock:
                        limit = self.faults.cut_after_bytes
                        if limit is not None and self.bytes_down + len(data) > limit:
                            data, cut = data[: max(0, limit - self.bytes_down)], True
                            self.cuts += 1
                        self.bytes_down += len(data)
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


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a broken network does, rather than a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
