"""The GPU report in one call that fits a 15-minute lease: the most valuable figures first, each
phase under its own timeout, under 9 minutes with the install.

    python -m benchmarks.gpu_report --plan                          # the schedule; runs nothing
    python -m benchmarks.gpu_report --out $OUT --budget-s 480       # a GPU session (one call)
    python -m benchmarks.gpu_report --out DIR --smoke               # CPU: the same plan, tiny, x3 time
    python -m benchmarks.gpu_report --publish DIR                   # back on the dev machine

benchmarks/README.md has the exact session command (install included) and the phases' budgets.
Before any phase the run checks that every package it imports is installed and stops with the
list of missing wheels if not (exit 2). Phases run in PHASES order, each a child process (its
whole process group is killed at its timeout); a phase that fails or times out is recorded and the
next one runs. A phase starts only if at least its `min_s` is left of ``--budget-s``, and then
gets min(its budget, what is left); otherwise it is recorded as skipped. Extra phases (off the
default plan) run when named in ``--phases``, or after the default ones when their whole budget
is still left. ``--out`` is a FLAT folder of at most 8 files (OUT_FILES), each rewritten whole as
the phases finish, so a call killed at its limit keeps every finished phase:

    env.json       GPU, driver, versions, measured copy/GEMM ceilings, installed packages
    report.json    the bench rows of core + diffusion (+ extras), the serve rows, and
                   meta.gpu_report (phases, elapsed, test counts): what --publish turns into
                   the README's table and target lines
    report.md      its Markdown
    tests.json     one record per GPU test: outcome, duration, recorded drift, stdout tail
    tests.log      pytest's output
    kernels.json   the quick kernel benchmark files, by name
    phases.json    each phase's status, exit code, duration, budget
    gpu_report.log this orchestrator's log and the non-test phases' output

Scratch files live in ``--work``. Adding a variant (int8/fp8 engine rows, a diffusion backend)
is one line: see VARIANTS and DIFFUSION_BACKENDS below.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]  # every phase runs from the repository root
OUT_FILES = ("env.json", "report.json", "report.md", "tests.json", "tests.log", "kernels.json",
             "phases.json", "gpu_report.log")
MAX_FILES = 8  # what comes back from a GPU session: 8 files of at most 16 MiB
MAX_FILE_BYTES = 16 << 20
BUDGET_S = 480.0  # 8 minutes: with the ~1 minute install, one call stays under 9 minutes
SMOKE_STRETCH = 3  # --smoke: budgets and minimums x3 (a shared 2-core CPU, the Triton interpreter)

# Wheels the report needs beyond the GPU image's packages (the image of benchmarks/README.md: torch
# 2.11, triton 3.6, transformers 5.17, safetensors 0.8, sentencepiece, tokenizers, huggingface-hub
# 1.33, numpy, Pillow, tqdm, regex, requests, filelock, httpx, zipp, pytest, pytest-timeout,
# prometheus-client, matplotlib, setuptools, wheel). diffusers needs importlib_metadata; the serve
# phase imports dreamllm_fast.serving, whose protocol module needs pydantic (2.14 wants
# typing_extensions >= 4.16, so it travels too); FastAPI and uvicorn are not needed (nothing is
# served over HTTP). {import name: pip requirement}; benchmarks/README.md makes the folder.
WHEELS = {"diffusers": "diffusers==0.42.1", "importlib_metadata": "importlib_metadata==8.7.0",
          "pydantic": "pydantic==2.14.4", "pydantic_core": "pydantic_core==2.50.5",
          "annotated_types": "annotated_types==0.8.0", "typing_inspection": "typing_inspection==0.4.5",
          "typing_extensions": "typing_extensions==4.16.0"}
IMAGE = ("torch", "triton", "transformers", "safetensors", "sentencepiece", "numpy", "PIL", "tqdm",
         "pytest")  # pytest-timeout is used when present (else benchmarks/record_tests.py's limit)
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl && "
           "python3 -m pip install -q --no-deps --no-build-isolation -e .")

# The tests most likely to break on a GPU, in order; one pytest process per group (a poisoned
# CUDA context stays in its group). Per-test limit: --test-timeout.
TEST_GROUPS = (
    # graphs vs eager (prefill, dream, decode greedy and seeded), the decode loop's GPU tests,
    # then the tiny fp32 token parity and the 7B fp32-arbiter parity (the costliest, last)
    ("parity", ["tests/gpu_paths/test_prefill_graphs_gpu.py", "tests/decoding/test_decode_gpu.py",
                "tests/parity/test_engine_gpu.py"]),
    ("kernels", ["tests/kernels", "-k", "gpu_real or graph_replay or fullgraph"]),  # real shapes
)

# The bench phases: one line per variant (see Variant). The int8/fp8 engines add e.g.
#     Variant("core_int8", 45, 30, ("decode",), ("--weights", "int8", "--backends", "engine")),
# (their rows carry `weights`: bench/targets.py judges them against the bf16 engine of "core",
# measured in the same run). A planned variant runs right after core, and the plan must still fit
# BUDGET_S (tests/cli/test_gpu_report.py checks it: take its seconds from another phase's budget,
# or mark it extra); an extra one runs after the plan when its whole budget is left.
@dataclass(frozen=True)
class Variant:
    name: str  # the phase
    budget_s: float
    min_s: float
    stages: tuple
    args: tuple = ()  # more `dreamllm-fast bench` arguments
    extra: bool = False  # off the default plan
    keep: tuple = ()  # providers whose rows the report keeps (default: all)


VARIANTS = (
    Variant("core", 165, 90, ("prefill", "decode", "dream", "projection"),
            ("--backends", "engine", "engine_eager", "reference", "--no-compile-baseline")),
    # torch.compile + static cache at ctx 128: ~70 s of compile on the H100 (2026-11-23) plus the
    # child's 7B build. Only its rows are kept (core has the engine's and the reference's).
    Variant("compile", 130, 130, ("decode",), ("--backends", "reference", "--contexts", "128"),
            extra=True, keep=("compile_static",)),
    # int8/fp8 weight-only engines beside the bf16 engine (decode at ctx 128 and 1024, prefill,
    # dream), each with its own floor. Off the 480 s plan until the first GPU report times core:
    # it runs when named (--phases quant) or when its whole budget is left.
    Variant("quant", 150, 150, ("prefill", "decode", "dream"),
            ("--backends", "engine", "--weights", "bf16", "int8", "fp8", "--no-compile-baseline"),
            extra=True),
)
# U-Net/VAE backends of the diffusion phase, beside diffusers eager; the engine's CUDA-graph
# backend ("graphs": captured modules, fused GroupNorm) runs beside it. "compiled" costs minutes
# of Inductor: an extra phase.
DIFFUSION_BACKENDS = ("eager", "graphs")


@dataclass
class Phase:
    name: str
    budget_s: float  # its timeout
    min_s: float  # less than this left of the run's budget: skipped
    what: str
    steps: Callable[["Ctx"], list]  # -> argv lists, run in order within the phase's time
    collect: Callable[["Ctx"], None] = lambda ctx: None  # runs after a failure or timeout too
    log: str = "gpu_report.log"
    extra: bool = False  # off the default plan


@dataclass
class Ctx:
    out: Path
    work: Path
    args: argparse.Namespace
    allowance_s: float = 0.0  # min(budget, what is left of the run's budget)
    notes: list = field(default_factory=list)


def _py(*args) -> list:
    return [sys.executable, *args]


def _smoke(ctx) -> bool:
    return bool(getattr(ctx.args, "smoke", False))


# ------------------------------------------------------------------------------- the phases
def _env_steps(ctx):
    return [_py("-m", "benchmarks.gpu_report", "--_env", str(ctx.out / "env.json"))]


def _bench_argv(ctx, name, stages, *extra):
    budget = max(1, int(ctx.allowance_s - 20))  # 20 s to write the report and exit
    smoke = ["--preset", "tiny", "--device", "cpu", "--decode-tokens", "2", "--steps", "2"] \
        if _smoke(ctx) else []
    return _py("-m", "dreamllm_fast.cli", "bench", "--out", str(ctx.work / name), "--budget-s",
               str(budget), "--stages", *stages, *extra, *smoke)


def _bench_phase(v: Variant, what: str = "") -> Phase:
    return Phase(v.name, v.budget_s, v.min_s,
                 what or f"dreamllm-fast bench --stages {' '.join(v.stages)} " + " ".join(v.args),
                 lambda ctx: [_bench_argv(ctx, v.name, v.stages, *v.args)],
                 lambda ctx: _collect_bench(ctx, v), extra=v.extra)


def _collect_bench(ctx, v: Variant):
    src = ctx.work / v.name / "report.json"
    if src.is_file():
        rep = json.loads(src.read_text())
        if v.keep:
            rep["rows"] = [r for r in rep["rows"] if r.get("provider") in v.keep]
        _merge_report(ctx.out, rep, v.name)


def _tests_steps(ctx):
    limit = [f"--timeout={ctx.args.test_timeout:g}"] if importlib.util.find_spec("pytest_timeout") \
        else [f"--record-timeout={ctx.args.test_timeout:g}"]
    # the smoke run collects the same selection (on a CPU the GPU tests skip with their reason)
    return [_py("-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider", "-p",
                "benchmarks.record_tests", f"--record-json={ctx.work / f'tests_{name}.json'}", *limit)
            for name, paths in TEST_GROUPS]


def _collect_tests(ctx):
    merged = {"groups": [], "counts": {}, "tests": []}
    for name, paths in TEST_GROUPS:
        p = ctx.work / f"tests_{name}.json"
        part = json.loads(p.read_text()) if p.is_file() else {"finished": False, "tests": []}
        merged["groups"].append({"name": name, "args": paths, "finished": part.get("finished"),
                                 "exitstatus": part.get("exitstatus"), "ran": p.is_file()})
        merged["tests"] += part["tests"]
    for t in merged["tests"]:
        merged["counts"][t["outcome"]] = merged["counts"].get(t["outcome"], 0) + 1
    _write_json(ctx.out / "tests.json", merged)
    _update_meta(ctx.out, tests=merged["counts"])


def _serve_steps(ctx):
    smoke = ["--preset", "tiny", "--device", "cpu", "--max-tokens", "4"] if _smoke(ctx) else []
    return [_py("-m", "benchmarks.serve_inproc", "--out", str(ctx.work / "serve.json"), *smoke)]


def _collect_serve(ctx):
    p = ctx.work / "serve.json"
    rows = json.loads(p.read_text()) if p.is_file() else []
    if not rows:
        rows = [{"stage": "serve", "provider": "batched", "error": "the serve phase wrote no rows "
                 "(see gpu_report.log)"}]
    _merge_report(ctx.out, {"rows": rows}, "serve")


# In order of value (the targets they feed: host cost, prefill and decode attention); the phase's
# timeout ends the list wherever it is, and every benchmark rewrites its JSON after each case.
KERNEL_BENCHES = ("bench_launch_overhead", "bench_attention", "bench_decode_attention", "bench_norms",
                  "bench_dream_projection")


def _kernels_steps(ctx):
    only = ("bench_dream_projection",) if _smoke(ctx) else KERNEL_BENCHES  # interpreter: the lightest
    return [_py("-m", "benchmarks.run_kernels", "--skip-tests", "--quick", "--out",
                str(ctx.work / "kernels"), "--timeout-s", str(max(1, int(ctx.allowance_s - 5))),
                "--only", *only)]


def _collect_kernels(ctx):
    files = sorted(p for p in (ctx.work / "kernels").glob("*.json") if p.name != "summary.json")
    if files:
        _write_json(ctx.out / "kernels.json", {**_read_kernels(ctx),
                                               **{p.stem: json.loads(p.read_text()) for p in files}})


def _read_kernels(ctx) -> dict:
    path = ctx.out / "kernels.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _samplers_steps(ctx):
    """benchmarks/bench_unet.py: the U-Net step at 2 and 8 rows, the VAE, and T2I loops per sampler
    (DDPM 50, DPM-Solver++ 20, UniPC 20) for diffusers eager and the graphs backend."""
    smoke = ["--preset", "tiny", "--samplers", "ddpm:2", "--unet-rows", "2"] if _smoke(ctx) else []
    return [_py("-m", "benchmarks.bench_unet", "--out", str(ctx.work / "samplers"),
                "--backends", ",".join(DIFFUSION_BACKENDS), *smoke)]


def _collect_samplers(ctx):
    src = ctx.work / "samplers" / "bench_unet.json"
    if src.is_file():  # kernels.json holds the per-benchmark files (the 8-file limit)
        _write_json(ctx.out / "kernels.json", {**_read_kernels(ctx), "bench_unet": json.loads(src.read_text())})


def _phases() -> dict:
    planned = [_bench_phase(v) for v in VARIANTS if not v.extra]  # core, then its variants
    extras = [_bench_phase(v) for v in VARIANTS if v.extra]
    return {p.name: p for p in (
        Phase("env", 30, 10, "GPU, driver, versions, copy and GEMM ceilings", _env_steps),
        *planned,
        Phase("tests", 100, 40, "GPU tests: graph-vs-eager parity (prefill, dream, decode greedy and "
              "seeded), 7B fp32-arbiter parity, decode loop, real-shape kernels; drifts recorded",
              _tests_steps, _collect_tests, log="tests.log"),
        Phase("serve", 75, 50, "batched scheduler in process, 7B random weights: 1, 4, 16 "
              "concurrent requests of 128 tokens", _serve_steps, _collect_serve),
        _bench_phase(Variant("diffusion", 75, 45, ("unet", "vae", "t2i"),
                             ("--backends", "engine", "--diffusion-backends", *DIFFUSION_BACKENDS)),
                     what="U-Net CFG step (batch 2, 512x512) and VAE per backend "
                          f"({', '.join(DIFFUSION_BACKENDS)}), T2I 50 steps end to end"),
        Phase("kernels", 35, 20, "quick kernel benchmarks (run_kernels --quick --skip-tests): "
              + ", ".join(b.removeprefix("bench_") for b in KERNEL_BENCHES),
              _kernels_steps, _collect_kernels),
        *extras,
        Phase("samplers", 120, 120, "benchmarks.bench_unet: U-Net step at 2 and 8 rows, VAE, T2I loops "
              "per sampler (ddpm 50, dpmpp-2m 20, unipc 20) for " + ", ".join(DIFFUSION_BACKENDS),
              _samplers_steps, _collect_samplers, extra=True),
        _bench_phase(Variant("diffusion_compiled", 150, 150, ("unet", "vae"),
                             ("--diffusion-backends", "eager", "compiled"), extra=True,
                             keep=("compiled",)),
                     what="U-Net/VAE under torch.compile (Inductor compile, minutes)"),
    )}


PHASES = _phases()


def planned_total(names=None) -> float:
    return sum(p.budget_s for p in PHASES.values() if (names is None and not p.extra) or
               (names is not None and p.name in names))


# ------------------------------------------------------------------------------- report.json
def _load_report(out: Path) -> dict:
    """report.json as it stands; a bare one (environment and ceilings from env.json) before the
    first bench phase has written it."""
    dst = out / "report.json"
    base = json.loads(dst.read_text()) if dst.is_file() else {}
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    if not base.get("env") and env:
        base["env"] = {k: v for k, v in env.items() if k != "ceilings"}
    if not base.get("ceilings") and env.get("ceilings"):
        base["ceilings"] = env["ceilings"]
    base.setdefault("env", {})
    base.setdefault("ceilings", {})
    base.setdefault("rows", [])
    base.setdefault("meta", {"dtype": None, "preset": None, "skipped": []})
    return base


def _save_report(out: Path, base: dict) -> None:
    """report.json, and report.md: the README's summary (targets included), then every row."""
    from dreamllm_fast.bench.report import gpu_report_summary, markdown

    _write_json(out / "report.json", base)
    k = out / "kernels.json"
    kernels = json.loads(k.read_text()) if k.is_file() else None
    _write_text(out / "report.md", gpu_report_summary(base, kernels) + "\n## Every row\n\n"
                + markdown(base).split("\n\n", 1)[-1])


