"""Access control and request-size limits for the server.

- The API key: when one is configured, every /v1 route and /metrics need
  ``Authorization: Bearer <key>``; the comparison is `hmac.compare_digest` on bytes, so its time
  does not depend on how much of a guess is right. /health stays open (load balancers and Ray
  Serve probe it; it says only ready or not).
- The body limit: a pure ASGI middleware that refuses a body over `max_body_bytes` with 413, from
  Content-Length before reading anything, or while counting a chunked body; it never buffers more
  than the limit. (FastAPI's own `max_body_size` exists only in recent releases and answers in
  plain text; this one answers in OpenAI's error JSON on every supported version.)
- Binding: `is_loopback` tells the CLI whether to warn about an exposed server without a key.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Optional

API_KEY_ENV = "DREAMLLM_API_KEY"


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def api_key_ok(authorization: Optional[str], api_key: Optional[str]) -> bool:
    """True when no key is configured, or the Bearer token equals it (constant time)."""
    if not api_key:
        return True
    token = bearer_token(authorization)
    if token is None:
        return False
    return hmac.compare_digest(token.encode("utf-8"), api_key.encode("utf-8"))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error_body(message: str, type_: str, code: Optional[str] = None,
               param: Optional[str] = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 (OpenAI error JSON)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return await self._refuse(send)
                except ValueError:
                    pass
        total = 0
        refused = False
        started = False

        async def limited_receive():
            nonlocal total, refused
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.max_bytes:
                    refused = True
                    raise BodyTooLarge(self.max_bytes)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception as e:  # the app may wrap it (ExceptionGroup, its own error handler)
            if not refused or started:
                raise
            del e
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(str(BodyTooLarge(self.max_bytes)), "invalid_request_error",
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    """Raised from `receive` past the limit; the app maps it to the same 413 (create_app)."""

    def __init__(self, max_bytes: int = 0):
        super().__init__(f"the request body is over {max_bytes} bytes (--max-body-mb); send "
                         f"smaller or fewer images")
