"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
against real servers on 127.0.0.1: the tiny checkpoint on the batched scheduler (CPU, fp32) where
the model's own answer is the point, and the stub backend (dreamllm_fast/devtools/stub.py) where the answer
must be controlled (hostile markup in it). One browser and one server of each kind serve every
test; each test opens a fresh browser context (empty storage). No page may log a console error
or throw, except the failed-request lines a test provokes on purpose (401, 429, 400, 503).

Screenshots go to $DREAMLLM_WEBUI_SCREENSHOTS when set (docs/ holds the committed ones: run
`DREAMLLM_WEBUI_SCREENSHOTS=docs python -m pytest tests/serving/test_webui_browser.py`), else to
pytest's temporary directory.
"""
import base64
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the 'dev' extra)")
CHROMIUM = os.environ.get("DREAMLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium found: install Debian's package (apt-get install chromium) or set "
                "DREAMLLM_CHROMIUM to a Chromium binary", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402
from serving_helpers import LiveServer, Recorder, encode, scene, wait_until  # noqa: E402

from dreamllm_fast.pipeline import DreamLLMPipeline  # noqa: E402
from dreamllm_fast.serving import ServeConfig, create_app  # noqa: E402
from dreamllm_fast.serving.batched import BatchedScheduler  # noqa: E402

# what the workplace's closed network needs (no background connections, no component updates)
FLAGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
KEY = "sk-test-key"
XSS_ANSWER = ('Hello <img src=x onerror="window.__xss=\'answer-img\'"> and '
              "<script>window.__xss='answer-script'</script> [click](javascript:window.__xss='link') **bold** ")
XSS_USER = "<img src=x onerror=\"window.__xss='user-img'\"> <script>window.__xss='user-script'</script> hi"
SKY = "Tell me about the sky."  # the tiny walk answers it with text, one image, text (temperature 0)
# records, in order, when a progress bar, a preview and a finished image first appear
WATCH = """
window.__seen = [];
new MutationObserver(() => {
  const note = (k, sel) => { if (!window.__seen.includes(k) && document.querySelector(sel)) window.__seen.push(k); };
  note("progress", "#messages figure.drawing progress");
  note("preview", "#messages figure.drawing img.preview");
  note("image", "#messages figure.image img");
}).observe(document, { childList: true, subtree: true });
"""


# -- servers and the browser -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                            backend="reference", progress=False)
    sched = BatchedScheduler(pipe, observer=Recorder(), warmup=False)
    with LiveServer(create_app(sched, ServeConfig(model_name="tiny"))) as srv:
        assert sched.wait_ready(60), sched.health()
        srv.sched = sched
        yield srv


@pytest.fixture(scope="module")
def stub_server(tiny_ckpt):
    """Answers XSS_ANSWER, an image, XSS_ANSWER again (and so on); needs KEY; one queue place."""
    from dreamllm_fast.checkpoint import load_tokenizer
    from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
    from dreamllm_fast.devtools.stub import StubModel

    tok = load_tokenizer(tiny_ckpt)
    ids = tok.encode(XSS_ANSWER, add_special_tokens=False)
    model = StubModel(DreamLLMConfig.from_name("tiny"), SpecialTokens.from_tokenizer(tok), ids,
                      dream_every=len(ids))
    sched = BatchedScheduler(DreamLLMPipeline(model, tok, progress=False), warmup=False, observer=Recorder(),
                             max_queue=1, max_batch=1)
    with LiveServer(create_app(sched, ServeConfig(model_name="stub", api_key=KEY))) as srv:
        assert sched.wait_ready(60), sched.health()
        srv.sched, srv.answer_tokens = sched, len(ids)
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    d = Path(os.environ.get("DREAMLLM_WEBUI_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


class UI:
    """One page in a fresh context, with its console errors and the API requests it made."""

    def __init__(self, browser, url, width=1280, height=800):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.url = url
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("request", lambda r: "/v1/" in r.url and self.requests.append(r))
        self.page.add_init_script(WATCH)

    def open(self):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready='1']")
        return self

    def settings(self, **values):
        p = self.page
        p.click("#toggle-settings")
        for k, v in values.items():
            if k == "images":
                p.set_checked("#s-images", v)
            else:
                p.fill("#s-" + k.replace("_", "-"), str(v))
        p.click("#close-settings")

    def send(self, text):
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_done(self, timeout=120):
        self.page.wait_for_selector("#send:not([hidden])", timeout=timeout * 1000)

    def answer(self):
        return self.page.locator("#messages article.assistant").last

    def bodies(self, path):
        return [json.loads(r.post_data) for r in self.requests if r.url.endswith(path)]

    def check_console(self, *allowed_status):
        """No console error, no uncaught exception, except a failed request with an allowed status."""
        ok = re.compile(r"Failed to load resource: the server responded with a status of (%s)"
                        % "|".join(map(str, allowed_status))) if allowed_status else None
        bad = [e for e in self.errors if not (ok and ok.search(e))]
        assert not bad, bad

    def close(self):
        self.context.close()


@pytest.fixture
def ui(browser, request):
    made = []

    def make(server, init=None, **kw):
        u = UI(browser, server.url, **kw)
        made.append(u)
        if init:
            u.page.add_init_script(init)
        return u.open()

    yield make
    for u in made:
        u.close()


def slots_used(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^dreamllm_kv_slots_used\{[^}]*\} (\S+)$", text, re.M).group(1))


# -- the tiny model --------------------------------------------------------------------------------
def test_interleaved_answer_draws_live_then_survives_a_reload(tiny_server, ui, shots):
    u = ui(tiny_server)
    p = u.page
    u.settings(max_tokens=75, temperature=0, seed=5, steps=16)
    # the worker pauses after the image's 5th U-Net step (previews came at steps 2 and 4) until
    # the page has been looked at: a tiny U-Net step takes milliseconds
    sched, held, gate, diffusing = tiny_server.sched, threading.Event(), threading.Event(), [0]

    def hold(s):
        if any(ph == "diffuse" for _, _, ph in s.phases()):
            diffusing[0] += 1
            if diffusing[0] == 5:  # at the start of an iteration: 5 steps done
                held.set()
                gate.wait(60)

    sched.observer.on_iteration = hold
    try:
        u.send(SKY)
        assert held.wait(120), "the image never started"
        p.wait_for_selector("#messages figure.drawing img.preview")
        p.wait_for_function("() => document.querySelector('figure.drawing figcaption span')"
                            ".textContent === 'Drawing: step 5 of 16'")
        assert p.locator("figure.drawing progress").evaluate("e => [e.value, e.max]") == [5, 16]
        assert not p.locator("#messages figure.image").count()
        p.screenshot(path=str(shots / "webui-drawing.png"))
    finally:
        sched.observer.on_iteration = None
        gate.set()
    u.wait_done()
    assert p.evaluate("window.__seen") == ["progress", "preview", "image"]
    body = u.bodies("/v1/chat/completions")[-1]
    assert body["modalities"] == ["text", "image"] and body["stream"] is True  # on by default
    assert body["num_inference_steps"] == 16 and body["temperature"] == 0 and body["seed"] == 5
    kinds = u.answer().evaluate("a => [...a.children].map(c => c.className)")
    assert kinds == ["md", "image", "md", "tools"], kinds  # the image sits between the two texts
    texts = u.answer().locator(".md").all_inner_texts()
    assert all(t.strip() for t in texts)
    assert u.answer().locator("figure.image img").get_attribute("src").startswith("data:image/png;base64,")
    assert u.answer().locator("a.download").get_attribute("download").endswith(".png")
    assert not p.locator("#messages figure.drawing").count()
    p.screenshot(path=str(shots / "webui-interleaved.png"))
    p.set_viewport_size({"width": 390, "height": 844})
    p.screenshot(path=str(shots / "webui-phone.png"))
    assert p.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    p.set_viewport_size({"width": 1280, "height": 800})
    # a follow-up sends the whole turn back, its generated image included, in order
    u.settings(images=False, max_tokens=3)
    u.send("And at night?")
    u.wait_done()
    assert not p.locator("#messages .error").count()
    prior = u.bodies("/v1/chat/completions")[-1]["messages"]
    assert [m["role"] for m in prior] == ["user", "assistant", "user"]
    assert [c["type"] for c in prior[1]["content"]] == ["text", "image_url", "text"]
    box = p.locator("#composer").bounding_box()  # the conversation scrolls, the box stays
    assert box["y"] + box["height"] <= 800 and p.evaluate("() => window.scrollY") == 0
    p.click("#toggle-settings")
    p.screenshot(path=str(shots / "webui-desktop.png"))
    p.keyboard.press("Escape")  # closes the settings
    assert p.is_hidden("#settings")

    before = p.inner_text("#messages")
    p.reload()
    p.wait_for_selector("body[data-ready='1']")
    assert p.inner_text("#messages") == before  # the conversation is kept in the browser
    assert p.locator("#messages figure.image img").count() == 1
    assert p.input_value("#s-steps") == "16" and p.input_value("#s-max-tokens") == "3"  # and so are the settings
    # conversations: new, switch, delete
    p.click("#new-chat")
    assert p.locator("#messages article").count() == 0
    assert p.locator("#conversations li").count() == 2
    p.click("#conversations li:has-text('Tell me about the sky') button.open")
    assert p.inner_text("#messages") == before
    p.click("#conversations li:has-text('Tell me about the sky') button.delete")
    assert p.locator("#conversations li:has-text('Tell me about the sky')").count() == 0
    p.reload()
    p.wait_for_selector("body[data-ready='1']")
    assert "Tell me about the sky" not in p.inner_text("#sidebar")
    u.check_console()


def test_stop_aborts_and_frees_the_kv_slot(tiny_server, ui):
    u = ui(tiny_server)
    u.settings(max_tokens=75, temperature=0, seed=5, steps=500)
    u.send(SKY)
    u.page.wait_for_selector("#messages figure.drawing progress", timeout=120_000)
    assert slots_used(tiny_server) == 1  # the sequence holds its slot while its image draws
    u.page.keyboard.press("Escape")
    u.page.wait_for_selector("#messages article.assistant .stopped")
    wait_until(lambda: slots_used(tiny_server) == 0, 30, "the slot to come back (/metrics)")
    wait_until(lambda: not tiny_server.sched.phases(), 30, "the request to leave the scheduler")
    assert u.page.is_visible("#send") and not u.page.is_visible("#stop")
    u.check_console()


def test_images_attached_by_picker_drop_and_paste_are_sent(tiny_server, ui):
    u = ui(tiny_server)
    p = u.page
    pngs = [encode(scene(96, 72, hue=h)) for h in (0, 40, 80)]
    p.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": pngs[0]}])
    drop = """([b64, kind]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "x.png", { type: "image/png" }));
        const target = kind === "drop" ? document.getElementById("composer") : document.getElementById("prompt");
        target.dispatchEvent(kind === "drop" ? new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })
                                             : new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
    }"""
    p.evaluate(drop, [base64.b64encode(pngs[1]).decode(), "drop"])
    p.evaluate(drop, [base64.b64encode(pngs[2]).decode(), "paste"])
    p.set_input_files("#file", files=[{"name": "a.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}])
    p.wait_for_function("() => document.querySelectorAll('#attachments img').length === 3")
    assert "not a PNG or JPEG" in p.inner_text("#notice")
    u.settings(images=False, max_tokens=4, temperature=0)
    u.send("What is in these pictures?")
    u.wait_done()
    assert not p.locator(".error").count()
    assert p.locator("#messages article.user .thumbs img").count() == 3
    assert p.locator("#attachments img").count() == 0
    assert u.answer().locator(".md").inner_text().strip()
    body = u.bodies("/v1/chat/completions")[-1]
    assert "modalities" not in body
    content = body["messages"][-1]["content"]
    urls = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
    assert sorted(urls) == sorted("data:image/png;base64," + base64.b64encode(b).decode() for b in pngs)
    assert content[-1] == {"type": "text", "text": "What is in these pictures?"}
    u.check_console()


def test_draw_mode_calls_the_images_route(tiny_server, ui):
    u = ui(tiny_server)
    p = u.page
    u.settings(steps=2, guidance=3, seed=7)
    p.click("label[for=mode-draw]")
    assert p.is_visible("#draw-options") and p.inner_text("#send") == "Draw"
    p.fill("#draw-negative", "blurry")
    p.fill("#draw-n", "2")
    u.send("a red fox in the snow")
    u.wait_done()
    imgs = u.answer().locator("figure.image img")
    assert imgs.count() == 2
    body = u.bodies("/v1/images/generations")[-1]
    want = {"prompt": "a red fox in the snow", "n": 2, "negative_prompt": "blurry",
            "num_inference_steps": 2, "guidance_scale": 3, "seed": 7}
    assert body == want
    direct = httpx.post(tiny_server.url + "/v1/images/generations", json=want, timeout=120).json()
    assert [imgs.nth(i).get_attribute("src") for i in range(2)] == \
        ["data:image/png;base64," + d["b64_json"] for d in direct["data"]]
    u.check_console()


def test_full_storage_drops_the_oldest_images_first(tiny_server, ui):
    """localStorage holds a few MB: here it takes 1.5 drawn images; the older one gives way."""
    full = """
      const set = Storage.prototype.setItem;
      Storage.prototype.setItem = function (k, v) {
        if (k === "dreamllm.conversations" && v.length > 1.5 * (window.__imageChars || 1e9))
          throw new DOMException("full", "QuotaExceededError");
        return set.call(this, k, v);
      };
    """
    u = ui(tiny_server, init=full)
    p = u.page
    u.settings(steps=1, seed=1)
    p.click("label[for=mode-draw]")
    u.send("first")
    u.wait_done()
    first = u.answer().locator("figure.image img").get_attribute("src")
    p.evaluate("n => { window.__imageChars = n; }", len(first))
    u.send("second")
    u.wait_done()
    assert "1 older image(s) were not kept" in p.inner_text("#notice")
    p.reload()
    p.wait_for_selector("body[data-ready='1']")
    figs = p.locator("#messages figure.image")
    assert figs.count() == 2
    assert "not kept" in figs.nth(0).inner_text() and figs.nth(0).locator("img").count() == 0
    assert figs.nth(1).locator("img").get_attribute("src").startswith("data:image/png;base64,")
    u.check_console()


def test_keyboard_shift_enter_is_a_new_line(tiny_server, ui):
    u = ui(tiny_server)
    p = u.page
    p.click("#prompt")
    p.keyboard.type("one")
    p.keyboard.press("Shift+Enter")
    p.keyboard.type("two")
    assert p.input_value("#prompt") == "one\ntwo"
    assert not u.requests and p.locator("#messages article").count() == 0
    # every control has an accessible name
    unnamed = p.evaluate("""() => [...document.querySelectorAll('button, input, textarea')]
        .filter(e => !e.closest('[hidden]') && !(e.labels?.length || e.getAttribute('aria-label') || e.textContent.trim()))
        .map(e => e.id || e.outerHTML)""")
    assert unnamed == []
    u.check_console()


def test_phone_width_conversations_open_and_close(tiny_server, ui):
    u = ui(tiny_server, width=390, height=844)
    p = u.page
    assert not p.is_visible("#new-chat")  # the list is off screen
    p.click("#toggle-sidebar")
    p.wait_for_selector("#new-chat", state="visible")
    p.click("#close-sidebar")
    p.wait_for_selector("#new-chat", state="hidden")
    p.click("#toggle-sidebar")
    p.wait_for_selector("#new-chat", state="visible")
    p.keyboard.press("Escape")
    p.wait_for_selector("#new-chat", state="hidden")
    assert p.evaluate("() => document.documentElement.scrollWidth") <= 390
    u.check_console()


# -- the stub: controlled answers ------------------------------------------------------------------
def test_markup_in_messages_and_answers_is_inert(stub_server, ui):
    u = ui(stub_server)
    p = u.page
    u.settings(api_key=KEY, max_tokens=2 * stub_server.answer_tokens + 1, steps=3)
    u.send(XSS_USER)
    u.wait_done()
    a = u.answer()
    assert not a.locator(".error").count()
    # the stub's answer came through: its text twice, its (gray) image between
    assert a.evaluate("a => [...a.children].map(c => c.className)") == ["md", "image", "md", "tools"]
    assert "<script>window.__xss='answer-script'</script>" in a.locator(".md").first.inner_text()
    user = p.locator("#messages article.user").inner_text()
    assert "<script>window.__xss='user-script'</script>" in user  # shown as text
    assert p.evaluate("window.__xss") is None  # nothing ran
    assert p.locator("#messages script, #messages img[src=x], #messages [onerror]").count() == 0
    assert p.locator("#messages a[href^='javascript']").count() == 0
    assert p.locator("#messages strong").count() == 2  # markdown itself still renders
    u.check_console()  # a blocked inline handler would log a CSP violation here


def test_401_is_shown_then_the_key_is_sent_as_a_bearer_header(stub_server, ui):
    u = ui(stub_server)
    p = u.page
    u.send("hello")
    u.wait_done()
    err = p.locator("#messages .error").inner_text()
    assert err.startswith("Error 401") and "API key" in err
    u.settings(api_key=KEY, max_tokens=3, images=False)
    u.send("hello again")
    u.wait_done()
    assert not u.answer().locator(".error").count() and u.answer().locator(".md").inner_text()
    sent = [r for r in u.requests if r.headers.get("authorization")]
    assert sent and all(r.headers["authorization"] == "Bearer " + KEY for r in sent)
    assert all(KEY not in r.url for r in u.requests)
    u.check_console(401)


def test_429_and_400_are_shown(stub_server, ui):
    u = ui(stub_server)
    p = u.page
    u.settings(api_key=KEY, max_tokens=3, images=False)
    sched = stub_server.sched
    entered, gate = threading.Event(), threading.Event()

    def hold(s):
        if s.phases():  # request A holds the only KV slot: stop before admitting anything else
            entered.set()
            gate.wait(30)

    # A takes the one slot, B the one queue place; the page's request is then refused with 429
    # (a request that a free slot would take at once is not refused: serving/worker.py _enqueue)
    sched.observer.on_iteration = hold
    out = {}
    # several tokens: A is still decoding when the next iteration starts
    body = {"model": "stub", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}

    def post(key):
        out[key] = httpx.post(stub_server.url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": "Bearer " + KEY})

    threads = [threading.Thread(target=post, args=("a",))]
    threads[0].start()
    try:
        assert entered.wait(30)  # A is admitted and the worker holds
        threads.append(threading.Thread(target=post, args=("b",)))
        threads[1].start()
        wait_until(lambda: sched.stats().queue_depth == 1, 30, "B to wait in the queue")
        u.send("am I in?")
        u.wait_done()
    finally:
        sched.observer.on_iteration = None
        gate.set()
        for t in threads:
            t.join(60)
    assert out["a"].status_code == 200 and out["b"].status_code == 200
    err = p.locator("#messages .error").inner_text()
    assert re.match(r"Error 429: the request queue is full.* retry in \d+ s\.$", err), err
    u.settings(top_p=5)
    u.send("bad settings")
    u.wait_done()
    err = u.answer().locator(".error").inner_text()
    assert err.startswith("Error 400: top_p"), err
    u.check_console(429, 400)


def test_503_while_the_model_is_not_ready(browser, ui):
    with LiveServer(create_app(None, ServeConfig(model_name="loading"))) as srv:
        u = ui(srv)
        u.send("are you there?")
        u.wait_done()
        err = u.page.locator("#messages .error").inner_text()
        assert err.startswith("Error 503") and "retry in 5 s" in err, err
        u.check_console(503)