def _merge_report(out: Path, rep: dict, phase: str) -> None:
    """report.json gets `rep`'s rows tagged with `phase` (a re-run of a phase replaces its rows,
    never doubles them); the first bench report's environment, ceilings and settings are kept,
    each phase's own status and skips under meta.phases; report.md follows."""
    base = _load_report(out)
    fresh = not base["meta"].get("phases")  # no bench phase merged yet
    base["rows"] = [r for r in base["rows"] if r.get("phase") != phase] + \
        [{**r, "phase": phase} for r in rep.get("rows", [])]
    if "meta" in rep:
        m = rep["meta"]
        if fresh:
            base["env"] = rep.get("env") or base["env"]
            base["ceilings"] = rep.get("ceilings") or base["ceilings"]
            base["meta"] = {**m, "gpu_report": base["meta"].get("gpu_report", {}),
                            "settings": {"stages": []}}
        meta = base["meta"]
        meta.setdefault("phases", {})[phase] = {k: m.get(k) for k in ("status", "elapsed_s", "setup_s",
                                                                      "skipped", "settings")}
        meta["skipped"] = [x for ph in meta["phases"].values() for x in (ph.get("skipped") or [])]
        stages = meta["settings"]["stages"]
        stages += [x for x in (m.get("settings") or {}).get("stages", []) if x not in stages]
        meta["status"] = "complete"
    _save_report(out, base)


