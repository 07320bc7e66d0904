"""Shared pieces of the serving tests: a real uvicorn server on 127.0.0.1 in a background thread,
image encoders, an http image host, and a pipeline wrapper that can hold, slow or fail a call."""
from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time

from PIL import Image, ImageDraw

from dreamllm_fast.serving.batched import Observer


class LiveServer:
    """uvicorn serving `app` on an ephemeral 127.0.0.1 port (the socket is bound here, so there
    is no port race); `url` is its base URL. Stops on exit and shuts the app's scheduler down."""

    def __init__(self, app, **config):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=2, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def wait_until(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def scene(w: int = 96, h: int = 72, hue: int = 0) -> Image.Image:
    """A small synthetic picture (not a flat color, so JPEG and resizing do real work)."""
    im = Image.new("RGB", (w, h), (120, 170 - hue, 235))
    d = ImageDraw.Draw(im)
    d.rectangle([0, h * 2 // 3, w, h], fill=(60, 150, 60 + hue))
    d.ellipse([w * 2 // 3, 4, w * 2 // 3 + 20, 24], fill=(250, 220, 60))
    return im


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def decode_b64_png(b64: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(b64)), formats=["PNG"]) as im:
        return im.convert("RGB")


def bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, followed by garbage: tiny on the wire; decoding it
    would need w*h*3 bytes (and then fail). Refusing it must not depend on decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) \
        + chunk(b"IEND", b"")


class ImageHost:
    """A plain http server on 127.0.0.1 serving test images, redirects and slow answers."""

    def __init__(self, routes: dict):
        self.routes = routes  # path -> (status, headers, body, delay_s)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, headers, body, delay = owner.routes.get(self.path, (404, {}, b"", 0))
                owner.hits.append(self.path)
                time.sleep(delay)
                self.send_response(status)
                for k, v in headers.items():
                    if v != "omit":
                        self.send_header(k, v)
                if "Content-Length" not in headers:  # "omit": HTTP/1.0, the body ends at close
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass

        self.hits: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class GatedPipeline:
    """Wraps a real pipeline. `gate` (closed) holds the next chat() at its start, `entered` tells
    that a call is held; `piece_delay` slows every streamed piece; `fail_next` makes the next
    chat() raise. Records each chat's messages, how many pieces it yielded and whether it was
    closed early."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.piece_delay = 0.0
        self.fail_next = False
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def chat(self, messages, stream=False, **kw):
        it = self._chat(messages, **kw)
        return it if stream else "".join(it)

    def _chat(self, messages, **kw):
        rec = {"pieces": 0, "finished": False, "closed_early": False, "messages": messages}
        self.calls.append(rec)
        self.entered.set()
        self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure inside the model call")
        inner = self._pipe.chat(messages, stream=True, **kw)
        try:
            for piece in inner:
                time.sleep(self.piece_delay)
                rec["pieces"] += 1
                yield piece
            rec["finished"] = True
        except GeneratorExit:
            rec["closed_early"] = True
            raise
        finally:
            inner.close()


class Recorder(Observer):
    """The batched scheduler's observer in tests: `on_iteration(sched)`, when set, runs at the start
    of every busy iteration (to hold or slow the worker); `trace`, when a list, records what each
    stage ran as (stage, entries)."""

    def __init__(self):
        self.on_iteration = None
        self.trace = None

    def iteration(self, sched) -> None:
        if self.on_iteration is not None:
            self.on_iteration(sched)

    def ran(self, stage: str, entries: list) -> None:
        if self.trace is not None:
            self.trace.append((stage, entries))
