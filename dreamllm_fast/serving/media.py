"""Image input and output for the server: data URLs, allow-listed http(s) fetches, PNG out.

Every image a request carries becomes a PIL image here, or a 400 naming the limit it broke:
- only ``data:image/png|jpeg;base64,...`` and, when hosts are allow-listed, ``http(s)://`` URLs;
  any other scheme (``file:``, a bare path, ...) is refused, and nothing here ever opens a file,
  so no request can name a path on the server's disk;
- at most `max_image_bytes` encoded bytes, counted while reading (base64 length is checked before
  decoding it; a fetch stops at the limit, whatever Content-Length claimed);
- at most `max_image_pixels`, `max_image_side` pixels a side and `max_aspect_ratio` (long side
  over short side), read from the PNG/JPEG header by this module's own parser BEFORE Pillow
  decodes anything (a decompression bomb is a few kB of header claiming gigapixels), then
  checked again on Pillow's header, with Pillow's MAX_IMAGE_PIXELS as the last guard (the
  `serve` command lowers it to the same limit: it is process-wide). The aspect ratio bounds the
  CLIP preprocessing: it resizes the short side to 224, so a 97-byte 4096x1 PNG became a
  917504x224 image and cost about 2 GB (found by a hostile-client audit); at 20:1 the resized
  image is at most 4480x224;
- a request's images are all read and header-checked first (`image_bytes`), its image count is
  checked against the context, and only then is any image decoded (`decode_image`);
- only PNG and JPEG are handed to Pillow (`formats=`), which keeps its other decoders out of reach.
Fetches go only to allow-listed hosts, with a total time limit and redirects followed only to
allow-listed hosts (at most 3).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import urljoin, urlsplit

from ..errors import ImageLoadError, InvalidInputError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)
_MIMES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: Optional[int] = None  # per request; None: as many as fit the context
    max_image_side: int = 4096
    max_aspect_ratio: float = 20.0
    allowed_hosts: tuple[str, ...] = ()  # "host" (any port) or "host:port"; empty: no fetching
    fetch_timeout_s: float = 10.0

    def __post_init__(self):
        """Refuse a limit that would refuse everything or nothing, naming the server's flag."""
        for name, flag in _FLAGS.items():
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and \
                (v > 0 if name == "fetch_timeout_s" else v >= 1)
            if not ok:
                raise InvalidInputError(f"{name} must be {'> 0' if name == 'fetch_timeout_s' else '>= 1'}, "
                                        f"got {v!r} (the server's {flag} flag)")
        if self.max_images is not None and (isinstance(self.max_images, bool) or self.max_images < 0):
            raise InvalidInputError(f"max_images must be >= 0 or None, got {self.max_images!r} "
                                    "(the server's --max-input-images flag)")


_FLAGS = {"max_image_bytes": "--max-image-mb", "max_image_pixels": "--max-image-pixels",
          "max_image_side": "--max-image-side", "max_aspect_ratio": "--max-aspect-ratio",
          "fetch_timeout_s": "--image-fetch-timeout"}


# -- header dimensions (no decoding) --------------------------------------------------------------
def header_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the PNG IHDR or the first JPEG SOFn marker; raises
    ImageLoadError for anything else. Reads headers only."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageLoadError("the PNG has no IHDR header")
        w, h = struct.unpack(">II", data[16:24])
        return "PNG", w, h
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                raise ImageLoadError("the JPEG header is malformed")
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
                i += 2
                continue
            (seg,) = struct.unpack(">H", data[i + 2:i + 4])
            # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > len(data):
                    break
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return "JPEG", w, h
            i += 2 + seg
        raise ImageLoadError("the JPEG has no frame header (SOF marker)")
    raise ImageLoadError("the image is not a PNG or JPEG; send image/png or image/jpeg")


def check_header(data: bytes, limits: MediaLimits) -> str:
    """The byte, pixel, side and aspect-ratio limits, from the header alone; returns the format."""
    if len(data) > limits.max_image_bytes:
        raise ImageLoadError(
            f"the image is {len(data)} bytes; the limit is {limits.max_image_bytes} bytes "
            f"(--max-image-mb)")
    fmt, w, h = header_size(data)
    _check_pixels(w, h, limits)
    return fmt


def decode_image(data: bytes, limits: MediaLimits):
    """Encoded PNG/JPEG bytes -> RGB PIL image, after the size checks (see the module docstring)."""
    from PIL import Image

    fmt = check_header(data, limits)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            _check_pixels(*im.size, limits)  # Pillow's reading of the same header
            return im.convert("RGB")  # the only decode (as the pipeline's own load_image)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"the image is refused as a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"the {fmt} image cannot be decoded ({e})") from None


def _check_pixels(w: int, h: int, limits: MediaLimits) -> None:
    if w < 1 or h < 1:
        raise ImageLoadError(f"the image header claims {w}x{h} pixels")
    if w * h > limits.max_image_pixels:
        raise ImageLoadError(
            f"the image is {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels} "
            f"pixels (--max-image-pixels); it was refused before decoding")
    if max(w, h) > limits.max_image_side:
        raise ImageLoadError(
            f"the image is {w}x{h} pixels; the limit is {limits.max_image_side} pixels a side "
            f"(--max-image-side); it was refused before decoding: downscale it")
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise ImageLoadError(
            f"the image is {w}x{h} pixels, an aspect ratio over {limits.max_aspect_ratio:g}:1 "
            f"(--max-aspect-ratio); the model sees a center crop of a square, so crop it first "
            f"(refused before decoding)")