def _update_meta(out: Path, **fields) -> None:
    """meta.gpu_report of report.json: the orchestrator's own record (phases, elapsed, tests)."""
    base = _load_report(out)
    base["meta"].setdefault("gpu_report", {}).update(fields)
    _save_report(out, base)


# ------------------------------------------------------------------------------- the runner
def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1, default=str))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log(out: Path, msg: str) -> None:
    line = f"[gpu_report {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(out / "gpu_report.log", "a") as f:
        f.write(line + "\n")


_RUNNING: list = []  # the child of the step in progress (its own process group)


def _on_term(signum, frame):
    """Stopped from outside (SIGTERM, Ctrl-C): end the running child's whole group first (it has
    its own session, which would outlive us), then exit; the files of finished phases stay."""
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def _run_step(argv: list, log_path: Path, timeout_s: float) -> tuple:
    """(exit code or None on timeout, seconds); output appended to log_path."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(map(str, argv))}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
        _RUNNING.append(proc)
        try:
            rc = proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
        finally:
            _RUNNING.remove(proc)
    return rc, time.monotonic() - t0


def run_phases(phases: list, out: Path, work: Path, args, budget_s: float = BUDGET_S) -> list:
    """Run `phases` in order (extras only when their whole budget is left); returns, and writes to
    phases.json, one record per phase. `out` ends with at most MAX_FILES files."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start, records = time.monotonic(), []
    for ph in phases:
        left = budget_s - (time.monotonic() - t_start)
        rec = {"name": ph.name, "budget_s": ph.budget_s, "steps": []}
        records.append(rec)
        need = ph.budget_s if ph.extra and not getattr(args, "named_extras", False) else ph.min_s
        if left < max(need, 1.0):  # under a second: nothing can start
            rec.update(status="skipped", reason=f"{left:.0f} s left of the {budget_s:g} s budget, "
                                                f"the phase needs {need:g} s")
            _log(out, f"phase {ph.name}: skipped ({rec['reason']})")
            _finish_phase(out, records, t_start)
            continue
        ctx = Ctx(out=out, work=work, args=args, allowance_s=min(ph.budget_s, left))
        t_phase = time.monotonic()
        deadline = t_phase + ctx.allowance_s
        _log(out, f"phase {ph.name}: start ({ctx.allowance_s:.0f} s allowed)")
        status = "ok"
        try:
            steps = ph.steps(ctx)
        except Exception as e:
            steps, status = [], "failed"
            rec["reason"] = f"{type(e).__name__}: {e}"
        for argv in steps:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                rec["steps"].append({"argv": argv, "status": "skipped", "reason": "phase timeout"})
                continue
            rc, dt = _run_step(argv, out / ph.log, remaining)
            st = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
            rec["steps"].append({"argv": argv, "status": st, "rc": rc, "duration_s": round(dt, 1)})
            if st != "ok" and status != "timeout":
                status = st
        try:
            ph.collect(ctx)
        except Exception as e:
            rec["collect_error"] = f"{type(e).__name__}: {e}"
        rec.update(status=status, duration_s=round(time.monotonic() - t_phase, 1))
        _log(out, f"phase {ph.name}: {status} in {rec['duration_s']} s")
        _finish_phase(out, records, t_start)
    return records


