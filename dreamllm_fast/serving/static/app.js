// The chat page of `dreamllm-fast serve` (served by dreamllm_fast/serving/webui.py).
// Plain ES modules, no build step. Every piece of text (the user's and the model's) is rendered
// as markdown by marked and sanitized by DOMPurify before it reaches the DOM; everything else is
// built with textContent and attributes. Conversations and settings live in localStorage.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const STORE = { convs: "dreamllm.conversations", current: "dreamllm.current", settings: "dreamllm.settings" };
const MAX_IMAGES = 8; // the server's default --max-images per request (media.py MediaLimits)
const SETTINGS = ["api-key", "system", "max-tokens", "temperature", "top-p", "top-k", "seed", "steps", "guidance"];
const $ = (id) => document.getElementById(id);

// -- markdown ----------------------------------------------------------------------------------
// Raw HTML in the text is shown as text, not parsed (a user asking about HTML sees their HTML);
// DOMPurify then cleans what markdown itself produces.
const escapeHtml = (t) => t.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
marked.use({ gfm: true, breaks: true, renderer: { html: (token) => escapeHtml(token.text) } });
// Images inside markdown are dropped (the model's images arrive as their own parts); links open
// in a new tab without the opener.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});
const PURIFY = { FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "svg", "math"], USE_PROFILES: { html: true } };

function markdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text || ""), PURIFY);
}

// -- state ---------------------------------------------------------------------------------------
let convs = load(STORE.convs, []);
let currentId = localStorage.getItem(STORE.current);
let attachments = []; // data URLs
let running = null; // {controller, conv, msg}
let modelId = null; // the server's model name (GET /v1/models), fetched on first use

function load(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  // localStorage holds a few MB per origin: when full, the oldest images give way, one at a time
  let dropped = 0;
  for (;;) {
    try {
      localStorage.setItem(STORE.convs, JSON.stringify(convs));
      if (currentId) localStorage.setItem(STORE.current, currentId);
      if (dropped) notice(`This browser's storage was full: ${dropped} older image(s) were not kept.`);
      return;
    } catch (e) {
      if (!dropOldestImage()) {
        notice("This browser's storage is full: delete old conversations to keep new ones.");
        return;
      }
      dropped++;
    }
  }
}

function dropOldestImage() {
  for (let i = convs.length - 1; i >= 0; i--) { // convs[0] is the newest
    for (const m of convs[i].messages) {
      if (m.images?.length) {
        m.images = [];
        return true;
      }
      const p = (m.parts || []).find((x) => x.type === "image" && x.url);
      if (p) {
        p.url = null;
        return true;
      }
    }
  }
  return false;
}

function current() {
  let c = convs.find((x) => x.id === currentId);
  if (!c) {
    c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat", messages: [] };
    convs.unshift(c);
    currentId = c.id;
  }
  return c;
}

function notice(text) {
  $("notice").textContent = text;
}

// -- settings ------------------------------------------------------------------------------------
function loadSettings() {
  const s = load(STORE.settings, {});
  for (const k of SETTINGS) if (s[k] !== undefined) $("s-" + k).value = s[k];
  if (s.images !== undefined) $("s-images").checked = s.images;
}

function saveSettings() {
  const s = { images: $("s-images").checked };
  for (const k of SETTINGS) s[k] = $("s-" + k).value;
  localStorage.setItem(STORE.settings, JSON.stringify(s));
}

