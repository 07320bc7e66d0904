"""What a fresh install needs to keep working as dependencies move on.

- The checkout's top-level ``kernels/`` folder (installed as ``dreamllm_fast.kernels``) must never
  take the top-level name ``kernels`` from the PyPI distribution that transformers and diffusers
  import, even when the repository root is first on ``sys.path`` (``python -m``/``-c`` from the
  root). The dev extra installs that distribution explicitly, so these tests run against it.
- Our calls into transformers use the current API (no deprecation warnings), on every release the
  setup.py range admits.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def test_kernels_library_wins_from_the_repository_root():
    pytest.importorskip("kernels", reason="the dev extra installs the PyPI `kernels` distribution")
    r = _run(["-c", "import kernels, diffusers; from diffusers import AutoencoderKL; "
                    "import dreamllm_fast.kernels as K; "
                    "assert 'site-packages' in kernels.__file__, kernels.__file__; "
                    "assert hasattr(kernels, 'CUDAProperties'); "
                    "assert K.__file__.endswith(('kernels/__init__.py', 'kernels\\\\__init__.py')); "
                    "assert callable(K.rmsnorm)"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


def test_without_the_library_the_name_is_simply_missing():
    # -S: no site-packages, so only the checkout could answer `import kernels`; it must not.
    r = _run(["-S", "-c", "import kernels"], cwd=ROOT)
    assert r.returncode != 0
    assert "ModuleNotFoundError" in r.stderr and "dreamllm_fast.kernels" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("module", ["benchmarks.gpu_report", "benchmarks.bench_host_overhead",
                                    "dreamllm_fast.kernels.targets"])
def test_module_commands_start_from_the_root(module):
    pytest.importorskip("kernels", reason="the dev extra installs the PyPI `kernels` distribution")
    r = _run(["-m", module, "--help"], cwd=ROOT)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-3000:]


def test_module_commands_start_from_elsewhere_with_the_checkout_on_pythonpath(tmp_path):
    # PYTHONPATH puts the checkout before site-packages, as the root's own sys.path entry does
    pytest.importorskip("kernels", reason="the dev extra installs the PyPI `kernels` distribution")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(ROOT)
    for args in (["-m", "benchmarks.gpu_report", "--help"],
                 ["-c", "import kernels, dreamllm_fast.kernels as K; "
                        "assert 'site-packages' in kernels.__file__ and callable(K.rmsnorm)"]):
        r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


def test_reference_llm_calls_use_the_current_transformers_api(ref_pipe):
    from dreamllm_fast.reference.model import ReferenceSession

    sess = ReferenceSession(ref_pipe.model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            emb = ref_pipe.model.llm.model.embed_tokens.weight[:5].detach()
            logits = sess.extend(emb)
            sess.extend(emb[:1])
    finally:
        sess.close()
    assert logits.shape[-1] == ref_pipe.model.llm.config.vocab_size and sess.length == 6