def _finish_phase(out: Path, records: list, t_start: float) -> None:
    """After every phase: phases.json, report.json's meta.gpu_report, the file limits."""
    _write_json(out / "phases.json", records)
    _update_meta(out, elapsed_s=round(time.monotonic() - t_start, 1),
                 phases=[{**{k: r.get(k) for k in ("name", "status", "duration_s", "budget_s", "reason")},
                          "extra": PHASES[r["name"]].extra if r["name"] in PHASES else False}
                         for r in records])
    _cap_files(out)


def _cap_files(out: Path, limit: "int | None" = None) -> None:
    """What a GPU session brings back: keep the tail of any file over the per-file limit, drop
    (and log) any file past the count limit or not in OUT_FILES."""
    limit = limit or MAX_FILE_BYTES
    for p in sorted(out.iterdir()):
        if p.is_file() and p.name not in OUT_FILES and not p.name.endswith(".tmp"):
            p.unlink()
            _log(out, f"removed {p.name}: not one of the {MAX_FILES} report files")
        elif p.is_file() and p.stat().st_size > limit:
            data = p.read_bytes()[-(limit - 200):]
            p.write_bytes(b"[truncated by gpu_report: head removed to fit the file limit]\n" + data)


def missing_wheels() -> list[str]:
    """The pip requirements of WHEELS (and image packages) that do not import here."""
    return [req for mod, req in (*WHEELS.items(), *((m, m) for m in IMAGE))
            if importlib.util.find_spec(mod) is None]