function num(id, int = false) {
  const v = $(id).value.trim();
  if (v === "") return undefined;
  const x = int ? parseInt(v, 10) : parseFloat(v);
  return Number.isFinite(x) ? x : undefined;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("s-api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key; // a header, never the URL
  return h;
}

// -- rendering -----------------------------------------------------------------------------------
function renderSidebar() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of convs) {
    const li = document.createElement("li");
    if (c.id === currentId) li.className = "active";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = c.title;
    open.setAttribute("aria-current", c.id === currentId ? "true" : "false");
    open.addEventListener("click", () => switchTo(c.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u00d7";
    del.setAttribute("aria-label", "Delete conversation " + c.title);
    del.addEventListener("click", () => remove(c.id));
    li.append(open, del);
    ul.append(li);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...current().messages.map(messageEl));
  if (!current().messages.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "Ask anything. Answers can contain images, drawn while you watch; Draw mode makes images from a prompt.";
    box.append(p);
  }
  box.scrollTop = box.scrollHeight;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function imageFigure(url, i) {
  const fig = document.createElement("figure");
  fig.className = "image";
  if (!url) {
    fig.classList.add("dropped");
    fig.textContent = "Image not kept: this browser's storage was full.";
    return fig;
  }
  const img = document.createElement("img");
  img.src = url; // a data: URL from the server or the user's own file
  img.alt = "generated image " + (i + 1);
  const a = document.createElement("a");
  a.href = url;
  a.download = "dreamllm-" + (i + 1) + ".png";
  a.textContent = "Download";
  a.className = "download";
  fig.append(img, a);
  return fig;
}

function progressFigure(p) {
  const fig = document.createElement("figure");
  fig.className = "drawing";
  if (p.preview) {
    const img = document.createElement("img");
    img.src = p.preview;
    img.alt = "preview of the image being drawn";
    img.className = "preview";
    fig.append(img);
  } else {
    const ph = document.createElement("div");
    ph.className = "placeholder";
    fig.append(ph);
  }
  const cap = document.createElement("figcaption");
  const bar = document.createElement("progress");
  bar.max = p.steps;
  bar.value = p.step;
  bar.setAttribute("aria-label", "image progress");
  const t = document.createElement("span");
  t.textContent = p.steps ? `Drawing: step ${p.step} of ${p.steps}` : "Drawing\u2026";
  cap.append(bar, t);
  fig.append(cap);
  return fig;
}

function messageEl(m) {
  const div = document.createElement("article");
  div.className = "msg " + m.role;
  div.setAttribute("aria-label", m.role === "user" ? "You" : "Assistant");
  if (m.role === "user") {
    const body = document.createElement("div");
    body.className = "md";
    markdown(body, m.text);
    if (m.images?.length) {
      const row = document.createElement("div");
      row.className = "thumbs";
      for (const url of m.images) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = "attached image";
        row.append(img);
      }
      div.append(row);
    }
    div.append(body);
  } else {
    let imageNo = 0;
    for (const p of m.parts) {
      if (p.type === "text") {
        const body = document.createElement("div");
        body.className = "md";
        markdown(body, p.text);
        div.append(body);
      } else if (p.type === "image") {
        div.append(imageFigure(p.url, imageNo++));
      } else if (p.type === "progress") {
        div.append(progressFigure(p));
      }
    }
    if (m.error) {
      const e = document.createElement("div");
      e.className = "error";
      e.setAttribute("role", "alert");
      e.textContent = m.error;
      div.append(e);
    }
    if (m.stopped) {
      const s = document.createElement("p");
      s.className = "stopped";
      s.textContent = "Stopped.";
      div.append(s);
    }
  }
  const tools = document.createElement("div");
  tools.className = "tools";
  const text = m.role === "user" ? m.text : m.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
  if (text) {
    tools.append(button("Copy", "Copy text", async (ev) => {
      try {
        await navigator.clipboard.writeText(text);
        ev.target.textContent = "Copied";
      } catch {
        ev.target.textContent = "Copy failed";
      }
    }));
  }
  div.append(tools);
  return div;
}

let frame = 0;
function renderLive(msg, el) {
  // re-render the streaming message at most once per frame
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    if (!el.current.isConnected) { // the list was rebuilt (another conversation deleted)
      if (currentId !== running?.conv.id) return;
      el.current = box.lastElementChild;
    }
    const fresh = messageEl(msg);
    el.current.replaceWith(fresh);
    el.current = fresh;
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function render() {
  renderSidebar();
  renderMessages();
}

// -- conversations -------------------------------------------------------------------------------
function switchTo(id) {
  if (running) stop();
  currentId = id;
  save();
  render();
  closeSidebarOnPhone();
}

function remove(id) {
  if (running && running.conv.id === id) stop();
  convs = convs.filter((c) => c.id !== id);
  if (currentId === id) currentId = convs[0]?.id ?? null;
  current();
  save();
  render();
}

function newChat() {
  if (running) stop();
  const c = current();
  if (c.messages.length) {
    currentId = null;
    current();
  }
  save();
  render();
  closeSidebarOnPhone();
  $("prompt").focus();
}

// -- attachments ---------------------------------------------------------------------------------
function addFiles(files) {
  for (const f of files) {
    if (f.type !== "image/png" && f.type !== "image/jpeg") {
      notice(`${f.name || "That file"} is not a PNG or JPEG image; only those can be attached.`);
      continue;
    }
    const r = new FileReader();
    r.onload = () => {
      attachments.push(r.result);
      renderAttachments();
    };
    r.readAsDataURL(f);
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attachments.forEach((url, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attachment " + (i + 1);
    fig.append(img, button("\u00d7", "Remove attachment " + (i + 1), () => {
      attachments.splice(i, 1);
      renderAttachments();
    }));
    box.append(fig);
  });
}

// -- talking to the server -----------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function check(resp) {
  if (resp.ok) return resp;
  let message = resp.statusText;
  try {
    message = (await resp.json()).error?.message || message;
  } catch {
    /* not JSON: keep the status text */
  }
  throw new HttpError(resp.status, message, resp.headers.get("Retry-After"));
}

function explain(e) {
  if (e instanceof HttpError) {
    const base = `Error ${e.status}: ${e.message}`;
    if (e.status === 401) return base + " \u2014 set the API key in Settings.";
    if (e.status === 429) return base + (e.retryAfter ? ` \u2014 retry in ${e.retryAfter} s.` : "");
    if (e.status === 503) return base + (e.retryAfter ? ` \u2014 the model is loading; retry in ${e.retryAfter} s.` : "");
    return base;
  }
  if (e instanceof TypeError && /fetch|network/i.test(e.message)) return "Could not reach the server: " + e.message;
  return "Error: " + (e.message || String(e));
}

async function model(signal) {
  if (modelId) return modelId;
  const r = await check(await fetch("/v1/models", { headers: headers(), signal }));
  modelId = (await r.json()).data[0].id;
  return modelId;
}

function history(conv) {
  // user/assistant pairs of chat turns that got an answer (roles must alternate), newest images kept
  const out = [];
  const msgs = conv.messages.slice(0, -1); // the last one is the answer being written
  for (let i = 0; i + 1 < msgs.length; i++) {
    const u = msgs[i], a = msgs[i + 1];
    if (u.role !== "user" || a.role !== "assistant" || u.mode === "draw" || !a.parts.length || a.error) continue;
    const parts = a.parts.filter((p) => p.type === "text" || (p.type === "image" && p.url));
    if (!parts.length) continue;
    out.push(userContent(u), { role: "assistant", content: parts.map(wirePart) });
    i++;
  }
  out.push(userContent(msgs[msgs.length - 1]));
  let budget = MAX_IMAGES;
  for (let i = out.length - 1; i >= 0; i--) {
    if (typeof out[i].content === "string") continue;
    out[i].content = out[i].content.filter((p) => p.type !== "image_url" || budget-- > 0);
  }
  const system = $("s-system").value.trim();
  if (system) out.unshift({ role: "system", content: system });
  return out;
}

function wirePart(p) {
  return p.type === "text" ? { type: "text", text: p.text } : { type: "image_url", image_url: { url: p.url } };
}

function userContent(u) {
  if (!u.images?.length) return { role: "user", content: u.text };
  return { role: "user", content: [...u.images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text: u.text }] };
}

function chatBody(conv, modelName) {
  const body = { model: modelName, messages: history(conv), stream: true };
  const put = (k, v) => { if (v !== undefined) body[k] = v; };
  put("max_tokens", num("s-max-tokens", true));
  put("temperature", num("s-temperature"));
  put("top_p", num("s-top-p"));
  put("top_k", num("s-top-k", true));
  put("seed", num("s-seed", true));
  if ($("s-images").checked) {
    body.modalities = ["text", "image"];
    put("num_inference_steps", num("s-steps", true));
    put("guidance_scale", num("s-guidance"));
  }
  return body;
}

function apply(msg, delta) {
  // one choice delta -> the message's parts (text appended, images in place, progress replaced)
  const last = msg.parts[msg.parts.length - 1];
  const pieces = typeof delta.content === "string" ? [{ type: "text", text: delta.content }] : (delta.content || []);
  for (const piece of pieces) {
    if (piece.type === "text" && piece.text) {
      const tail = msg.parts[msg.parts.length - 1];
      if (tail?.type === "text") tail.text += piece.text;
      else msg.parts.push({ type: "text", text: piece.text });
    } else if (piece.type === "image_url") {
      const tail = msg.parts[msg.parts.length - 1];
      const part = { type: "image", url: piece.image_url.url };
      if (tail?.type === "progress") msg.parts[msg.parts.length - 1] = part;
      else msg.parts.push(part);
    }
  }
  const p = delta.image_progress;
  if (p) {
    const keep = last?.type === "progress" ? last.preview : undefined;
    const part = { type: "progress", step: p.step, steps: p.steps, preview: p.preview || keep };
    if (last?.type === "progress" && msg.parts[msg.parts.length - 1] === last) msg.parts[msg.parts.length - 1] = part;
    else msg.parts.push(part);
  }
}

async function readStream(resp, msg, el) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new HttpError(obj.error.code === "model_not_ready" ? 503 : 500, obj.error.message);
        for (const c of obj.choices || []) if (c.index === 0) apply(msg, c.delta || {});
        renderLive(msg, el);
      }
    }
  }
}

