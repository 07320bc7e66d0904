"""How far one chat request travels through the code: the files of this repository on its way from
the HTTP route down to the decode-attention kernel, measured rather than counted by hand.

What "the path" is. Only calls in progress count: the chain of Python frames that are active at
two moments, not the calls that already returned along the way.

1. Route side, on the event loop: the stack at the moment the request is put on the scheduler's
   queue, from the route handler (`chat_completions` in dreamllm_fast/serving/app.py) down to the
   frame that appends to the queue. The ASGI middleware above the handler is left out (the JSON
   lists it under ``above_route``).
2. Worker side, on the scheduler's worker thread: the stack at the moment the decode-attention
   kernel is entered for one of that request's decode steps, from the thread's entry down to the
   function the dispatcher (kernels/dispatch.py; kernels/__init__.py at older commits) called:
   the Triton launcher in kernels/decode_attention.py, or the torch oracle
   ``decode_attention_ref`` in kernels/reference.py when Triton does not run (CPU tensors). This
   is the eager step, the same Python a CUDA graph captures on a GPU (there the step replays the
   captured graph, and no Python frame launches the kernel). Only a stack that passes through the
   decode loop (dreamllm_fast/decoding.py), taken after the request was queued and outside any
   import, counts: the prompt's prefill runs append_attention, and the scheduler is built without
   warm-up.

The two stacks are joined (route side first) and reduced to frames in files of this repository
(dreamllm_fast/, kernels/, export/); the standard library, site-packages (starlette, fastapi,
anyio, torch, triton, ...) and this tool are dropped. Consecutive frames in one file make one step
of the path. Reported: the steps in order (repository-relative file, the functions active in it),
the number of distinct files, the number of moves (changes of file from one frame to the next: the
steps minus one) and the number of returns (a step into a file the path had already left). The
worker side starting in the file where the route side ended (the queue's file also holds the
worker's loop) is therefore no move.

How it runs: a tiny random checkpoint (dreamllm_fast/tiny.py; ``--checkpoint`` to reuse one), the
engine backend on the CPU in fp32, the batched scheduler, the FastAPI app in process behind
starlette's TestClient, ONE non-streaming greedy chat request of 3 tokens. The queue is observed
by replacing the scheduler's ``_queue`` deque with a recording subclass, the kernel entry by a
trace function on the threads the app starts (``threading.settrace``, 'call' events only); no
production code changes. It needs the serving extra (``pip install -e ".[serve]"``).

    python -m dreamllm_fast.devtools.request_path            # the CPU reference kernel
    python -m dreamllm_fast.devtools.request_path --triton   # the Triton launcher (interpreter)
    python -m dreamllm_fast.devtools.request_path --json
    python -m dreamllm_fast.devtools.request_path --root ../older-checkout   # another tree

``--triton`` runs the measurement in a child process with TRITON_INTERPRET=1 and
DREAMLLM_KERNELS=triton set before anything imports Triton, so the worker side ends in
kernels/decode_attention.py as it does on a GPU. ``--root DIR`` measures the checkout at DIR (its
dreamllm_fast/, kernels/ and export/, whatever this interpreter has installed) in a child process;
the tool reads only the serving API that older commits share (create_app, ServeConfig,
BatchedScheduler, DreamLLMPipeline.from_pretrained, tiny.make_tiny). This file imports the package
only inside functions, so it also runs as a plain script.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import Optional, Sequence

ROUTE = "/v1/chat/completions"
MAX_TOKENS = 3
PACKAGES = (("dreamllm_fast.kernels", "kernels"), ("dreamllm_fast.export", "export"),
            ("dreamllm_fast", "dreamllm_fast"))  # nested installs: the kernels and export dirs first
DECODE_LOOP = "dreamllm_fast/decoding.py"
TRITON_KERNEL = "kernels/decode_attention.py"
REF_KERNEL = ("kernels/reference.py", "decode_attention_ref")
_THIS = os.path.realpath(__file__)


# -- the path: pure functions over (file, function) frames ------------------------------------------
def summarize(route: Sequence[tuple[str, str]], worker: Sequence[tuple[str, str]]) -> dict:
    """Join the route-side and worker-side frames (repository-relative file, function; outermost
    first), collapse consecutive frames of one file and count files, moves and returns. The step
    where the worker's frames begin is the report's ``worker_from``; that step's own
    ``worker_from`` is the position in its ``functions`` of the worker's first frame."""
    steps: list[dict] = []
    worker_from = None
    for side, frames in (("route", route), ("worker", worker)):
        for i, (path, func) in enumerate(frames):
            if not steps or steps[-1]["file"] != path:
                steps.append({"index": len(steps) + 1, "file": path, "functions": []})
            if side == "worker" and i == 0:  # where the worker thread's frames begin
                worker_from = steps[-1]["index"]
                steps[-1]["worker_from"] = len(steps[-1]["functions"])
            steps[-1]["functions"].append(func)
    seen, returns = set(), 0
    for s in steps:
        returns += s["file"] in seen
        seen.add(s["file"])
    return {"path": steps, "files": len(seen), "moves": max(0, len(steps) - 1), "returns": returns,
            "worker_from": worker_from}


def format_report(rep: dict) -> str:
    width = max(len(s["file"]) for s in rep["path"])
    lines = [f"one chat request ({ROUTE}, {rep['max_tokens']} greedy tokens, non-streaming) "
             f"from the route to the decode-attention kernel"]
    if rep.get("commit"):
        lines[0] += f" at {rep['commit']}"
    lines.append(f"kernel entered: {rep['kernel']} ({rep['kernel_file']}:{rep['kernel_function']})")
    for s in rep["path"]:
        funcs, mark = s["functions"], ""
        if s["index"] == rep["worker_from"]:
            k = s["worker_from"]
            funcs = funcs[:k] + [f"|| {funcs[k]}"] + funcs[k + 1:] if k else funcs
            mark = "  (worker thread from " + ("||)" if k else "here)")
        lines.append(f"{s['index']:>3}  {s['file']:<{width}}  {', '.join(funcs)}{mark}")
    lines.append(f"files: {rep['files']}  moves: {rep['moves']}  returns: {rep['returns']}")
    return "\n".join(lines)


# -- capture ------------------------------------------------------------------------------------------
class _Dirs:
    """Maps a code object's file to its repository-relative path, or None outside the repository."""

    def __init__(self):
        import importlib.util

        self.roots = []
        for mod, prefix in PACKAGES:
            spec = importlib.util.find_spec(mod)
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError(f"cannot locate the package {mod}: install the checkout "
                                   f"(pip install -e .) or pass --root")
            found = list(spec.submodule_search_locations)[0]
            self.roots.append((os.path.realpath(found), prefix, found))
        self._cache: dict = {}

    def filenames(self, rel: str) -> set:
        """The spellings a code object's ``co_filename`` may have for the repository file `rel`."""
        out = set()
        for root, prefix, found in self.roots:
            if rel.startswith(prefix + "/"):
                sub = rel[len(prefix) + 1:].split("/")
                out |= {os.path.join(root, *sub), os.path.join(found, *sub)}
                break
        return out

    def rel(self, filename: str) -> Optional[str]:
        hit = self._cache.get(filename, False)
        if hit is not False:
            return hit
        real = os.path.realpath(filename) if os.path.isabs(filename) else None
        out = None
        if real is not None and real != _THIS:
            for root, prefix, _ in self.roots:
                if real.startswith(root + os.sep):
                    out = prefix + "/" + os.path.relpath(real, root).replace(os.sep, "/")
                    break
        self._cache[filename] = out
        return out


def _codes(frame) -> list:
    """The code objects of the frames active from `frame` outwards, outermost first (codes, not
    frames: a suspended coroutine's frame forgets its caller, and frames keep tensors alive)."""
    out = []
    while frame is not None:
        out.append(frame.f_code)
        frame = frame.f_back
    return out[::-1]


def _chat_endpoint(app):
    for r in app.routes:
        if getattr(r, "path", None) == ROUTE and "POST" in (getattr(r, "methods", None) or ()):
            return r.endpoint
    raise RuntimeError(f"the app has no POST {ROUTE} route")


def _load(checkpoint: Optional[str]):
    """The engine backend on the CPU in fp32 over `checkpoint` (a tiny random one when None)."""
    import torch

    from dreamllm_fast.config import EngineConfig
    from dreamllm_fast.pipeline import DreamLLMPipeline

    torch.manual_seed(0)
    tmp = None
    if checkpoint is None:
        from dreamllm_fast.tiny import make_tiny  # present at every commit this tool measures

        tmp = tempfile.TemporaryDirectory(prefix="dreamllm-path-")
        checkpoint = make_tiny(os.path.join(tmp.name, "tiny"))
    pipe = DreamLLMPipeline.from_pretrained(checkpoint, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=2, precision="fp32"))
    return pipe, tmp


def measure(checkpoint: Optional[str] = None) -> dict:
    """Serve one chat request in process and return the path report (see the module docstring)."""
    import importlib.util

    missing = [m for m in ("fastapi", "httpx") if importlib.util.find_spec(m) is None]
    if missing:  # httpx: starlette's TestClient drives the app through it
        raise RuntimeError(f"the request path needs the serving extra ({', '.join(missing)} "
                           f"missing): pip install -e '.[serve]'")
    import dreamllm_fast
    from dreamllm_fast import kernels

    dirs = _Dirs()
    pkg = os.path.dirname(os.path.realpath(dreamllm_fast.__file__))
    kdir = os.path.dirname(os.path.realpath(kernels.__file__))
    if os.path.dirname(kdir) not in (pkg, os.path.dirname(pkg)):  # a checkout, or an install
        raise RuntimeError(f"dreamllm_fast comes from {pkg} but dreamllm_fast.kernels from {kdir} "
                           f"(an editable install maps it to its own checkout): the path would mix "
                           f"two trees; pass --root {os.path.dirname(pkg)}")
    pipe, tmp = _load(checkpoint)
    try:
        rec = _serve_one(pipe, dirs)
    finally:
        if tmp is not None:
            tmp.cleanup()

    def repo(codes):
        return [(p, c.co_name) for c in codes if (p := dirs.rel(c.co_filename))]

    route, start = rec["route"], rec["start"]
    worker = repo(rec["worker"])
    rep = summarize(repo(route[start:]), worker)
    rep.update(kernel="triton" if worker[-1][0] == TRITON_KERNEL else "reference",
               kernel_file=worker[-1][0], kernel_function=worker[-1][1], max_tokens=MAX_TOKENS,
               above_route=[f"{p}:{n}" for p, n in repo(route[:start])],
               root=os.path.dirname(pkg), kernels_dir=kdir, commit=_commit(pkg))
    return rep


