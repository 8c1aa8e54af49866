"""Fuzzing the broker's HTTP handling: every input is a request or a clean HTTP error.

Two layers, each bounded by ``max_examples`` so the file stays well under 20 s:

- :func:`imdsguard.broker._http.parse_head` on arbitrary bytes, on
  HTTP-shaped token soup, on inputs sized around each limit and on mutations
  of valid requests. Every outcome is a :class:`Request`, ``None`` (head not
  complete yet, and within the limits, so buffering is bounded) or an
  :class:`HttpError` whose answer our own client reads back. The outcome
  does not depend on how the bytes are split: once a prefix decides, every
  longer input decides the same (the server parses after each ``recv``).
- The same inputs through a running broker on a Unix socket: the answer is
  exactly the status the parser and the routes predict, a well-formed
  ``Connection: close`` response, or (input never completed) a silent close;
  the event loop never reports an internal error and keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Union

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from imdsguard.broker import _http
from imdsguard.broker.client import _parse
from imdsguard.broker.server import CREDENTIALS_ROUTE, HEALTH_ROUTE, Broker
from imdsguard.config import parse_config
from imdsguard.imds import ImdsClient
from imdsguard_testing.fakes import RecordingLogger
from imdsguard_testing.imds_sim import ImdsSimulator, SimConfig

EXAMPLES = int(os.environ.get("IMDSGUARD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ERROR_STATUSES = {400, 413, 414, 431, 505}

Outcome = Union[_http.Request, _http.HttpError, None]

VALID = [
    b"GET /v1/credentials HTTP/1.1\r\nHost: imdsguard\r\nConnection: close\r\n\r\n",
    b"GET /v1/health HTTP/1.0\r\n\r\n",
    b"GET /v1/credentials?x=1 HTTP/1.1\nHost: a\nUser-Agent: aws-cli/2\n\n",
    b"\r\nGET /v1/health HTTP/1.1\r\nContent-Length: 0\r\nAccept: */*\r\n\r\n",
    b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n\r\n",
]


def outcome(buf: bytes) -> Outcome:
    """What the parser makes of ``buf``, checked against the parser's promises."""
    try:
        request = _http.parse_head(buf)
    except _http.HttpError as exc:
        check_error(exc)
        event(f"HTTP {exc.status}")
        return exc
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        pytest.fail(f"{type(exc).__name__} escaped parse_head for {buf[:200]!r}: {exc}")
    if request is None:
        # Still waiting for the end of the head: only while within the limits.
        assert len(buf) <= _http.MAX_HEADER_BYTES, len(buf)
        event("incomplete")
        return None
    assert isinstance(request, _http.Request)
    assert request.method and request.method.isascii() and " " not in request.method
    assert request.target.startswith("/")
    assert request.path == request.target.split("?", 1)[0]
    assert request.version in {f"HTTP/1.{d}" for d in range(10)}
    assert len(request.headers) <= _http.MAX_HEADERS
    assert all(k == k.lower() and k.isascii() for k in request.headers)
    assert "transfer-encoding" not in request.headers
    assert int(request.headers.get("content-length", "0")) == 0
    event("request")
    return request


def check_error(exc: _http.HttpError) -> None:
    """A clean error: a known status, one printable line, a response our client reads."""
    assert exc.status in ERROR_STATUSES, exc.status
    assert exc.message and exc.message.isprintable(), exc.message
    wire = _http.response(exc.status, {"error": exc.message})
    status, body = _parse(wire)
    assert status == exc.status
    assert json.loads(body) == {"error": exc.message}


def same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, _http.HttpError) and isinstance(b, _http.HttpError):
        return (a.status, a.message) == (b.status, b.message)
    return a == b


# --- strategies -----------------------------------------------------------------------