async function send() {
  if (running) return;
  const text = $("prompt").value;
  const draw = $("mode-draw").checked;
  if (!text.trim() && !attachments.length) return;
  if (draw && !text.trim()) {
    notice("Draw mode needs a prompt.");
    return;
  }
  notice("");
  const conv = current();
  const user = { role: "user", text, images: draw ? [] : attachments, mode: draw ? "draw" : "chat" };
  conv.messages.push(user);
  if (conv.title === "New chat") conv.title = (text.trim() || "Image").slice(0, 40);
  const msg = { role: "assistant", parts: [], mode: user.mode };
  if (draw) msg.parts.push({ type: "progress", step: 0, steps: 0 });
  conv.messages.push(msg);
  $("prompt").value = "";
  attachments = [];
  renderAttachments();
  save();
  render();
  const el = { current: $("messages").lastElementChild };
  const controller = new AbortController();
  running = { controller, conv, msg };
  setRunning(true);
  try {
    const name = await model(controller.signal);
    if (draw) await drawImages(text, msg, controller.signal);
    else {
      const resp = await check(await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(chatBody(conv, name)), signal: controller.signal,
      }));
      await readStream(resp, msg, el);
    }
  } catch (e) {
    if (e.name === "AbortError") msg.stopped = true;
    else msg.error = explain(e);
    if (e instanceof HttpError && (e.status === 401 || e.status === 404)) modelId = null; // ask again
  } finally {
    msg.parts = msg.parts.filter((p) => p.type !== "progress");
    running = null;
    setRunning(false);
    save();
    if (currentId === conv.id) renderMessages();
    renderSidebar();
  }
}

