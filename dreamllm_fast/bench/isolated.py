"""Run one bench job in a child process, so that a crash cannot take the parent down with it.

Parent side: ``run_isolated(job, spec, stage=..., provider=..., timeout_s=...)`` starts

    python -m dreamllm_fast.bench.isolated TARGET SPEC.json ROWS.json

in its own process group and returns the rows the child wrote. A job that raises, a child that
dies (a device-side assert, a segfault, ``os._exit``) or one that runs past its timeout (its whole
process group is killed) becomes an error row; rows the child wrote before it died are kept. The
parent never touches the child's CUDA context, so its own stays healthy.

Child side: TARGET is a name in JOBS or ``module:function``; the function is called as
``fn(spec, emit)`` and ``emit(row)`` rewrites ROWS.json after every row. This module imports
nothing heavy itself: the target imports what it needs.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Job:
    target: str  # "module:function"
    needs_cuda: bool = True


JOBS = {
    "compile_static": Job("dreamllm_fast.bench.baselines:compile_static_job"),
    "diffusion_backend": Job("dreamllm_fast.bench.baselines:diffusion_backend_job"),
}


def _row(stage, provider, error, error_type, where, **fields) -> dict:
    return {"stage": stage, "provider": provider, "error": error[:300], "error_type": error_type,
            "where": where, "isolated": True, **fields}


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-n:].split())


def run_isolated(job: str, spec: dict, *, stage: str, provider: str, timeout_s: float,
                 fields: dict | None = None) -> list[dict]:
    """The rows of `job` run in a child process; failures and timeouts become error rows."""
    fields = dict(fields or {})
    j = JOBS[job]
    if j.needs_cuda and not str(spec.get("device", "")).startswith("cuda"):
        return [_row(stage, provider, f"skipped: the {job} baseline needs CUDA (device "
                     f"{spec.get('device')})", "NeedsCUDA", f"isolated job {job}", **fields)]
    if timeout_s <= 0:
        return [_row(stage, provider, "skipped: no time left in the budget", "Budget",
                     f"isolated job {job}", **fields)]
    with tempfile.TemporaryDirectory(prefix="dreamllm-bench-job-") as d:
        d = Path(d)
        spec_path, rows_path, log_path = d / "spec.json", d / "rows.json", d / "child.log"
        spec_path.write_text(json.dumps({**spec, "stage": stage, "provider": provider, "fields": fields},
                                        default=str))
        cmd = [sys.executable, "-m", "dreamllm_fast.bench.isolated", j.target, str(spec_path),
               str(rows_path)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # own group: a timeout kills it all
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = None
        rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
        where = f"isolated job {job} ({j.target})"
        if rc is None:
            rows.append(_row(stage, provider, f"timed out after {timeout_s:.0f} s; child output: "
                             f"{_tail(log_path, 300)}", "Timeout", where, **fields))
        elif rc != 0:
            rows.append(_row(stage, provider, f"child process exited with code {rc}; child output: "
                             f"{_tail(log_path)}", "ChildCrashed", where, **fields))
        elif not rows:
            rows.append(_row(stage, provider, "child process wrote no rows", "NoRows", where, **fields))
        return rows


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------------- child
def _resolve(target: str):
    if target in JOBS:
        target = JOBS[target].target
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def main(argv=None) -> int:
    target, spec_path, rows_path = (argv or sys.argv[1:])[:3]
    spec = json.loads(Path(spec_path).read_text())
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append({**spec.get("fields", {}), **row})
        tmp = Path(rows_path + ".tmp")
        tmp.write_text(json.dumps(rows, default=str))
        os.replace(tmp, rows_path)  # always a whole JSON file, even if the child dies next

    try:
        _resolve(target)(spec, emit)
    except Exception as e:  # a Python error is a row; only a dead process is a crash
        from .stages import error_row

        emit(error_row(spec["stage"], spec["provider"], e, isolated=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