PIECES = st.sampled_from(
    [b"GET", b"PUT", b"get", b"G\x00T", b" ", b"  ", b"\t", b"/", b"/v1/credentials",
     b"/v1/health", b"*", b"http://x/", b"?", b"%00", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
     b"HTTP/1.", b"HTTP/11.1", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b":", b": ",
     b"Host", b"Content-Length", b"content-length", b"Transfer-Encoding", b"chunked", b"0",
     b"00", b"5", b"-1", b"\xff\xfe", b"\xc3\xa9", b"\x00", b"X-A", b"Connection: close"]
)  # fmt: skip
HTTP_SOUP = st.lists(PIECES, max_size=40).map(b"".join)


@st.composite
def near_limits(draw: st.DrawFn) -> bytes:
    """Inputs sized around each limit (request line, head size, header count, leading CRLFs)."""
    kind = draw(st.sampled_from(["line", "head", "count", "blank", "value"]))
    end = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n", b""]))
    if kind == "line":
        n = draw(st.integers(_http.MAX_REQUEST_LINE - 24, _http.MAX_REQUEST_LINE + 8))
        return b"GET /" + b"a" * n + b" HTTP/1.1" + end
    if kind == "head":
        n = draw(st.integers(_http.MAX_HEADER_BYTES - 60, _http.MAX_HEADER_BYTES + 8))
        return b"GET / HTTP/1.1\r\nX: " + b"b" * n + end
    if kind == "count":
        n = draw(st.integers(_http.MAX_HEADERS - 2, _http.MAX_HEADERS + 2))
        return b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(n)) + end
    if kind == "blank":
        n = draw(st.integers(_http.MAX_HEADER_BYTES // 2 - 30, _http.MAX_HEADER_BYTES // 2 + 4))
        return b"\r\n" * n + b"GET / HTTP/1.1" + end
    return b"GET / HTTP/1.1\r\nX: " + b"c" * draw(st.integers(0, 20000)) + end


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes or lines deleted, inserted, replaced or moved."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "dup", "swap", "lf", "flood"]))
        i = draw(st.integers(0, len(data)))
        if kind == "delete":
            del data[i : draw(st.integers(i, len(data)))]
        elif kind == "insert":
            data[i:i] = draw(st.one_of(st.binary(max_size=8), PIECES))
        elif kind == "replace" and data:
            data[min(i, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind in ("dup", "swap"):
            lines = bytes(data).split(b"\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if kind == "dup":
                lines.insert(a, lines[b])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            data = bytearray(b"\n".join(lines))
        elif kind == "lf":
            data = bytearray(bytes(data).replace(b"\r\n", b"\n"))
        else:
            data[i:i] = draw(PIECES) * draw(st.integers(1, 3000))
    return bytes(data)


ANY_INPUT = st.one_of(st.binary(max_size=600), HTTP_SOUP, near_limits(), mutated())


# --- the parser -----------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=2000), HTTP_SOUP))
@example(b"")
@example(b"\r\n" * 5000)
@example(b"GET / HTTP/1.1\r\n\r\n\xff")
@example(b"GET / HTTP/1.1\r\nContent-Length: \xd9\xa1\r\n\r\n")  # non-ASCII digits
@example("GET / HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"))
@example(b"GET / HTTP/\xd9\xa1.1\r\n\r\n")
@example(b"GET / HTTP/1.1\r\n x: folded\r\n\r\n")
@example(b"GET  /  HTTP/1.1\r\n\r\n")
@example(b"GET /\x00 HTTP/1.1\r\nHost:\x00\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(near_limits())
def test_inputs_around_the_limits(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(mutated())
def test_mutations_of_valid_requests(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(st.sampled_from(VALID))
def test_valid_requests_parse(data: bytes) -> None:
    assert isinstance(outcome(data), _http.Request), data


def _cuts(data: bytes) -> st.SearchStrategy[tuple[bytes, int]]:
    """``data`` and a place to cut it, often just after a line ends (where heads end)."""
    after_lines = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    cut = st.integers(0, len(data))
    if after_lines:
        cut = cut | st.sampled_from(after_lines)
    return st.tuples(st.just(data), cut)


@FUZZ
@given(ANY_INPUT.flatmap(_cuts))
# Leading blank lines count towards the head's size, however the bytes arrive.
@example((b"\r\n" * 4095 + b"GET / HTTP/1.1\r\n\r\n", 8193))
def test_a_decision_does_not_depend_on_how_bytes_arrive(case: tuple[bytes, int]) -> None:
    """Once a prefix decides (request or error), every longer input decides the same."""
    data, cut = case
    first = outcome(data[:cut])
    if first is not None:
        whole = outcome(data)
        assert same(first, whole), (cut, first, whole)


@pytest.mark.parametrize("data", [b"\r\r\n\r\n", b"\n\r\n\r\n", b"\r\n" * 8])
def test_blank_lines_alone_are_no_request_yet(data: bytes) -> None:
    """Only blank lines (RFC 9112 says skip them) leave the head incomplete: the broker
    waits for the request line, and a client that sends nothing more gets 408."""
    assert _http.parse_head(data) is None


# --- through the running broker -------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, RecordingLogger]]:
    """A broker (this uid is its client) in front of the simulated IMDS on loopback."""
    sim = ImdsSimulator(SimConfig(http_tokens="required"))
    [(host, port)] = sim.serve([("127.0.0.1", 0)])
    with tempfile.TemporaryDirectory(prefix="imdsg-fuzz-") as tmp:
        path = os.path.join(tmp, "run", "broker.sock")
        config = parse_config(
            f"broker:\n  enabled: true\n  socket: {path}\n"
            f"  clients: {{users: [{os.geteuid()}]}}\nimds:\n  url: http://{host}:{port}\n",
            os.path.join(tmp, "config.yaml"),
        )
        log = RecordingLogger()
        broker = Broker(config, log, imds=ImdsClient(config.imds_url, timeout=0.5))
        broker.start()
        try:
            assert broker.cache.wait_current(5) is not None
            yield path, log
        finally:
            broker.stop()
            sim.shutdown()


def exchange(path: str, data: bytes) -> bytes:
    """Send ``data``, close our side, read everything the broker answers."""
    reply = b""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # an early answer (e.g. 431) may come before we finished
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
    return reply


def expected_status(parsed: Outcome) -> int | None:
    """What the broker must answer: the parser's error, or the route's status."""
    if parsed is None:
        return None
    if isinstance(parsed, _http.HttpError):
        return parsed.status
    if parsed.path not in (CREDENTIALS_ROUTE, HEALTH_ROUTE):
        return 404
    if parsed.method != "GET":
        return 405
    return 200


@FUZZ
@given(ANY_INPUT)
@example(VALID[0])
@example(b"GET /v1/health HTTP/1.1\r\n" + b"X: y\r\n" * 3000)
@example(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS ClientHello
def test_the_broker_answers_every_input_cleanly(
    served: tuple[str, RecordingLogger], data: bytes
) -> None:
    path, log = served
    want = expected_status(outcome(data))
    reply = exchange(path, data)
    if want is None:
        assert reply == b"", reply[:200]  # it never completed: closed without a word
    else:
        head = reply.partition(b"\r\n\r\n")[0].decode("ascii").split("\r\n")
        assert head[0].startswith(f"HTTP/1.1 {want} "), (head[0], want, data[:200])
        assert "Connection: close" in head and "Cache-Control: no-store" in head
        status, body = _parse(reply)
        assert status == want
        doc = json.loads(body)
        if want != 200:
            assert isinstance(doc["error"], str) and "\n" not in doc["error"]
    errors = [line for line in log.lines if line[0] == "error"]
    assert not errors, errors


def test_the_broker_still_serves_after_the_fuzzing(served: tuple[str, RecordingLogger]) -> None:
    path, log = served
    status, body = _parse(exchange(path, VALID[0]))
    assert status == 200 and json.loads(body)["Version"] == 1
    assert not [line for line in log.lines if line[0] == "error"]
