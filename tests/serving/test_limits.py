"""Limits, security and errors over raw HTTP (httpx), against a real server on 127.0.0.1 with an
API key, small limits, and an allow-listed image host (a second server on 127.0.0.1).

Every error is OpenAI's error JSON with the right status, and the server keeps serving after it.
"""
import hmac

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")

from serving_helpers import ImageHost, LiveServer, bomb_png, data_url, encode, scene  # noqa: E402

from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import MediaLimits, SequentialScheduler, ServeConfig, create_app  # noqa: E402

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
IMG = encode(scene())
MAX_IMAGE_BYTES = 64 * 1024
MAX_BODY = 512 * 1024


@pytest.fixture(scope="module")
def host():
    big = b"\x89PNG\r\n\x1a\n" + b"x" * (MAX_IMAGE_BYTES + 10)
    routes = {
        "/img.png": (200, {"Content-Type": "image/png"}, IMG, 0),
        "/big.png": (200, {}, big, 0),
        "/big-unsized.png": (200, {"Content-Length": "omit"}, big, 0),  # no size announced
        "/slow.png": (200, {}, IMG, 3.0),
        "/missing.png": (404, {}, b"", 0),
        "/to-same": (302, {"Location": "/img.png"}, b"", 0),
    }
    with ImageHost(routes) as h:
        # a redirect to another host: "localhost" names the same machine but is not allow-listed
        h.routes["/to-other"] = (302, {"Location": f"http://localhost:{h.port}/img.png"}, b"", 0)
        yield h


@pytest.fixture(scope="module")
def server(tiny_ckpt, host):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                            backend="reference", progress=False)
    cfg = ServeConfig(model_name=MODEL, api_key=KEY, max_body_bytes=MAX_BODY, max_n=2,
                      media=MediaLimits(max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=512 * 512,
                                        max_images=2, allowed_hosts=(f"127.0.0.1:{host.port}",),
                                        fetch_timeout_s=1.0))
    sched = SequentialScheduler(pipe, max_queue=4, warmup=False)
    with LiveServer(create_app(sched, cfg)) as srv:
        assert sched.wait_ready(60), sched.health()
        yield srv


def post(server, body, path="/v1/chat/completions", headers=AUTH, **kw):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def chat(content="hi", **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0}
    body.update(extra)
    return body


def image_msg(url):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


def assert_error(r, status, *words, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], (w, err["message"])
    if code is not None:
        assert err["code"] == code
    return err


def test_api_key_is_required_and_compared_in_constant_time(server, monkeypatch):
    assert_error(post(server, chat(), headers={}), 401, "missing API key", code="invalid_api_key")
    r = post(server, chat(), headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401, "incorrect API key", code="invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(post(server, chat(), headers={"Authorization": KEY}), 401)  # not a Bearer token
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert post(server, chat()).status_code == 200
    assert calls and calls[-1] == (KEY.encode(), KEY.encode())


def test_openai_client_with_the_key(server):
    openai = pytest.importorskip("openai")
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in ok.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("extra,param,words", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["tool calling"]),
    ({"logprobs": True}, "logprobs", ["logprobs"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["structured output"]),
    ({"frequency_penalty": 0.5}, "frequency_penalty", ["frequency_penalty"]),
    ({"bogus": 1}, "bogus", ["Unrecognized request argument supplied: bogus"]),
    ({"max_tokens": "5"}, "max_tokens", ["valid integer"]),
    ({"temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ({"n": 3}, "n", ["at most 2"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"num_inference_steps": 3}, "num_inference_steps", ["interleaved answers only"]),
    ({"modalities": ["image"]}, "modalities", ["/v1/images/generations"]),
    ({"stream_options": {"include_usage": True}}, "stream_options", ["stream is true"]),
])
def test_bad_parameters_get_400_naming_them(server, extra, param, words):
    err = assert_error(post(server, chat(**extra)), 400, *words)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_parameters_pass(server):
    r = post(server, chat(logprobs=False, frequency_penalty=0, presence_penalty=0.0, user="u1",
                          parallel_tool_calls=True, metadata={"k": "v"}))
    assert r.status_code == 200, r.text


def test_malformed_requests(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert_error(r, 400, "not valid JSON")
    assert_error(httpx.post(server.url + "/v1/chat/completions", content=b"", headers=AUTH), 400, "empty")
    assert_error(post(server, [1, 2]), 400, "JSON object")
    assert_error(post(server, {"model": MODEL, "messages": []}), 400, "messages")
    assert_error(post(server, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), 400, "role")
    assert_error(post(server, chat(model="gpt-4o")), 404, "'gpt-4o' does not exist", code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404, "no route")
    assert_error(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405)
    late_system = {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                {"role": "system", "content": "b"}]}
    assert_error(post(server, late_system), 400, "one system prompt, at the start")
    two_users = {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                              {"role": "user", "content": "b"}]}
    assert_error(post(server, two_users), 400, "alternate")
    assert_error(post(server, chat("<im_start> sneaky")), 400, "special token")


def test_request_over_the_context_names_the_limit(server):
    err = assert_error(post(server, chat(max_tokens=5000)), 400, "maximum context length is 2048",
                       "5000", code="context_length_exceeded")
    assert err["param"] == "messages"
    # too much text, no max_tokens: refused before the tokenizer reads megabytes
    assert_error(post(server, chat("word " * 90_000, max_tokens=None)), 400, "2048",
                 code="context_length_exceeded")
    # images count: 8 images of 258 tokens do not fit 2048
    many = [{"type": "image_url", "image_url": {"url": data_url(IMG)}}] * 2
    body = {"model": MODEL, "max_tokens": 1900, "messages": [{"role": "user", "content": many}]}
    assert_error(post(server, body), 400, "2 image(s) of 258 tokens", code="context_length_exceeded")


def test_body_size_is_capped(server):
    big = chat("x" * (MAX_BODY + 1))
    assert_error(post(server, big), 413, f"over {MAX_BODY} bytes", code="request_too_large")

    def chunks():  # no Content-Length: counted while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"y" * 4096
        yield b'"}]}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert_error(r, 413, code="request_too_large")
    assert post(server, chat()).status_code == 200  # still serving


def test_image_bytes_pixels_and_formats_are_capped(server):
    noisy = scene(300, 300)
    import random

    px = noisy.load()
    rnd = random.Random(0)
    for x in range(300):
        for y in range(300):
            px[x, y] = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
    big = encode(noisy)  # ~270 kB of noise: over the 64 kB image limit, under the body limit
    assert len(big) > MAX_IMAGE_BYTES
    assert_error(post(server, chat(image_msg(data_url(big)))), 400, f"limit is {MAX_IMAGE_BYTES} bytes",
                 code="invalid_image")
    # a bomb: the header claims 30000 x 30000 (900 Mpx, 2.7 GB decoded) in about 100 bytes
    err = assert_error(post(server, chat(image_msg(data_url(bomb_png(30000, 30000))))), 400,
                       "30000x30000", "refused before decoding", code="invalid_image")
    assert err["param"] == "messages.0.content.0.image_url"
    # just over the pixel limit (513 x 512 > 512 * 512), a real PNG
    assert_error(post(server, chat(image_msg(data_url(encode(scene(513, 512)))))), 400, "pixels")
    gif = encode(scene(), "GIF")
    assert_error(post(server, chat(image_msg(data_url(gif, "image/gif")))), 400, "image/png or image/jpeg")
    assert_error(post(server, chat(image_msg(data_url(gif, "image/png")))), 400, "not a PNG or JPEG")
    assert_error(post(server, chat(image_msg("data:image/png;base64,@@@@"))), 400, "base64")
    assert_error(post(server, chat(image_msg(data_url(IMG[:40])))), 400, "cannot be decoded")
    assert post(server, chat(image_msg(data_url(IMG)))).status_code == 200


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "../../etc/passwd",
                                 "ftp://127.0.0.1/x.png", "C:\\secret.png"])
