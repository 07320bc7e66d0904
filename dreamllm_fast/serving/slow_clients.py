"""Slow and aborted clients: a header timeout, a body-read timeout, one log line for an abort.

A hostile-client audit held 200 connections open by sending headers and stalling the body, and
20 more with incomplete headers: uvicorn closes idle keep-alive connections
(``timeout_keep_alive``) but has no timer while a request's headers or body are arriving, and a
client that aborted an upload logged two full tracebacks.

- `header_timeout_protocol(seconds)`: uvicorn's h11 protocol, plus a timer from the moment a
  connection (or the next request on a kept-alive one) starts sending until its request line and
  headers are complete; past it the connection is closed. Used by `dreamllm-fast serve`
  (``--header-timeout``); a Ray Serve proxy has its own HTTP server.
- `read_body(request, seconds)`: the app reads a body within ``--body-timeout`` seconds, or
  answers 408 (and the connection closes: its request was not read to the end); a client that
  disconnects mid-upload raises `UploadAborted`, which the app logs as one INFO line.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("dreamllm_fast.serving")


class UploadAborted(Exception):
    """The client disconnected before its request body was complete (nobody reads a reply)."""


async def read_body(request, timeout_s: Optional[float]) -> bytes:
    import anyio
    from starlette.requests import ClientDisconnect

    from .protocol import ApiError

    try:
        with anyio.fail_after(timeout_s):
            return await request.body()
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s "
                            f"(--body-timeout)", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise UploadAborted() from None


def header_timeout_protocol(timeout_s: float):
    """A uvicorn ``http=`` protocol class: H11Protocol that closes a connection whose request
    line and headers take longer than `timeout_s` seconds to arrive."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timeout_s = timeout_s
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request of a kept-alive connection starts arriving
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # headers complete (h11.Request seen)
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection from %s: its request headers took over %g s "
                         "(--header-timeout)", "%s:%d" % self.client if self.client else "?",
                         timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol
