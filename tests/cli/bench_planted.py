"""Planted isolated-bench jobs for the isolation tests: `python -m dreamllm_fast.bench.isolated
bench_planted:<fn>` imports this module (the tests put this folder on PYTHONPATH)."""
import os
import subprocess
import sys
import time
from pathlib import Path


def crash(spec, emit):
    """One good row, then the process dies the way a device-side assert ends it: no cleanup."""
    emit({"stage": spec["stage"], "provider": spec["provider"], "ms": 1.0, "context": 16,
          "planted": True})
    os._exit(3)


def hang(spec, emit):
    """Hangs, with a grandchild (as Inductor's compile workers are) that must die with it."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(spec["options"]["pid_file"]).write_text(f"{os.getpid()} {worker.pid}")
    time.sleep(600)


def raise_error(spec, emit):
    raise ValueError("planted failure inside the child")
