"""Media units: the header parser against Pillow, bombs refused before any decoding, the host
allow-list, sizes and data URLs. No server needed."""
import io

import pytest
from PIL import Image

pytest.importorskip("pydantic", reason="the serving package needs the 'serve' extra")

from serving_helpers import bomb_png, data_url, encode, scene  # noqa: E402

from dreamllm_fast.errors import ImageLoadError  # noqa: E402
from dreamllm_fast.serving.media import (MediaLimits, decode_data_url, decode_image,  # noqa: E402
                                         header_size, host_allowed, parse_size)

SIZES = [(1, 1), (17, 3), (224, 224), (641, 479), (1000, 37)]  # awkward on purpose


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 80}),
                                    ("JPEG", {"progressive": True}), ("JPEG", {"exif": b"Exif\0\0" + b"\0" * 64})])
def test_header_size_agrees_with_pillow(w, h, fmt, kw):
    data = encode(scene(w, h), fmt, **kw)
    got = header_size(data)
    with Image.open(io.BytesIO(data)) as im:
        assert got == (fmt, *im.size) == (fmt, w, h)


def test_decode_image_equals_pillow_decode():
    for fmt in ("PNG", "JPEG"):
        data = encode(scene(), fmt)
        got = decode_image(data, MediaLimits())
        with Image.open(io.BytesIO(data)) as im:
            assert got.tobytes() == im.convert("RGB").tobytes()


def test_bomb_is_refused_before_pillow_sees_it(monkeypatch):
    def no_pillow(*a, **k):
        raise AssertionError("Pillow was asked to open a bomb")

    monkeypatch.setattr(Image, "open", no_pillow)
    for data in (bomb_png(50_000, 50_000), _jpeg_claiming(60_000, 60_000)):
        assert len(data) < 10_000
        with pytest.raises(ImageLoadError, match="refused before decoding"):
            decode_image(data, MediaLimits(max_image_pixels=4096 * 4096))


def test_pillow_header_is_checked_again_and_nothing_else_decodes(monkeypatch):
    # A header under the limit passes our parser; Pillow reads the same header, and decodes once.
    loads = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or real_load(self))
    decode_image(encode(scene(64, 48)), MediaLimits(max_image_pixels=64 * 48))
    assert loads and all(s == (64, 48) for s in loads)
    with pytest.raises(ImageLoadError, match="pixels"):
        decode_image(encode(scene(64, 48)), MediaLimits(max_image_pixels=64 * 48 - 1))


def test_not_png_or_jpeg_is_refused_before_pillow():
    for fmt in ("GIF", "BMP", "TIFF", "WEBP"):
        try:
            data = encode(scene(), fmt)
        except (KeyError, OSError):  # format not built into this Pillow
            continue
        with pytest.raises(ImageLoadError, match="not a PNG or JPEG"):
            decode_image(data, MediaLimits())
    with pytest.raises(ImageLoadError, match="no IHDR"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 30, MediaLimits())
    with pytest.raises(ImageLoadError, match="no frame header"):
        decode_image(b"\xff\xd8\xff\xd9", MediaLimits())


def test_data_urls():
    png = encode(scene())
    assert decode_data_url(data_url(png), MediaLimits()).size == scene().size
    assert decode_data_url(data_url(png).replace("data:image/png", "data:IMAGE/PNG"), MediaLimits()).size
    for url, msg in [("data:image/png,rawbytes", "base64"), ("data:text/plain;base64,aGk=", "text/plain"),
                     ("data:;base64,aGk=", "none"), ("data:image/png;base64,%%%", "invalid")]:
        with pytest.raises(ImageLoadError, match=msg):
            decode_data_url(url, MediaLimits())
    with pytest.raises(ImageLoadError, match="limit is 100 bytes"):  # before base64 decoding
        decode_data_url(data_url(png), MediaLimits(max_image_bytes=100))


@pytest.mark.parametrize("url,allowed,ok", [
    ("http://img.example.com/a.png", ["img.example.com"], True),
    ("https://IMG.example.com:8443/a.png", ["img.example.com"], True),
    ("http://img.example.com.evil.net/a.png", ["img.example.com"], False),
    ("http://evil.net/?img.example.com", ["img.example.com"], False),
    ("http://user@evil.net/a.png", ["img.example.com"], False),
    ("http://127.0.0.1:9000/a.png", ["127.0.0.1:9000"], True),
    ("http://127.0.0.1:9001/a.png", ["127.0.0.1:9000"], False),
    ("http://127.0.0.1/a.png", ["127.0.0.1:80"], True),
    ("https://127.0.0.1/a.png", ["127.0.0.1:80"], False),
    ("http://[::1]:9000/a.png", ["[::1]:9000"], True),
    ("http://[::1]:9000/a.png", ["::1"], True),
    ("http://localhost/a.png", [], False),
])
def test_host_allow_list(url, allowed, ok):
    assert host_allowed(url, allowed) is ok


def test_parse_size():
    assert parse_size(None) is None and parse_size("auto") is None
    assert parse_size("512x256") == (512, 256) and parse_size(" 64 X 64 ") == (64, 64)
    for bad in ("512", "x512", "512x", "-1x5", "1.5x2", "999999x1"):
        with pytest.raises(ValueError):
            parse_size(bad)


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A real JPEG's bytes with the SOF0 frame size patched to w x h."""
    data = bytearray(encode(scene(32, 32), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_patch_helper_is_what_pillow_reads():
    with Image.open(io.BytesIO(_jpeg_claiming(1234, 567))) as im:
        assert im.size == (1234, 567)
