"""A request's memory is bounded before any image is decoded (issue 20).

- A 4096x1 (or 1x4096) PNG is a few hundred bytes inside every pixel limit, but the CLIP
  preprocessing resizes its short side to 224: a 917504x224 image, about 2 GB of peak RSS before
  the fix. Now the aspect ratio on its header refuses it. The peak is measured in a fresh
  subprocess (ru_maxrss after a warm-up on a small image), so this process's own history
  cannot blur it, through the path the server takes: `chat_request` (parse, read, check and
  decode the images) and then the CLIP preprocessing of whatever it accepted.
- The image count is checked against the context (and --max-input-images, by default what
  fits the context) before any image is read or decoded; every header is checked before the
  first image is decoded.
"""
import asyncio
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")

from PIL import Image  # noqa: E402
from serving_helpers import bomb_png, data_url, encode, scene  # noqa: E402

from dreamllm_fast.serving import protocol  # noqa: E402
from dreamllm_fast.serving.media import MediaLimits  # noqa: E402
from dreamllm_fast.serving.protocol import (ApiError, ChatCompletionRequest, ServeConfig,  # noqa: E402
                                            chat_request, max_input_images)

PEAK_CHILD = r"""
import asyncio, base64, io, json, resource, sys
from PIL import Image
from dreamllm_fast.config import DreamLLMConfig
from dreamllm_fast.images import ImagePreprocessor
from dreamllm_fast.serving.protocol import ApiError, ChatCompletionRequest, ServeConfig, chat_request

pre = ImagePreprocessor(DreamLLMConfig.from_name("tiny").vision.preprocessor)

def png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

def run(w, h):
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user",
        "content": [{"type": "image_url", "image_url": {"url": png(w, h)}},
                    {"type": "text", "text": "what?"}]}]})
    try:
        req = asyncio.run(chat_request(body, ServeConfig()))
    except ApiError as e:
        return "refused: " + e.message
    pre([c for m in req.messages for c in m["content"] if not isinstance(c, str)])
    return "accepted"

run(64, 48)  # warm-up: imports, allocator pools, the preprocessor's first call
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = run(int(sys.argv[1]), int(sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "extra_mb": (peak - base) / 1024}))
"""


@pytest.mark.parametrize("w,h", [(4096, 1), (1, 4096)])
def test_a_thin_png_costs_under_100_mb(w, h):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(w), str(h)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{w}x{h}: {got}")
    assert got["extra_mb"] < 100, got
    assert got["outcome"].startswith("refused") and "aspect ratio" in got["outcome"], got


def _body(urls):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content + [{"type": "text", "text": "?"}]}]})


@pytest.fixture
def decodes(monkeypatch):
    """Records every image decode of the protocol layer."""
    seen = []
    real = protocol.decode_image

    def decode(data, limits):
        seen.append(len(data))
        return real(data, limits)

    monkeypatch.setattr(protocol, "decode_image", decode)
    return seen


def test_images_that_cannot_fit_the_context_are_refused_before_decoding(decodes):
    big = data_url(encode(Image.new("RGB", (4096, 4096), (9, 9, 9))))  # ~50 kB, 48 MB decoded
    with pytest.raises(ApiError) as e:
        asyncio.run(chat_request(_body([big] * 8), ServeConfig(), context=(2048, 258)))
    assert e.value.code == "context_length_exceeded" and "2048" in e.value.message, e.value.message
    assert decodes == []
    # the default limit is what fits the context: 7 images of 258 tokens beside the BOS in 2048
    assert max_input_images(MediaLimits(), (2048, 258)) == 7
    assert max_input_images(MediaLimits(max_images=3), (2048, 258)) == 3
    with pytest.raises(ApiError, match="at most 3 images"):
        asyncio.run(chat_request(_body([big] * 4), ServeConfig(media=MediaLimits(max_images=3)),
                                 context=(2048, 258)))
    assert decodes == []


def test_every_header_is_checked_before_the_first_image_is_decoded(decodes):
    good = data_url(encode(scene()))
    with pytest.raises(ApiError, match="content\\[2\\].*refused before decoding"):
        asyncio.run(chat_request(_body([good, good, data_url(bomb_png(8192, 8192))]), ServeConfig(),
                                 context=(2048, 258)))
    assert decodes == []
    req = asyncio.run(chat_request(_body([good, good]), ServeConfig(), context=(2048, 258)))
    assert len(decodes) == 2 and [type(c).__name__ for c in req.messages[0]["content"]][:2] == ["Image"] * 2


@pytest.mark.parametrize("w,h,ok", [(4096, 205, True), (4096, 204, False), (205, 4096, True),
                                    (4097, 400, False)])
def test_side_and_aspect_ratio_limits(w, h, ok):
    from dreamllm_fast.errors import ImageLoadError
    from dreamllm_fast.serving.media import check_header

    data = bomb_png(w, h)  # the header is all that is read
    if ok:
        assert check_header(data, MediaLimits()) == "PNG"
    else:
        with pytest.raises(ImageLoadError, match="refused before decoding"):
            check_header(data, MediaLimits())


def test_side_and_aspect_ratio_limits_follow_the_flags():
    from dreamllm_fast.errors import ImageLoadError, InvalidInputError
    from dreamllm_fast.serving.media import check_header

    limits = MediaLimits(max_image_side=1000, max_aspect_ratio=2)
    assert check_header(bomb_png(1000, 500), limits) == "PNG"
    with pytest.raises(ImageLoadError, match=r"1001x600 pixels; the limit is 1000 pixels a side \(--max-image-side\)"):
        check_header(bomb_png(1001, 600), limits)
    with pytest.raises(ImageLoadError, match=r"over 2:1 \(--max-aspect-ratio\)"):
        check_header(bomb_png(1000, 499), limits)
    for bad, flag in (({"max_image_side": 0}, "--max-image-side"), ({"max_aspect_ratio": 0.5}, "--max-aspect-ratio"),
                      ({"max_image_pixels": -1}, "--max-image-pixels"), ({"max_image_bytes": 0}, "--max-image-mb"),
                      ({"fetch_timeout_s": 0}, "--image-fetch-timeout"), ({"max_images": -1}, "--max-input-images")):
        with pytest.raises(InvalidInputError, match=flag):
            MediaLimits(**bad)
