"""Slow and aborted clients (issue 20): stalled headers and stalled bodies are cut off by their
timeouts, and a client that aborts an upload is one INFO line, not tracebacks.

Raw sockets against a real uvicorn server on 127.0.0.1 with the header-timeout protocol
`dreamllm-fast serve` runs (slow_clients.header_timeout_protocol) and 1 s timeouts. No model is
needed: the body is read (and the timeouts apply) before the scheduler is asked anything.
"""
import json
import logging
import socket
import time

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import LiveServer, wait_until  # noqa: E402

from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.slow_clients import header_timeout_protocol  # noqa: E402

TIMEOUT = 1.0


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def server():
    app = create_app(None, ServeConfig(model_name="tiny", body_timeout_s=TIMEOUT))
    with LiveServer(app, http=header_timeout_protocol(TIMEOUT)) as srv:
        yield srv


@pytest.fixture
def logs():
    rec = Records()
    names = ("dreamllm_fast.serving", "uvicorn.error", "uvicorn")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).addHandler(rec)
    logging.getLogger("dreamllm_fast.serving").setLevel(logging.INFO)
    yield rec.records
    for n in names:
        logging.getLogger(n).removeHandler(rec)
        logging.getLogger(n).setLevel(old[n])


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection (raises on the socket's timeout)."""
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")


def test_stalled_headers_are_cut_off(server, logs):
    s = connect(server)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
    assert read_all(s) == b""  # closed by the server
    took = time.monotonic() - t0
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 5, took
    assert any("--header-timeout" in r.getMessage() for r in logs)


def test_stalled_body_gets_408_and_the_connection_closes(server):
    s = connect(server)
    s.sendall(HEAD + b'{"model": ')  # 10 of 1000 bytes
    t0 = time.monotonic()
    raw = read_all(s)
    assert time.monotonic() - t0 < TIMEOUT + 5
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "--body-timeout" in err["message"]


def test_an_aborted_upload_is_one_info_line(server, logs):
    for _ in range(3):
        s = connect(server)
        s.sendall(HEAD + b'{"model": ')
        time.sleep(0.1)
        s.close()
    wait_until(lambda: sum("disconnected before" in r.getMessage() for r in logs) == 3, 10,
               "three INFO lines")
    time.sleep(0.3)
    aborted = [r for r in logs if "disconnected before" in r.getMessage()]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in aborted)
    assert [r for r in logs if r.levelno >= logging.WARNING or r.exc_info] == [], \
        [r.getMessage() for r in logs]


def test_ordinary_clients_are_unaffected(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:  # one kept-alive connection
        for _ in range(2):
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                     "content": "hi"}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
            time.sleep(TIMEOUT * 1.5)  # idle past the header timeout: only headers are timed
        assert c.get("/health").status_code == 503