# -- URLs -----------------------------------------------------------------------------------------
def decode_data_url(url: str, limits: MediaLimits):
    return decode_image(data_url_bytes(url, limits), limits)


def data_url_bytes(url: str, limits: MediaLimits) -> bytes:
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise ImageLoadError("a data URL must look like data:image/png;base64,<data>")
    mime = (m.group("mime") or "").lower()
    if mime not in _MIMES:
        raise ImageLoadError(f"data URL of type {mime or 'none'!r}; send image/png or image/jpeg")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:  # before decoding the base64
        raise ImageLoadError(
            f"the image is about {len(payload) * 3 // 4} bytes; the limit is "
            f"{limits.max_image_bytes} bytes (--max-image-mb)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError("the data URL's base64 payload is invalid") from None


def host_allowed(url: str, allowed: Sequence[str]) -> bool:
    """Exact, case-insensitive host match; an entry "host:port" also pins the port."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allowed:
        e = entry.strip().lower()
        if e.startswith("[") and "]:" in e:  # [v6]:port
            eh, ep = e[1:].split("]:", 1)
        elif e.count(":") == 1:  # host:port
            eh, ep = e.split(":")
        else:  # host (or bare/bracketed v6), any port
            eh, ep = e.strip("[]"), ""
        if eh == host and (not ep or ep == str(port)):
            return True
    return False


async def fetch_image(url: str, limits: MediaLimits, client) -> "object":
    """GET an allow-listed http(s) URL with the byte and time limits; `client` is an
    `httpx.AsyncClient` made with follow_redirects=False."""
    import anyio

    return await anyio.to_thread.run_sync(decode_image, await fetch_bytes(url, limits, client),
                                          limits)


async def fetch_bytes(url: str, limits: MediaLimits, client) -> bytes:
    """The bytes at an allow-listed http(s) URL (see `fetch_image`)."""
    import anyio
    import httpx

    try:
        with anyio.fail_after(limits.fetch_timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                _check_fetchable(url, limits)
                async with client.stream("GET", url, follow_redirects=False) as r:
                    if r.is_redirect:
                        url = urljoin(url, r.headers.get("location", ""))
                        continue
                    if r.status_code != 200:
                        raise ImageLoadError(f"fetching the image URL returned HTTP {r.status_code}")
                    claimed = r.headers.get("content-length")
                    if claimed and claimed.isdigit() and int(claimed) > limits.max_image_bytes:
                        raise ImageLoadError(_too_big(int(claimed), limits))
                    buf = bytearray()
                    async for chunk in r.aiter_bytes():
                        buf += chunk
                        if len(buf) > limits.max_image_bytes:
                            raise ImageLoadError(_too_big(len(buf), limits))
                    data = bytes(buf)
                    break
            else:
                raise ImageLoadError(f"the image URL redirected more than {MAX_REDIRECTS} times")
    except TimeoutError:
        raise ImageLoadError(
            f"fetching the image URL took longer than {limits.fetch_timeout_s} s "
            f"(--image-fetch-timeout)") from None
    except httpx.HTTPError as e:
        raise ImageLoadError(f"fetching the image URL failed ({type(e).__name__})") from None
    return data


def _check_fetchable(url: str, limits: MediaLimits) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImageLoadError(f"image URL scheme {parts.scheme!r} is not allowed (the image URL "
                             f"redirected off http(s))")
    if parts.username or parts.password:
        raise ImageLoadError("image URLs with credentials are refused")
    if not host_allowed(url, limits.allowed_hosts):
        raise ImageLoadError(
            f"image host {parts.hostname!r} is not in the allow-list (--allow-image-host); "
            f"send the image as a data URL, or allow the host")


def _too_big(n: int, limits: MediaLimits) -> str:
    return (f"the image at the URL is over {limits.max_image_bytes} bytes (got at least {n}); "
            f"the limit is --max-image-mb")


async def load_image_url(url: str, limits: MediaLimits, client=None):
    """Any image_url of a request -> PIL image, or ImageLoadError (HTTP 400)."""
    import anyio

    return await anyio.to_thread.run_sync(decode_image, await image_bytes(url, limits, client),
                                          limits)


async def image_bytes(url: str, limits: MediaLimits, client=None) -> bytes:
    """Any image_url of a request -> its encoded bytes, header-checked (`check_header`), not
    decoded; or ImageLoadError (HTTP 400)."""
    import anyio

    if not isinstance(url, str) or not url:
        raise ImageLoadError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = await anyio.to_thread.run_sync(data_url_bytes, url, limits)
    elif scheme in ("http", "https"):
        if not limits.allowed_hosts or client is None:
            raise ImageLoadError(
                "image URLs are disabled on this server: send the image inline as a data URL "
                "(data:image/png;base64,...), or start the server with --allow-image-host HOST")
        data = await fetch_bytes(url, limits, client)
    else:
        data = None
    if data is not None:
        check_header(data, limits)
        return data
    raise ImageLoadError(
        f"image_url must be a data: URL (or an http(s) URL of an allow-listed host); "
        f"{(scheme + ':') if scheme else 'a path'} is not accepted")


# -- output ---------------------------------------------------------------------------------------
def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def png_data_url(image) -> str:
    return "data:image/png;base64," + png_b64(image)


def parse_size(size: Optional[str]) -> Optional[tuple[int, int]]:
    """OpenAI's "WxH" (or "auto"/None: the model's default) -> (width, height)."""
    if size is None or size == "auto":
        return None
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", size)
    if m is None:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
    return int(m.group(1)), int(m.group(2))
