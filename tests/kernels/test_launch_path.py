"""The eager launch path: raw Triton kernels, never `torch.library.wrap_triton`.

On an H100 (torch 2.11, triton 3.6) an eager call through `wrap_triton` cost 0.19 to 1.04 ms of host
time per op against 1.3 to 11 us of GPU time, so the eager path must not touch it; traced calls
(fake tensors here, torch.compile on a GPU) must. In interpreter mode `wrap_triton` returns the raw
kernel, so the check counts the calls to `wrap_triton` itself, with a stand-in that records them.
"""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import dreamllm_fast.kernels as K  # noqa: E402
from dreamllm_fast.kernels import reference as R  # noqa: E402
from kernel_helpers import DEVICE, cast_case, make_attention_case  # noqa: E402


class _CountingWrap:
    """Stands in for torch.library.wrap_triton: records the kernel, launches nothing."""

    def __init__(self):
        self.kernels = []

    def __call__(self, kernel):
        self.kernels.append(kernel)
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _inputs(device):
    """Tiny real inputs of every public op: {name: kwargs}."""
    x, w = torch.randn(3, 64, device=device), torch.randn(64, device=device)
    case = make_attention_case([3, 2], [4, 0], 2, 2, 64, torch.float32, 16, device=device)
    dcase = make_attention_case([1, 1], [5, 0], 2, 2, 64, torch.float32, 16, device=device)
    dcase = {k: v for k, v in dcase.items() if k not in ("cu_seqlens_q", "max_seqlen_q")}
    return {
        "rmsnorm": dict(x=x, weight=w, eps=1e-6),
        "rmsnorm_residual": dict(x=x, weight=w, eps=1e-6, residual=torch.randn(3, 64, device=device)),
        "silu_and_mul": dict(gate_up=torch.randn(2, 128, device=device)),
        "append_attention": cast_case(case, torch.float32),
        "decode_attention": cast_case(dcase, torch.float32),
        "dream_projection": dict(hidden=torch.randn(9, 64, device=device), rows=torch.tensor([2, 5, 7], device=device),
                                 norm_weight=w, proj_weight=torch.randn(16, 64, device=device), eps=1e-6),
    }


def _call(name, kwargs, ops=K):
    fn = getattr(ops, name.replace("_residual", "") + ("_ref" if ops is R else ""))
    kwargs = {k: (v.clone() if k in ("residual", "k_cache", "v_cache") else v) for k, v in kwargs.items()}
    out = fn(**kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def counting_wrap(monkeypatch):
    wrap = _CountingWrap()
    monkeypatch.setattr(torch.library, "wrap_triton", wrap)
    K.set_backend("triton")
    yield wrap
    K.set_backend(None)


def test_eager_calls_launch_raw_kernels(counting_wrap):
    for name, kwargs in _inputs(DEVICE).items():
        out = _call(name, kwargs)
        assert counting_wrap.kernels == [], f"{name}: the eager path went through wrap_triton"
        assert (out - _call(name, kwargs, R)).abs().max().item() < 1e-4, name


def test_traced_calls_go_through_wrap_triton(counting_wrap):
    """The positive control: under a fake mode every op reaches its kernels via wrap_triton."""
    inputs = _inputs(DEVICE)
    with FakeTensorMode() as mode:
        for name, kwargs in inputs.items():
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            before = len(counting_wrap.kernels)
            _call(name, fake)
            assert len(counting_wrap.kernels) > before, f"{name}: a traced call skipped wrap_triton"


def test_is_tracing_sees_fake_tensors_outside_their_mode():
    from dreamllm_fast.kernels._utils import is_tracing

    assert not is_tracing(torch.randn(2))
    mode = FakeTensorMode()
    with mode:
        fake = torch.randn(2)
        assert is_tracing()
    assert is_tracing(fake), "a FakeTensor passed outside its mode must route to the op"


def test_dynamo_traces_every_op_fullgraph(counting_wrap):
    """torch.compile sees each public op as one custom op, no graph break in the launchers' Python
    (plan caches, checks, dispatch). The kernels themselves are stubbed (CPU tensors: the
    interpreter cannot run on fake tensors); a GPU compiles them for real in test_dispatch.py."""
    for name, kwargs in _inputs(DEVICE).items():
        torch._dynamo.reset()
        before = len(counting_wrap.kernels)
        fn = getattr(K, name.replace("_residual", ""))
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        compiled = torch.compile(lambda **t: fn(**t, **rest), fullgraph=True, backend="eager")
        compiled(**{k: (v.clone() if k in ("residual", "k_cache", "v_cache") else v) for k, v in tensors.items()})
        assert len(counting_wrap.kernels) > before, f"{name}: the traced op never reached wrap_triton"


def test_steady_state_calls_only_look_up_their_plan(monkeypatch):
    """After the first call of a shape, a call computes no launch plan (no config arithmetic, no
    scratch allocation), inspects no signature, walks no pytree and never reaches wrap_triton."""
    import importlib
    import inspect

    import torch.utils._pytree as pytree

    mods = [importlib.import_module(f"dreamllm_fast.kernels.{m}") for m in
            ("rmsnorm", "swiglu", "append_attention", "decode_attention", "dream_projection")]
    launched = []
    kernels = {id(v): v for m in mods for v in vars(m).values() if hasattr(v, "run") and hasattr(v, "fn")}
    for k in kernels.values():
        monkeypatch.setattr(k, "run", lambda *a, grid, warmup, _k=k, **kw: launched.append(_k.fn.__name__),
                            raising=False)
    K.set_backend("triton")
    try:
        inputs = _inputs(DEVICE)
        for name, kwargs in inputs.items():
            _call(name, kwargs)  # first call of the shape: plan made

        def forbidden(what):
            def fail(*a, **k):
                raise AssertionError(f"steady-state call reached {what}")
            return fail

        for m in mods:
            monkeypatch.setattr(m, "_meta", forbidden(f"{m.__name__}._meta"))
        monkeypatch.setattr(inspect, "signature", forbidden("inspect.signature"))
        monkeypatch.setattr(pytree, "tree_flatten", forbidden("pytree.tree_flatten"))
        monkeypatch.setattr(torch.library, "wrap_triton", forbidden("wrap_triton"))
        for name, kwargs in inputs.items():
            launched.clear()
            _call(name, kwargs)
            assert launched, f"{name}: no kernel launched"
    finally:
        K.set_backend(None)
