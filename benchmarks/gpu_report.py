"""One command for a GPU session: environment, GPU tests with their drifts, kernel benchmarks, the
end-to-end bench with its baselines, the U-Net/VAE backends. At most 15 minutes on an H100.

    python -m benchmarks.gpu_report --out $OUT                       # every phase
    python -m benchmarks.gpu_report --out $OUT --phases env tests kernels   # split over two calls
    python -m benchmarks.gpu_report --out $OUT --phases env e2e diffusion
    python -m benchmarks.gpu_report --publish DIR [DIR ...]          # back on the dev machine

Built for how GPU sessions work (benchmarks/README.md has the exact commands): each phase is a
child process under its own timeout (its whole process group is killed past it), the run as a
whole under ``--budget-s`` (900 s), and a phase that fails or times out is recorded and the next
one runs. ``--out`` is a FLAT folder of at most 8 files, written as the phases finish:

    env.json      GPU, driver, versions, measured ceilings, which optional packages import
    tests.json    one record per GPU test: outcome, duration, recorded drift, stdout tail
    tests.log     pytest's output
    kernels.json  every kernel benchmark JSON of `python -m benchmarks.run_kernels`
    report.json   the `dreamllm-fast bench` report: e2e stages, then the U-Net/VAE rows merged in
    report.md     its Markdown
    phases.json   each phase's status, exit code, duration and timeout
    gpu_report.log  this orchestrator's log and the output of the non-test phases

Everything bulky (per-benchmark folders, partial files) lives in ``--work``. ``--publish`` merges
the folders of one or two calls into ``benchmarks/results/<gpu>/<date>_<sha>/`` and regenerates
the README's results section.
"""
from __future__ import annotations

import argparse
import json
import os
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
OUT_FILES = ("env.json", "tests.json", "tests.log", "kernels.json", "report.json", "report.md",
             "phases.json", "gpu_report.log")
MAX_FILE_BYTES = 16 << 20  # what comes back from a GPU session, per file
BUDGET_S = 900.0  # 15 minutes on an H100, all phases
E2E_STAGES = ("vision", "prefill", "decode", "dream", "projection", "t2i", "interleaved")
TEST_GROUPS = (["tests/kernels"], ["tests", "--ignore=tests/kernels", "--ignore=tests/parity"],
               ["tests/parity"])  # one process each: a poisoned CUDA context stays in its group


@dataclass
class Phase:
    name: str
    timeout_s: float
    steps: Callable[["Ctx"], list]  # -> argv lists, run in order within the phase's time
    collect: Callable[["Ctx"], None] = lambda ctx: None  # runs even after a failure or timeout
    log: str = "gpu_report.log"


@dataclass
class Ctx:
    out: Path
    work: Path
    args: argparse.Namespace
    allowance_s: float = 0.0  # this phase's time: min(its timeout, what is left of the budget)
    notes: list = field(default_factory=list)


def _py(*args) -> list:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------- the phases
def _env_steps(ctx):
    return [_py("-m", "benchmarks.gpu_report", "--_env", str(ctx.out / "env.json"))]


def _tests_steps(ctx):
    import importlib.util

    limit = [f"--timeout={ctx.args.test_timeout:g}"] if importlib.util.find_spec("pytest_timeout") \
        else [f"--record-timeout={ctx.args.test_timeout:g}"]
    return [_py("-m", "pytest", *group, "-q", "-rfEs", "-p", "benchmarks.record_tests",
                f"--record-json={ctx.work / f'tests_{i}.json'}", *limit)
            for i, group in enumerate(TEST_GROUPS)]


def _collect_tests(ctx):
    merged = {"groups": [], "counts": {}, "tests": []}
    for i, group in enumerate(TEST_GROUPS):
        p = ctx.work / f"tests_{i}.json"
        part = json.loads(p.read_text()) if p.is_file() else {"finished": False, "tests": []}
        merged["groups"].append({"args": group, "finished": part.get("finished"),
                                 "exitstatus": part.get("exitstatus"), "ran": p.is_file()})
        merged["tests"] += part["tests"]
    for t in merged["tests"]:
        merged["counts"][t["outcome"]] = merged["counts"].get(t["outcome"], 0) + 1
    _write_json(ctx.out / "tests.json", merged)


