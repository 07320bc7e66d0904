"""Running a fake-CUDA check (dreamllm_fast/devtools/check7b.py, export/check_graphs.py) for the
tests of this folder: a child process without TRITON_INTERPRET (under the interpreter the kernels
would run on the fake tensors' data), its last stdout line read as the JSON report."""
import json
import os
import subprocess
import sys


def run_json_report(module: str, *args: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", module, "--json", *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"fake-CUDA run of {module} {' '.join(args)} failed:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])
