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


def test_attention_dispatch_forced_triton_matches_ref(monkeypatch):
    from kernel_helpers import cast_case, make_attention_case

    case = make_attention_case([3, 5], [4, 0], 2, 2, 64, torch.float32, 16, device="cpu")
    monkeypatch.setenv("DREAMLLM_KERNELS", "triton")
    got = K.append_attention(**cast_case(case, torch.float32))
    monkeypatch.setenv("DREAMLLM_KERNELS", "ref")
    want = K.append_attention(**cast_case(case, torch.float32))
    assert (got - want).abs().max() < 1e-5


def test_registered_custom_ops_run_eagerly():
    """Launchers are registered as torch.library triton_ops (dreamllm::<op>) with mutated buffers."""
    import dreamllm_fast.kernels.append_attention  # noqa: F401  (registers the ops)
    import dreamllm_fast.kernels.decode_attention  # noqa: F401
    import dreamllm_fast.kernels.dream_projection  # noqa: F401
    import dreamllm_fast.kernels.rmsnorm  # noqa: F401
    import dreamllm_fast.kernels.swiglu  # noqa: F401

    for name in ("append_attention", "decode_attention", "dream_projection", "rmsnorm", "silu_and_mul"):
        assert hasattr(torch.ops.dreamllm, name), name
    x, w = torch.randn(4, 64), torch.randn(64)
    out = torch.full_like(x, float("nan"))
    torch.ops.dreamllm.rmsnorm(x, w, 1e-6, None, out, None)
    assert (out - R.rmsnorm_ref(x, w, 1e-6)).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
def test_decode_attention_torch_compile_fullgraph():
    from kernel_helpers import cast_case, make_attention_case

    c = cast_case(make_attention_case([1, 1], [10, 300], 32, 32, 128, torch.float32, 512), torch.bfloat16)
    args = (c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["cache_lens"], c["slot_ids"], c["cos"], c["sin"])
    eager = K.decode_attention(*args)
    compiled = torch.compile(lambda *a: K.decode_attention(*a) * 1.0, fullgraph=True)
    got = compiled(*args)
    torch.testing.assert_close(got, eager, atol=0, rtol=0)