async function drawImages(prompt, msg, signal) {
  const body = { prompt, n: num("draw-n", true) ?? 1 };
  const put = (k, v) => { if (v !== undefined && v !== "") body[k] = v; };
  put("negative_prompt", $("draw-negative").value.trim());
  put("num_inference_steps", num("s-steps", true));
  put("guidance_scale", num("s-guidance"));
  put("seed", num("s-seed", true));
  const resp = await check(await fetch("/v1/images/generations", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  }));
  const data = (await resp.json()).data;
  msg.parts = data.map((d) => ({ type: "image", url: "data:image/png;base64," + d.b64_json }));
}

function stop() {
  if (running) running.controller.abort();
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("busy", on);
}

// -- layout --------------------------------------------------------------------------------------
function closeSidebarOnPhone() {
  if (window.matchMedia("(max-width: 760px)").matches) {
    $("sidebar").classList.remove("open");
    $("toggle-sidebar").setAttribute("aria-expanded", "false");
  }
}

function setMode() {
  const draw = $("mode-draw").checked;
  $("draw-options").hidden = !draw;
  $("attach-label").hidden = draw;
  $("prompt").placeholder = draw ? "Describe an image" : "Message";
  $("send").textContent = draw ? "Draw" : "Send";
}

function init() {
  loadSettings();
  current();
  render();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      if (running) stop();
      else if (!$("settings").hidden) showSettings(false);
      else closeSidebarOnPhone();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("file").addEventListener("change", (e) => {
    addFiles(e.target.files);
    e.target.value = "";
  });
  const composer = $("composer");
  composer.addEventListener("dragover", (e) => {
    e.preventDefault();
    composer.classList.add("dragging");
  });
  composer.addEventListener("dragleave", () => composer.classList.remove("dragging"));
  composer.addEventListener("drop", (e) => {
    e.preventDefault();
    composer.classList.remove("dragging");
    addFiles(e.dataTransfer.files);
  });
  $("prompt").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", setMode);
  $("toggle-settings").addEventListener("click", () => showSettings($("settings").hidden));
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in a field, or Done: close the panel
    saveSettings();
    showSettings(false);
  });
  $("toggle-sidebar").addEventListener("click", () => {
    $("sidebar").classList.add("open");
    $("toggle-sidebar").setAttribute("aria-expanded", "true");
    $("new-chat").focus();
  });
  $("close-sidebar").addEventListener("click", () => {
    closeSidebarOnPhone();
    $("toggle-sidebar").focus();
  });
  for (const k of SETTINGS) $("s-" + k).addEventListener("change", saveSettings);
  $("s-images").addEventListener("change", saveSettings);
  $("s-api-key").addEventListener("change", () => { modelId = null; });
  setMode();
  document.body.dataset.ready = "1"; // the page's script ran (tests wait for it)
}

function showSettings(on) {
  $("settings").hidden = !on;
  $("toggle-settings").setAttribute("aria-expanded", String(on));
  if (on) $("s-api-key").focus();
}

init();
