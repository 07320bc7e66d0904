"""Load benchmark of `dreamllm-fast serve`: N concurrent streaming clients on 127.0.0.1.

    python -m benchmarks.bench_serve [--checkpoint DIR] [--schedulers sequential,batched]
        [--clients 8] [--requests 64] [--duration 120] [--max-tokens 32] [--mix chat,vision]
        [--out DIR] [-- extra serve flags]

For each scheduler it starts its own server process (`dreamllm-fast serve --port 0`), waits for
/health, sends one warm-up request, then runs the load: `--clients` clients, each sending streamed
chat requests one after another until `--requests` were sent or `--duration` seconds passed (it
stops by itself; a request in flight gets the same bound). It reports requests/s, generated
tokens/s (the servers' usage counts over wall time), p50/p99 time to first token and latency,
errors (must be 0), KV slots free afterwards (from /metrics: all of them), and the server's
resident memory before and after (should stay flat). Several schedulers run one after the other on
the same load, side by side in one table. With no checkpoint it uses the embedded tiny model;
`--url` (and `--pid` for its memory) loads a server that is already running instead.

Not a test: no assertion on time. Numbers are only comparable on the same machine in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

MIXES = ("chat", "vision", "t2i", "interleaved")


def _percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:  # not Linux: psutil when installed
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


def _png_data_url() -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 240), (120, 170, 235))
    ImageDraw.Draw(im).ellipse([230, 30, 290, 90], fill=(250, 220, 60))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """`dreamllm-fast serve` in a child process on a free 127.0.0.1 port."""

    def __init__(self, args, scheduler: str):
        cmd = [sys.executable, "-m", "dreamllm_fast.cli", "serve", "--port", "0",
               "--scheduler", scheduler, "--max-queue", str(max(64, 2 * args.clients)),
               "--log-level", "warning", "--model-name", "bench"]
        for flag in ("checkpoint", "device", "dtype", "backend"):
            if getattr(args, flag):
                cmd += [f"--{flag}", str(getattr(args, flag))]
        cmd += args.serve_args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid, self.api_key, self.url = self.proc.pid, args.api_key, None
        deadline = time.monotonic() + args.startup_timeout
        lines = []
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {scheduler} server exited: {''.join(lines)[-2000:]}")
            lines.append(line)
            m = re.search(r"on (http://\S+) \(", line)
            if m:
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not print its address in time")
        import threading

        threading.Thread(target=self._drain, daemon=True).start()  # keep the pipe from filling
        self._wait_ready(deadline)

    def _drain(self):
        for _ in self.proc.stdout:
            pass

    def _wait_ready(self, deadline):
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in time")
            time.sleep(0.2)

    def metrics(self) -> dict:
        """The scheduler gauges of /metrics (lines like `dreamllm_x{scheduler="s"} 1.0`)."""
        import httpx

        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        text = httpx.get(self.url + "/metrics", timeout=10, headers=h).text
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'^(dreamllm_\w+)\{scheduler="[^"]*"\} (\S+)$', text, re.M)}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _request(kind: str, i: int, args, image_url: str, model: str) -> tuple[str, dict]:
    text = f"Request {i}: describe a small house by a lake."
    if kind == "t2i":
        return "/v1/images/generations", {"model": model, "prompt": text, "size": args.t2i_size,
                                          "num_inference_steps": args.steps, "seed": i}
    content = text if kind != "vision" else [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": text}]
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if kind == "interleaved":
        body.update(modalities=["text", "image"], num_inference_steps=args.steps, max_images=1)
    return "/v1/chat/completions", body


async def _one(client, url, path, body, timeout) -> dict:
    t0 = time.perf_counter()
    res = {"ok": False, "ttft": None, "latency": None, "tokens": 0, "error": None}
    try:
        if not body.get("stream"):
            r = await client.post(url + path, json=body, timeout=timeout)
            res["ttft"] = res["latency"] = time.perf_counter() - t0
            res["ok"] = r.status_code == 200
            res["error"] = None if res["ok"] else f"HTTP {r.status_code}: {r.text[:200]}"
            return res
        async with client.stream("POST", url + path, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res["error"] = ev["error"]["message"]
                    return res
                if ev.get("usage"):
                    res["tokens"] = ev["usage"]["completion_tokens"]
                for c in ev.get("choices", []):
                    if c["delta"].get("content") and res["ttft"] is None:
                        res["ttft"] = time.perf_counter() - t0
        res["latency"] = time.perf_counter() - t0
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - counted as an error
        res["error"] = f"{type(e).__name__}: {e}"
    return res


async def _load(url: str, args) -> tuple[list[dict], float]:
    import httpx

    image_url = _png_data_url()
    mix = args.mix.split(",")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    counter = iter(range(args.requests))
    results: list[dict] = []
    t_end = time.perf_counter() + args.duration

    async def worker(client):
        for i in counter:
            if time.perf_counter() > t_end:
                return
            path, body = _request(mix[i % len(mix)], i, args, image_url, model)
            left = max(1.0, t_end - time.perf_counter())
            results.append(await _one(client, url, path, body, left))

    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(limits=limits, trust_env=False, headers=headers) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.clients)))
        return results, time.perf_counter() - t0


class Running(Server):
    """A server that is already up (--url); its memory is read only when --pid names it."""

    def __init__(self, url: str, pid=None, api_key=None):
        self.url, self.pid, self.api_key = url.rstrip("/"), pid, api_key

    def stop(self):
        pass


def run_one(args, scheduler: str) -> dict:
    if args.url:
        server = Running(args.url, args.pid, args.api_key)
    else:
        server = Server(args, scheduler)
    rss = (lambda: _rss_mb(server.pid)) if server.pid else (lambda: float("nan"))  # noqa: E731
    try:
        asyncio.run(_load(server.url, argparse.Namespace(**{**vars(args), "requests": 1,
                                                            "clients": 1, "mix": "chat"})))
        rss_before = rss()
        results, wall = asyncio.run(_load(server.url, args))
        time.sleep(0.5)  # let a cancelled stream (if any) release its slot
        m = server.metrics()
        if args.url:  # the running server says which scheduler it has
            import httpx

            scheduler = httpx.get(server.url + "/health", timeout=10).json().get("scheduler", "?")
        rss_after = rss()
    finally:
        server.stop()
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    lat = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    total = m.get("dreamllm_kv_slots_total", float("nan"))
    return {
        "scheduler": scheduler, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "first_errors": errors[:3], "wall_s": wall, "requests_per_s": len(ok) / wall,
        "tokens": tokens, "tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
        "latency_p50_s": _percentile(lat, 50), "latency_p99_s": _percentile(lat, 99),
        "kv_slots_free_after": total - m.get("dreamllm_kv_slots_used", float("nan")),
        "kv_slots_total": total, "queue_depth_after": m.get("dreamllm_queue_depth"),
        "rss_before_mb": rss_before, "rss_after_mb": rss_after,
    }


def _env(args) -> dict:
    import torch

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        sha = ""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": sha, "device": dev,
            "python": platform.python_version(), "torch": torch.__version__,
            "checkpoint": args.checkpoint or "embedded tiny", "clients": args.clients,
            "requests": args.requests, "duration_s": args.duration, "max_tokens": args.max_tokens,
            "mix": args.mix}


def table(rows: list[dict]) -> str:
    cols = [("scheduler", "{}"), ("ok", "{}"), ("errors", "{}"), ("requests_per_s", "{:.2f}"),
            ("tokens_per_s", "{:.1f}"), ("ttft_p50_s", "{:.3f}"), ("ttft_p99_s", "{:.3f}"),
            ("latency_p50_s", "{:.3f}"), ("latency_p99_s", "{:.3f}"),
            ("kv_slots_free_after", "{:.0f}"), ("kv_slots_total", "{:.0f}"),
            ("rss_before_mb", "{:.0f}"), ("rss_after_mb", "{:.0f}")]
    out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", "-c", default=None, help="default: the embedded tiny model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", default=None, choices=("reference", "engine"))
    p.add_argument("--schedulers", default="sequential,batched",
                   help="comma-separated schedulers to compare under the same load")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64, help="requests in all (a bound)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds (a bound)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--mix", default="chat", help=f"request kinds, round-robin: {','.join(MIXES)}")
    p.add_argument("--steps", type=int, default=4, help="DDPM steps of t2i/interleaved requests")
    p.add_argument("--t2i-size", default="auto")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="directory for bench_serve.json and .md")
    p.add_argument("--url", default=None,
                   help="load a server that is already running instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: its process id, for RSS")
    p.add_argument("--api-key", default=os.environ.get("DREAMLLM_API_KEY"),
                   help="bearer key of that server (default: $DREAMLLM_API_KEY)")
    p.add_argument("serve_args", nargs="*", help="after --: extra flags for `dreamllm-fast serve`")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bad = [k for k in args.mix.split(",") if k not in MIXES]
    if bad:
        print(f"error: unknown --mix kind(s) {bad}; choose from {MIXES}", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    if args.url:  # one server, already running: its /health names its scheduler
        names = names[:1]
    rows = [run_one(args, s) for s in names]
    report = {"env": _env(args), "results": rows}
    md = table(rows)
    print(json.dumps(report["env"]))
    print(md)
    for r in rows:
        if r["errors"]:
            print(f"{r['scheduler']}: {r['errors']} errors, e.g. {r['first_errors']}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_serve.json").write_text(json.dumps(report, indent=2))
        (out / "bench_serve.md").write_text(md + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