def _kernels_steps(ctx):
    return [_py("-m", "benchmarks.run_kernels", "--skip-tests", "--out", str(ctx.work / "kernels"),
                *([] if ctx.args.kernels_full else ["--quick"]))]


def _collect_kernels(ctx):
    files = sorted((ctx.work / "kernels").glob("*.json"))
    if files:
        _write_json(ctx.out / "kernels.json",
                    {p.stem: json.loads(p.read_text()) for p in files})


def _bench_argv(ctx, name, stages, *extra):
    budget = max(1, int(ctx.allowance_s - 30))  # 30 s to write the report and exit
    return [_py("-m", "dreamllm_fast.cli", "bench", "--out", str(ctx.work / name), "--budget-s",
                str(budget), "--stages", *stages, *extra)]


def _e2e_steps(ctx):
    return _bench_argv(ctx, "e2e", E2E_STAGES)


def _collect_e2e(ctx):
    src = ctx.work / "e2e" / "report.json"
    if src.is_file():
        _merge_report(ctx.out, json.loads(src.read_text()))


def _diffusion_steps(ctx):
    return _bench_argv(ctx, "diffusion", ("unet", "vae"), "--diffusion-backends",
                       *ctx.args.diffusion_backends, *(["--autotune"] if ctx.args.autotune else []))


def _collect_diffusion(ctx):
    src = ctx.work / "diffusion" / "report.json"
    if src.is_file():
        _merge_report(ctx.out, json.loads(src.read_text()))


PHASES = {p.name: p for p in (
    Phase("env", 45, _env_steps),
    Phase("tests", 255, _tests_steps, _collect_tests, log="tests.log"),
    Phase("kernels", 120, _kernels_steps, _collect_kernels),
    Phase("e2e", 300, _e2e_steps, _collect_e2e),
    Phase("diffusion", 180, _diffusion_steps, _collect_diffusion),
)}


def _merge_report(out: Path, rep: dict) -> None:
    """report.json gets `rep`, or `rep`'s rows appended to the report already there (the U-Net/VAE
    phase after the e2e one); report.md follows."""
    from dreamllm_fast.bench.report import markdown

    dst = out / "report.json"
    if dst.is_file():
        base = json.loads(dst.read_text())
        new_stages = {r["stage"] for r in rep["rows"]}
        base["rows"] = [r for r in base["rows"] if r["stage"] not in new_stages] + rep["rows"]
        base["meta"].setdefault("merged", []).append(
            {"stages": rep["meta"].get("settings", {}).get("stages"), "env_date": rep["env"].get("date"),
             "status": rep["meta"].get("status"), "skipped": rep["meta"].get("skipped", [])})
        base["meta"]["skipped"] = base["meta"].get("skipped", []) + rep["meta"].get("skipped", [])
        stages = base["meta"].setdefault("settings", {}).setdefault("stages", [])
        stages += [s for s in rep["meta"].get("settings", {}).get("stages", []) if s not in stages]
        rep = base
    _write_json(dst, rep)
    _write_text(out / "report.md", markdown(rep))


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


def _run_step(argv: list, log_path: Path, timeout_s: float) -> tuple:
    """(exit code or None on timeout, seconds); output appended to log_path."""
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(map(str, argv))}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def run_phases(phases: list, out: Path, work: Path, args, budget_s: float = BUDGET_S) -> list:
    """Run `phases` in order; returns (and writes to phases.json) one record per phase."""
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start, records = time.monotonic(), []
    for ph in phases:
        left = budget_s - (time.monotonic() - t_start)
        rec = {"name": ph.name, "timeout_s": ph.timeout_s, "steps": []}
        records.append(rec)
        if left <= 1:
            rec.update(status="skipped", reason=f"budget of {budget_s:g} s spent")
            _log(out, f"phase {ph.name}: skipped, budget of {budget_s:g} s spent")
            _write_json(out / "phases.json", records)
            continue
        ctx = Ctx(out=out, work=work, args=args, allowance_s=min(ph.timeout_s, left))
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
        _write_json(out / "phases.json", records)
    _cap_files(out)
    return records


