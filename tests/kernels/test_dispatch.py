"""Device dispatch of the public ops in dreamllm_fast.kernels.

Tests that force Triton run on TRITON_DEVICE: CUDA tensors on a GPU machine, CPU tensors in
interpreter mode. On the 2026-11-23 H100 run they forced Triton onto CPU tensors without the
interpreter and failed with "Pointer argument cannot be accessed from Triton (cpu tensor?)".
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import dreamllm_fast.kernels as K  # noqa: E402
from dreamllm_fast.kernels import dispatch  # noqa: E402
from dreamllm_fast.kernels import reference as R  # noqa: E402
from kernel_helpers import TRITON_DEVICE, cast_case, make_attention_case, requires_triton_device  # noqa: E402


@pytest.fixture
def restore_backend():
    yield
    K.set_backend(None)


def test_public_names_survive_submodule_imports():
    from dreamllm_fast.kernels.rmsnorm import rmsnorm as launcher  # noqa: F401
    from dreamllm_fast.kernels.swiglu import silu_and_mul as launcher2  # noqa: F401
    assert K.rmsnorm is dispatch.rmsnorm and K.rmsnorm.__module__ == "dreamllm_fast.kernels.dispatch"
    assert K.silu_and_mul is dispatch.silu_and_mul
    for name in K.__all__:
        assert callable(getattr(K, name)), name


def test_backend_env_is_read_at_set_backend(restore_backend, monkeypatch):  # env restored first
    """DREAMLLM_KERNELS is read once (import, or set_backend(None)), not on every op call."""
    x = torch.randn(3, 64)
    monkeypatch.setenv("DREAMLLM_KERNELS", "ref")
    K.set_backend(None)
    assert K.backend() == "ref" and not dispatch._use_triton(x)
    monkeypatch.setenv("DREAMLLM_KERNELS", "triton")
    assert K.backend() == "ref", "the env must not be re-read per call"
    K.set_backend(None)
    assert dispatch._use_triton(x)
    monkeypatch.setenv("DREAMLLM_KERNELS", "auto")
    K.set_backend(None)
    assert dispatch._use_triton(x) == x.is_cuda
    monkeypatch.setenv("DREAMLLM_KERNELS", "bogus")
    with pytest.raises(AssertionError, match="DREAMLLM_KERNELS must be one of"):
        K.set_backend(None)
    dispatch._backend[0] = None  # what import leaves after a bad value: import works, the first op call says why
    with pytest.raises(AssertionError, match="got 'bogus'"):
        K.rmsnorm(x, torch.randn(64), 1e-6)
    K.set_backend("ref")
    assert not dispatch._use_triton(torch.randn(2, device=TRITON_DEVICE or "cpu"))
    with pytest.raises(AssertionError, match="backend must be one of"):
        K.set_backend("cuda")


def test_ref_backend_runs_the_oracles(restore_backend):
    x, w = torch.randn(3, 64), torch.randn(64)
    K.set_backend("ref")
    assert torch.equal(K.rmsnorm(x, w, 1e-6), R.rmsnorm_ref(x, w, 1e-6))


@requires_triton_device
def test_backend_switch_forced_triton(restore_backend):
    gu = torch.randn(2, 128, device=TRITON_DEVICE)
    K.set_backend("triton")
    got = K.silu_and_mul(gu)
    assert got.shape == (2, 64)
    assert (got - R.silu_and_mul_ref(gu)).abs().max() < 1e-5


@requires_triton_device
def test_attention_dispatch_forced_triton_matches_ref(restore_backend):
    case = make_attention_case([3, 5], [4, 0], 2, 2, 64, torch.float32, 16, device=TRITON_DEVICE)
    K.set_backend("triton")
    got = K.append_attention(**cast_case(case, torch.float32))
    K.set_backend("ref")
    want = K.append_attention(**cast_case(case, torch.float32))
    assert got.device == want.device and (got - want).abs().max() < 1e-5


@requires_triton_device
def test_registered_custom_ops_run_eagerly():
    """Launchers are registered as torch.library triton_ops (dreamllm::<op>) with mutated buffers."""
    import dreamllm_fast.kernels.append_attention  # noqa: F401  (registers the ops)
    import dreamllm_fast.kernels.decode_attention  # noqa: F401
    import dreamllm_fast.kernels.dream_projection  # noqa: F401
    import dreamllm_fast.kernels.rmsnorm  # noqa: F401
    import dreamllm_fast.kernels.swiglu  # noqa: F401

    for name in ("append_attention", "decode_attention", "dream_projection", "rmsnorm", "silu_and_mul"):
        assert hasattr(torch.ops.dreamllm, name), name
    x, w = torch.randn(4, 64, device=TRITON_DEVICE), torch.randn(64, device=TRITON_DEVICE)
    out = torch.full_like(x, float("nan"))
    torch.ops.dreamllm.rmsnorm(x, w, 1e-6, None, out, None)
    assert (out - R.rmsnorm_ref(x, w, 1e-6)).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
@pytest.mark.parametrize("op", ["decode", "append", "rmsnorm", "dream_projection"])
def test_torch_compile_fullgraph_bitwise(op):
    """torch.compile (Inductor types Python float arguments fp64) runs every kernel, bit-equal to eager.

    The fp64 typing broke decode attention's loop on the 2026-11-23 H100 run (CompilationError at
    its `for`); tests/kernels/test_targets.py shows the same error without a GPU.
    """
    torch._dynamo.reset()
    if op in ("decode", "append"):
        c = cast_case(make_attention_case([1, 1] if op == "decode" else [5, 9], [10, 300], 32, 32, 128,
                                          torch.float32, 512), torch.bfloat16)
        names = ["q", "k", "v", "k_cache", "v_cache"] + (["cu_seqlens_q"] if op == "append" else []) + \
            ["cache_lens", "slot_ids", "cos", "sin"]
        args = [c[n] for n in names] + ([c["max_seqlen_q"]] if op == "append" else [])
        fn = K.decode_attention if op == "decode" else K.append_attention
    elif op == "rmsnorm":
        args = [torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16),
                torch.randn(4096, device="cuda", dtype=torch.bfloat16), 1e-6]
        fn = K.rmsnorm
    else:
        h = torch.randn(80, 4096, device="cuda", dtype=torch.bfloat16)
        args = [h, torch.arange(3, 67, device="cuda"), torch.randn(4096, device="cuda", dtype=torch.bfloat16),
                torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) / 64, 1e-6]
        fn = K.dream_projection
    eager = fn(*args)
    got = torch.compile(lambda *a: fn(*a) * 1.0, fullgraph=True)(*args)
    torch.testing.assert_close(got, eager, atol=0, rtol=0)
