"""Device dispatch of the public ops in dreamllm_fast.kernels."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import dreamllm_fast.kernels as K  # noqa: E402
from dreamllm_fast.kernels import reference as R  # noqa: E402


def test_public_names_survive_submodule_imports():
    from dreamllm_fast.kernels.rmsnorm import rmsnorm as launcher  # noqa: F401
    from dreamllm_fast.kernels.swiglu import silu_and_mul as launcher2  # noqa: F401
    assert callable(K.rmsnorm) and K.rmsnorm.__module__ == "dreamllm_fast.kernels"
    assert K.silu_and_mul.__module__ == "dreamllm_fast.kernels"
    for name in K.__all__:
        assert callable(getattr(K, name)), name


def test_backend_switch(monkeypatch):
    x = torch.randn(3, 64)
    w = torch.randn(64)
    monkeypatch.setenv("DREAMLLM_KERNELS", "ref")
    assert K.backend() == "ref" and not K._use_triton(x)
    assert torch.equal(K.rmsnorm(x, w, 1e-6), R.rmsnorm_ref(x, w, 1e-6))
    monkeypatch.setenv("DREAMLLM_KERNELS", "triton")
    assert K._use_triton(x)
    got = K.silu_and_mul(torch.randn(2, 128))
    assert got.shape == (2, 64)
    monkeypatch.setenv("DREAMLLM_KERNELS", "auto")
    assert K._use_triton(x) == x.is_cuda
    K.set_backend("ref")
    try:
        monkeypatch.setenv("DREAMLLM_KERNELS", "triton")
        assert not K._use_triton(x)
    finally:
        K.set_backend(None)