def _serve_one(pipe, dirs: _Dirs, timeout: float = 120.0) -> dict:
    """Serve the one request; returns the code objects of the route-side stack ("route", from
    index "start": the handler) and of the worker-side stack ("worker")."""
    from starlette.testclient import TestClient

    from dreamllm_fast.serving import ServeConfig, create_app
    from dreamllm_fast.serving.batched import BatchedScheduler

    sched = BatchedScheduler(pipe, max_batch=2, max_queue=4, warmup=False)
    app = create_app(sched, ServeConfig(model_name="tiny"))
    endpoint = _chat_endpoint(app).__code__
    rec: dict = {"route": None, "worker": None}

    class RecordingQueue(collections.deque):
        def append(self, item):
            if rec["route"] is None:
                rec["route"] = _codes(sys._getframe(1))
            super().append(item)

    if not isinstance(getattr(sched, "_queue", None), collections.deque):
        raise RuntimeError("the batched scheduler has no `_queue` deque to observe; update "
                           "dreamllm_fast/devtools/request_path.py to where requests wait now")
    sched._queue = RecordingQueue(sched._queue)

    watched = dirs.filenames(TRITON_KERNEL) | dirs.filenames(REF_KERNEL[0])

    def kernel_entry(code) -> bool:
        rel = dirs.rel(code.co_filename)
        return (rel == TRITON_KERNEL and code.co_name != "<module>") or (rel, code.co_name) == REF_KERNEL

    # Called at every Python call of every thread the app starts (the Triton interpreter makes
    # many): the first test is one set lookup.
    def tracer(frame, event, arg):
        if frame.f_code.co_filename in watched and rec["worker"] is None \
                and rec["route"] is not None and kernel_entry(frame.f_code):
            stack = _codes(frame)
            if DECODE_LOOP in {dirs.rel(c.co_filename) for c in stack} \
                    and all(c.co_name != "<module>" for c in stack):  # a decode step, not an import
                rec["worker"] = stack
                sys.settrace(None)  # this thread needs no more tracing
        return None

    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": False}
    before = threading.gettrace()  # a coverage tool's hook, say: put back afterwards
    threading.settrace(tracer)
    try:
        with TestClient(app) as client:  # runs the lifespan: starts and stops the scheduler
            if not sched.wait_ready(timeout):
                raise RuntimeError(f"the scheduler did not turn ready: {sched.health()}")
            resp = client.post(ROUTE, json=body)
    finally:
        threading.settrace(before)
    if resp.status_code != 200:
        raise RuntimeError(f"the chat request failed: {resp.status_code} {resp.text[:300]}")
    if rec["route"] is None:
        raise RuntimeError("the request never reached the scheduler's queue")
    if rec["worker"] is None:
        raise RuntimeError("no decode-attention call through dreamllm_fast/decoding.py was seen after "
                           "the request was queued")

    rec["start"] = next((i for i, c in enumerate(rec["route"]) if c is endpoint), None)
    if rec["start"] is None:
        raise RuntimeError(f"the queue append did not run under the {ROUTE} handler")
    return rec


def _commit(path: str) -> Optional[str]:
    """The checkout's commit, "+dirty" when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "diff", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


# -- another checkout, or Triton: a fresh interpreter ---------------------------------------------------
def _use_root(root: str) -> None:
    """Import dreamllm_fast, dreamllm_fast.kernels and dreamllm_fast.export from the checkout at
    `root`, ahead of whatever this interpreter has installed (an editable install maps them to its
    own checkout). Must run before anything imports dreamllm_fast."""
    import importlib.abc
    import importlib.util

    root = os.path.realpath(root)
    where = {mod: os.path.join(root, sub) for mod, sub in PACKAGES}
    for mod, d in where.items():
        if not os.path.isfile(os.path.join(d, "__init__.py")):
            raise SystemExit(f"--root {root}: {d}/__init__.py not found (want a checkout of this "
                             f"repository)")

    class CheckoutFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            d = where.get(fullname)
            if d is None:
                return None
            return importlib.util.spec_from_file_location(fullname, os.path.join(d, "__init__.py"),
                                                          submodule_search_locations=[d])

    sys.meta_path.insert(0, CheckoutFinder())
    # the root itself on sys.path (PYTHONPATH=DIR) would make its kernels/ the top-level `kernels`,
    # shadowing the PyPI package of that name that transformers and diffusers import
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


def _child(args: argparse.Namespace, timeout: float) -> dict:
    """Run the measurement in a fresh interpreter (this file as a script) and return its report."""
    env = dict(os.environ)
    if args.triton:
        env.update(TRITON_INTERPRET="1", DREAMLLM_KERNELS="triton")
    argv = ["--json", "--in-process"]
    if args.root:
        argv += ["--root", os.path.realpath(args.root)]
    if args.checkpoint:
        argv += ["--checkpoint", os.path.realpath(args.checkpoint)]
    # -c: sys.path[0] would be the working directory, whose kernels/ would shadow the PyPI
    # `kernels` that transformers probes; drop it and run this file as __main__
    code = ("import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, _THIS, *argv], env=env, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the measurement process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreamllm_fast.devtools.request_path",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--triton", action="store_true",
                   help="force the Triton kernels (interpreter mode, a child process)")
    p.add_argument("--root", help="measure the checkout at this directory (a child process)")
    p.add_argument("--checkpoint", help="a tiny checkpoint directory to reuse (default: write one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole measurement")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        if args.root:
            _use_root(args.root)
        rep = measure(args.checkpoint)
    elif args.triton or args.root:
        rep = _child(args, args.timeout)
    else:
        rep = measure(args.checkpoint)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