def write_env(path: Path) -> None:
    """Environment record (this runs in its own child process: CUDA is initialised here)."""
    import torch

    from dreamllm_fast.bench.harness import _version, ceilings, env_info

    env = env_info()
    env["cuda_available"] = torch.cuda.is_available()
    env["packages"] = {req.split("==")[0]: _version(req.split("==")[0]) for req in WHEELS.values()}
    env["optional"] = {m: importlib.util.find_spec(m) is not None for m in
                       ("pytest_timeout", "onnxruntime", "tensorrt", "flash_attn", "matplotlib")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(capability=list(torch.cuda.get_device_capability()), memory_gib=p.total_memory / 2**30)
    env["ceilings"] = ceilings()
    _write_json(path, env)


def plan_text(phases: list, budget_s: float) -> str:
    lines = [f"{'phase':<20} {'budget s':>8} {'min s':>6}  what"]
    for p in phases:
        tag = " (extra: runs when named, or when its whole budget is left)" if p.extra else ""
        lines.append(f"{p.name:<20} {p.budget_s:>8g} {p.min_s:>6g}  {p.what}{tag}")
    default = sum(p.budget_s for p in phases if not p.extra)
    lines += ["", f"planned total {default:g} s of the {budget_s:g} s budget"
              + (" (fits)" if default <= budget_s else " (DOES NOT FIT: later phases will be skipped)"),
              f"install (no network, from the repository root): {INSTALL}",
              "wheels beyond the GPU image: " + " ".join(WHEELS.values())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- publish
def publish(src: Path, root: Path, readme: bool = True) -> Path:
    """Copy one gpu_report --out folder into benchmarks/results/<gpu>/<date>_<sha>/ and regenerate
    the README's results section from it."""
    from dreamllm_fast.bench.report import update_readme

    src = Path(src)
    env = None
    for name in ("report.json", "env.json"):
        if (src / name).is_file():
            j = json.loads((src / name).read_text())
            env = env or ((j.get("env") or None) if name == "report.json" else j)
    if not env or not env.get("gpu"):
        raise SystemExit(f"{src}: no GPU environment in report.json or env.json (a CPU smoke run is "
                         "never published)")
    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", env["gpu"]).strip("_")
    sha = (env.get("git_sha") or "unknown")[:7]
    dest = root / "benchmarks" / "results" / gpu / f"{env['date'][:10]}_{sha}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".tmp"):
            shutil.copyfile(p, dest / p.name)
    if readme and (dest / "report.json").is_file():
        update_readme(root)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="flat result folder (at most 8 files)")
    ap.add_argument("--phases", nargs="+", default=None, choices=list(PHASES),
                    help="these phases (canonical order) instead of the default plan")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"the whole run, seconds (default {BUDGET_S:g}; x{SMOKE_STRETCH} with --smoke)")
    ap.add_argument("--plan", action="store_true", help="print the schedule and exit")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run of the same phases (tiny preset, interpreter): plumbing, no claim")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--test-timeout", type=float, default=60, help="per-test limit, seconds")
    ap.add_argument("--publish", type=Path, default=None, metavar="DIR",
                    help="copy this --out folder into benchmarks/results/ and update the README")
    ap.add_argument("--no-readme", action="store_true", help="with --publish: leave the README")
    ap.add_argument("--_env", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._env:
        write_env(args._env)
        return 0
    names = [n for n in PHASES if n in args.phases] if args.phases else list(PHASES)
    phases = [PHASES[n] for n in names]
    if args.smoke:  # the same plan, stretched for a CPU (the kernels run in Triton's interpreter)
        phases = [dataclasses.replace(p, budget_s=p.budget_s * SMOKE_STRETCH, min_s=p.min_s * SMOKE_STRETCH)
                  for p in phases]
    if args.budget_s is None:
        args.budget_s = BUDGET_S * (SMOKE_STRETCH if args.smoke else 1)
    args.named_extras = args.phases is not None
    if args.plan:
        print(plan_text(phases, args.budget_s))
        return 0
    if args.publish:
        print(f"published to {publish(args.publish, ROOT, readme=not args.no_readme)}")
        return 0
    if args.out is None:
        ap.error("--out DIR is required (a flat folder: $OUT in a GPU session)")
    missing = missing_wheels()
    if missing:
        print(f"gpu_report: missing package(s) {' '.join(missing)}: nothing was run. Install the "
              f"wheel folder first (benchmarks/README.md): {INSTALL}", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_report-"))).resolve()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_term)
    records = run_phases(phases, args.out.resolve(), work, args, args.budget_s)
    return exit_status(records, args.named_extras)


def exit_status(records: list, named: bool) -> int:
    """0 when every phase of the plan finished cleanly (an extra phase that did not fit in the
    leftover time is no failure unless it was named), 1 otherwise."""
    def extra(name):
        return name in PHASES and PHASES[name].extra

    return 0 if all(r["status"] == "ok" or (r["status"] == "skipped" and extra(r["name"]) and not named)
                    for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
