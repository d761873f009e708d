"""The express lane's two scans (serving/express.py): the C form (serving/_express.c) held to
the Python one over a corpus of request and answer heads, each cut at every length and
mutated at random (seeded): the same result for every one, byte for byte."""

from __future__ import annotations

import random

import pytest

from serving.express import PYTHON_SCANS
from tests.test_express import CASES, PLAIN, compiled_scans

REQUESTS = CASES + [
    b"GET / HTTP/1.1\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"PATCH /x HTTP/1.1\r\nHOST: a\r\nCONTENT-LENGTH: 2\r\nAuthorization:Basic eA==\r\n\r\nhi",
    b"GET /x HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\nExpect: 100-continue\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /x HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: b\r\nX-Forwarded-Host: c\r\n\r\n",
]
ANSWERS = [
    PLAIN,
    b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: Keep-Alive\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc",
    b"HTTP/1.1 404 Not Found\r\nContent-Length:   4  \r\nConnection: keep-alive\r\nConnection: keep-alive\r\n\r\nnope",
    b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nProxy-Thing: 1\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
]
PIECES = [b"\r", b"\n", b"\r\n", b":", b" ", b"\t", b"A", b"-", b"0", b"9", b"\x00", b"\xff", b"%", b"/", b"Host: h\r\n",
          b"Content-Length: 2\r\n", b"connection: close\r\n", b"Connection: upgrade\r\n", b"keep-alive: 1\r\n",
          b"PROXY-x: y\r\n", b"Authorization: t\r\n", b"x-forwarded-for: 1.2.3.4\r\n", b"Transfer-Encoding: chunked\r\n",
          b"\r\n\r\n", b"HTTP/1.1 ", b"GET ", b"trailers: a\r\n"]


def _mutations(seed: bytes, rng: random.Random, count: int):
    """`seed` cut at every length, then `count` copies with a few pieces inserted, deleted or replaced."""
    for end in range(len(seed) + 1):
        yield seed[:end]
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(data))
            action = rng.random()
            if action < 0.5:
                data[at:at] = rng.choice(PIECES)
            elif action < 0.75:
                del data[at:at + rng.randint(1, 4)]
            else:
                data[at:at + 1] = rng.choice(PIECES)
        yield bytes(data)


def test_the_c_scans_decide_as_the_python_ones_over_mutated_heads():
    scans = compiled_scans()
    rng = random.Random(20261204)
    compared = {"requests": 0, "answers": 0}
    taken = {"requests": 0, "answers": 0}
    for seed in REQUESTS:
        for data in _mutations(seed, rng, 2000):
            expected = PYTHON_SCANS[0](data, 8192, 65536)
            assert scans[0](data, 8192, 65536) == expected, data
            compared["requests"] += 1
            taken["requests"] += expected is not None
    for seed in ANSWERS:
        for data in _mutations(seed, rng, 2000):
            expected = PYTHON_SCANS[1](data)
            assert scans[1](data) == expected, data
            compared["answers"] += 1
            taken["answers"] += isinstance(expected, tuple)
    # the corpus reaches both outcomes of both scans, or it compares nothing worth comparing
    assert taken["requests"] > 200 and compared["requests"] - taken["requests"] > 200, (taken, compared)
    assert taken["answers"] > 200 and compared["answers"] - taken["answers"] > 200, (taken, compared)


@pytest.mark.parametrize("form", ["c", "python"])
def test_the_scans_read_a_plain_request_and_answer(form):
    scan_request, read_answer = compiled_scans() if form == "c" else PYTHON_SCANS
    method, target, block, body, length, host, authorization, noted = scan_request(CASES[1], 8192, 65536)
    assert (method, target, body, length, host, authorization) == (b"POST", b"/v1/chat/completions", b'{"a": true}', 11, b"svc:8080", None)
    assert block == b"\nHost: svc:8080\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
    assert noted == [(b"Content-Length: 11\r", b"content-length", b"11")]
    assert scan_request(CASES[1], 8192, 10) is None  # a head over the limit: the chain's 431
    assert scan_request(CASES[1], 5, 65536) is None  # a target over the limit: the chain's 414
    assert read_answer(PLAIN) == (200, PLAIN.index(b"ok"), 2, b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n", True)
    assert read_answer(PLAIN[:20]) == 0  # more to come
    assert read_answer(ANSWERS[6]) == 1  # chunked: the chain streams it