def _cap_files(out: Path, limit: "int | None" = None) -> None:
    """Keep the tail of any file over the per-file limit of what a GPU session brings back."""
    limit = limit or MAX_FILE_BYTES
    for p in out.iterdir():
        if p.is_file() and p.stat().st_size > limit:
            data = p.read_bytes()[-(limit - 200):]
            p.write_bytes(b"[truncated by gpu_report: head removed to fit the file limit]\n" + data)


def write_env(path: Path) -> None:
    """Environment record (this runs in its own child process: CUDA is initialised here)."""
    import importlib.util

    import torch

    from dreamllm_fast.bench.harness import ceilings, env_info

    env = env_info()
    env["cuda_available"] = torch.cuda.is_available()
    env["optional"] = {m: importlib.util.find_spec(m) is not None for m in
                       ("diffusers", "importlib_metadata", "pytest_timeout", "onnxruntime",
                        "tensorrt", "flash_attn", "matplotlib")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(capability=list(torch.cuda.get_device_capability()), memory_gib=p.total_memory / 2**30)
        env["ceilings"] = ceilings()
    _write_json(path, env)


# ------------------------------------------------------------------------------- publish
def publish(dirs: list, root: Path, readme: bool = True) -> Path:
    """Copy one or more gpu_report --out folders into benchmarks/results/<gpu>/<date>_<sha>/."""
    from dreamllm_fast.bench.report import update_readme

    dirs = [Path(d) for d in dirs]
    env = None
    for d in dirs:
        for name in ("report.json", "env.json"):
            if (d / name).is_file():
                j = json.loads((d / name).read_text())
                env = env or (j.get("env") if name == "report.json" else j)
    if not env or not env.get("gpu"):
        raise SystemExit(f"no GPU environment in {[str(d) for d in dirs]} (report.json or env.json)")
    import re

    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", env["gpu"]).strip("_")
    sha = (env.get("git_sha") or "unknown")[:7]
    dest = root / "benchmarks" / "results" / gpu / f"{env['date'][:10]}_{sha}"
    dest.mkdir(parents=True, exist_ok=True)
    merged: dict = {}
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.is_file() and not p.name.endswith(".tmp"):
                merged.setdefault(p.name, []).append(p)
    for name, paths in merged.items():
        if len(paths) == 1:
            shutil.copyfile(paths[0], dest / name)
        elif name == "phases.json":
            _write_json(dest / name, [r for p in paths for r in json.loads(p.read_text())])
        elif name == "env.json":
            _write_json(dest / name, {"calls": [json.loads(p.read_text()) for p in paths]})
        elif name.endswith(".log"):
            _write_text(dest / name, "".join(f"===== {p}\n{p.read_text()}" for p in paths))
        else:
            raise SystemExit(f"{name} is in more than one folder ({[str(p) for p in paths]}): "
                             "publish each call's distinct files, or merge them by hand")
    if readme and (dest / "report.json").is_file():
        update_readme(root)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="flat result folder (at most 8 files)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--test-timeout", type=float, default=60, help="per-test limit, seconds")
    ap.add_argument("--kernels-full", action="store_true", help="every kernel shape, not --quick")
    ap.add_argument("--diffusion-backends", nargs="+", default=["eager", "compiled"])
    ap.add_argument("--autotune", action="store_true", help="Inductor max-autotune (diffusion phase)")
    ap.add_argument("--publish", nargs="+", type=Path, default=None, metavar="DIR",
                    help="copy these --out folders into benchmarks/results/ and update the README")
    ap.add_argument("--no-readme", action="store_true", help="with --publish: leave the README")
    ap.add_argument("--_env", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._env:
        write_env(args._env)
        return 0
    if args.publish:
        print(f"published to {publish(args.publish, ROOT, readme=not args.no_readme)}")
        return 0
    if args.out is None:
        ap.error("--out DIR is required (a flat folder: $OUT in a GPU session)")
    order = [p for p in PHASES if p in args.phases]
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_report-"))).resolve()
    records = run_phases([PHASES[p] for p in order], args.out.resolve(), work, args, args.budget_s)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