def test_no_request_names_a_path_on_disk(server, url):
    assert_error(post(server, chat(image_msg(url))), 400, "image_url must be a data: URL", code="invalid_image")


def test_text_that_looks_like_a_path_stays_text(server, ref_pipe):
    body = chat("/etc/passwd", max_tokens=4)
    r = post(server, body)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == ref_pipe.chat(
        [{"role": "user", "content": "/etc/passwd"}], max_new_tokens=4)


def test_image_urls_of_allowed_hosts_are_fetched_with_limits(server, host):
    base = f"http://127.0.0.1:{host.port}"
    by_url = post(server, chat(image_msg(base + "/img.png"), max_tokens=4))
    inline = post(server, chat(image_msg(data_url(IMG)), max_tokens=4))
    assert by_url.status_code == 200 and inline.status_code == 200
    assert by_url.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
    assert by_url.json()["usage"] == inline.json()["usage"]
    assert post(server, chat(image_msg(base + "/to-same"))).status_code == 200
    n = len(host.hits)
    assert_error(post(server, chat(image_msg(base + "/to-other"))), 400, "'localhost' is not in the allow-list")
    assert host.hits[n:] == ["/to-other"]  # the other host was never contacted
    assert_error(post(server, chat(image_msg(base + "/big.png"))), 400, f"over {MAX_IMAGE_BYTES} bytes")
    assert_error(post(server, chat(image_msg(base + "/big-unsized.png"))), 400, "got at least")
    assert_error(post(server, chat(image_msg(base + "/slow.png"))), 400, "longer than 1.0 s")
    assert_error(post(server, chat(image_msg(base + "/missing.png"))), 400, "HTTP 404")
    other_port = f"http://127.0.0.1:{host.port + 1 if host.port < 65535 else host.port - 1}/img.png"
    assert_error(post(server, chat(image_msg(other_port))), 400, "allow-list")
    assert_error(post(server, chat(image_msg("http://example.com/img.png"))), 400, "allow-list")


def test_image_urls_are_refused_without_an_allow_list(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", progress=False)
    with LiveServer(create_app(SequentialScheduler(pipe, warmup=False), ServeConfig(model_name=MODEL))) as srv:
        r = post(srv, chat(image_msg("http://127.0.0.1:1/img.png")), headers={})
        assert_error(r, 400, "image URLs are disabled", "--allow-image-host")


def test_images_endpoint_errors(server):
    p = "/v1/images/generations"
    assert_error(post(server, {"prompt": "x", "response_format": "url"}, p), 400, "'url' is not supported")
    assert_error(post(server, {"prompt": "x", "size": "big"}, p), 400, "WIDTHxHEIGHT")
    assert_error(post(server, {"prompt": "x", "size": "60x64"}, p), 400, "multiple of 16")
    assert_error(post(server, {"prompt": "x", "size": "4096x4096"}, p), 400, "[32, 128]")
    assert_error(post(server, {"prompt": "x", "num_inference_steps": 5000}, p), 400, "num_inference_steps")
    assert_error(post(server, {"prompt": "x", "style": "vivid"}, p), 400, "style")
    assert_error(post(server, {"prompt": ""}, p), 400, "prompt")
    assert_error(post(server, {"prompt": "x", "negative_prompt": "<dream_start>"}, p), 400, "special token")
    r = post(server, {"prompt": "x", "num_inference_steps": 1, "seed": 1}, p)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
