"""The measured path of one chat request, from the HTTP route down to the decode-attention kernel
(dreamllm_fast/devtools/request_path.py): which repository files the calls in progress cross at the
queue append (event loop) and at the kernel entry of a decode step (worker thread).

The in-process run uses the CPU reference kernel (about 2 s after the tiny checkpoint exists); the
`--triton` run forces the Triton launcher in interpreter mode in a child process (17-20 s of CPU
time on a 2-core machine) and must cross the same files up to the kernel's own.
"""
import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the request path needs the 'serve' extra (fastapi)")
pytest.importorskip("httpx", reason="the request path needs httpx (starlette's TestClient)")

from dreamllm_fast import kernels as K  # noqa: E402
from dreamllm_fast.devtools import request_path as rp  # noqa: E402

MAX_FILES = 9  # issue 21's target


@pytest.fixture(scope="module")
def report(tiny_ckpt):
    rep = rp.measure(str(tiny_ckpt))
    print(rp.format_report(rep))
    return rep


def files(rep):
    return [s["file"] for s in rep["path"]]


def test_path_runs_from_the_route_through_the_decode_loop_to_the_kernel(report):
    first, last = report["path"][0], report["path"][-1]
    assert first["file"] == "dreamllm_fast/serving/app.py"
    assert first["functions"][0] == "chat_completions"
    assert rp.DECODE_LOOP in files(report)
    # the kernel file the dispatcher chose: the oracle for CPU tensors unless Triton is forced
    if K.backend() == "triton":
        assert (last["file"], report["kernel"]) == (rp.TRITON_KERNEL, "triton")
    else:
        assert (last["file"], last["functions"][-1]) == rp.REF_KERNEL
        assert report["kernel"] == "reference"
    # the worker's frames start at or after the queue's file, on the way down
    assert 1 < report["worker_from"] < len(report["path"])


def test_path_never_returns_to_a_file_it_left(report):
    assert report["returns"] == 0, rp.format_report(report)
    assert len(set(files(report))) == len(files(report)) == report["files"]
    assert report["moves"] == len(report["path"]) - 1


def test_path_crosses_at_most_nine_files(report):
    """9 since the engine's decode side is one file and submit lives in worker.py (11 before)."""
    assert report["files"] <= MAX_FILES, rp.format_report(report)


def test_summary_counts_moves_returns_and_the_thread_junction():
    route = [("a.py", "route"), ("a.py", "helper"), ("b.py", "submit"), ("q.py", "enqueue")]
    worker = [("q.py", "worker"), ("c.py", "step"), ("b.py", "callback"), ("k.py", "kernel")]
    s = rp.summarize(route, worker)
    assert [(p["file"], p["functions"]) for p in s["path"]] == [
        ("a.py", ["route", "helper"]), ("b.py", ["submit"]), ("q.py", ["enqueue", "worker"]),
        ("c.py", ["step"]), ("b.py", ["callback"]), ("k.py", ["kernel"])]
    # the worker starting in the queue's file is no move; going back to b.py is a return
    assert (s["files"], s["moves"], s["returns"]) == (5, 5, 1)
    assert s["worker_from"] == 3 and s["path"][2]["worker_from"] == 1
    # a worker that starts in another file: one more move, the junction is that file's first frame
    s = rp.summarize(route, [("w.py", "run")] + worker[1:])
    assert (s["files"], s["moves"], s["returns"]) == (6, 6, 1)
    assert s["worker_from"] == 4 and s["path"][3]["worker_from"] == 0


def test_triton_mode_crosses_the_same_files_up_to_the_launcher(report, tiny_ckpt):
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "dreamllm_fast.devtools.request_path", "--triton",
                          "--json", "--checkpoint", str(tiny_ckpt)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    tri = json.loads(out.stdout)
    print(rp.format_report(tri))
    assert (tri["kernel"], tri["kernel_file"]) == ("triton", rp.TRITON_KERNEL)
    assert files(tri)[-1] == rp.TRITON_KERNEL
    assert files(tri)[:-1] == files(report)[:-1]
    assert (tri["moves"], tri["returns"]) == (report["moves"], report["returns"])
