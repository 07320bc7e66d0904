"""Split-KV decode attention: Triton kernel vs the float64 oracle; lengths advanced on the device
(eagerly here, through CUDA-graph replays on a GPU)."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from dreamllm_fast.kernels import reference as R  # noqa: E402
from dreamllm_fast.kernels.decode_attention import (CONFIGS, DEFAULT_CONFIG, DecodeConfig,  # noqa: E402
                                                    decode_attention, default_num_splits)
from kernel_helpers import DEVICE, assert_close_to_ref, cast_case, make_attention_case  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")

MMA, SIMT = DEFAULT_CONFIG, DecodeConfig("simt", 64, 4, 1)
# (cache_lens, Hq, Hkv, D, dtype, num_splits): empty cache, 1, 63 and 200 cached tokens, split
# boundaries on the new token (64 = one tile), more splits than live tiles, GQA groups of 2 and 4
CPU_CASES = [
    ([0, 1, 63, 200], 4, 4, 64, torch.float32, None),
    ([200, 64, 0], 4, 2, 128, torch.bfloat16, 3),
    ([63, 130], 4, 1, 64, torch.bfloat16, 1),
    ([127, 128, 64], 2, 2, 128, torch.float32, 8),
]
GPU_CASES = [  # (cache_lens, Hq, Hkv, D)
    ([2047], 32, 32, 128),
    ([0], 32, 32, 128),
    ([700, 1300], 32, 32, 128),
    ([5, 2000, 333, 64], 32, 8, 128),
]
GPU_DTYPES = [torch.float16, torch.bfloat16]


def _nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def _args(c):
    return (c["q"], c["k"], c["v"], c["k_cache"], c["v_cache"], c["cache_lens"], c["slot_ids"], c["cos"], c["sin"])


def _check_against_ref(name, c, dtype, got):
    """got vs the float64 oracle on a copy of the case (the oracle writes its own cache copy)."""
    ref64 = R.decode_attention_ref(*_args(cast_case(c, torch.float64)))
    lowp = R.decode_attention_ref(*_args(cast_case(c, dtype)))
    assert_close_to_ref(name, got, ref64, lowp, dtype)


def run_decode_case(cache_lens, hq, hkv, d, dtype, num_splits, max_seq, config=None):
    base = make_attention_case([1] * len(cache_lens), cache_lens, hq, hkv, d, torch.float32, max_seq)
    lp = cast_case(base, dtype)
    ref64_case, lowp_case, kc = cast_case(lp, torch.float64), cast_case(lp, dtype), cast_case(lp, dtype)
    ref64 = R.decode_attention_ref(*_args(ref64_case))
    lowp = R.decode_attention_ref(*_args(lowp_case))
    out = torch.full_like(lp["q"], float("nan"))
    got = decode_attention(*_args(kc), num_splits=num_splits, out=out, config=config)
    assert got.data_ptr() == out.data_ptr()
    assert_close_to_ref("decode out", got, ref64, lowp, dtype)
    written = torch.zeros(kc["k_cache"].shape[:2], dtype=torch.bool, device=DEVICE)
    for b, L in enumerate(cache_lens):
        written[int(lp["slot_ids"][b]), L] = True
    assert_close_to_ref("decode k_cache", kc["k_cache"][written], ref64_case["k_cache"][written],
                        lowp_case["k_cache"][written], dtype)
    assert torch.equal(kc["v_cache"][written], lowp_case["v_cache"][written])
    assert _nan_equal(kc["k_cache"][~written], lp["k_cache"][~written]), "k_cache touched elsewhere"
    assert _nan_equal(kc["v_cache"][~written], lp["v_cache"][~written]), "v_cache touched elsewhere"
    assert kc["cache_lens"].tolist() == list(cache_lens), "decode must not increment cache_lens"


@pytest.mark.parametrize("config", [MMA, SIMT], ids=["mma", "simt"])
@pytest.mark.parametrize("cache_lens,hq,hkv,d,dtype,num_splits", CPU_CASES)
def test_decode_attention_cpu(cache_lens, hq, hkv, d, dtype, num_splits, config):
    run_decode_case(cache_lens, hq, hkv, d, dtype, num_splits, max_seq=264, config=config)


@requires_cuda
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.variant}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}")
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("cache_lens,hq,hkv,d", GPU_CASES)
def test_decode_attention_gpu_real_shapes(cache_lens, hq, hkv, d, dtype, config):
    run_decode_case(cache_lens, hq, hkv, d, dtype, None, max_seq=2048, config=config)


def test_default_splits_follow_shapes_only():
    """H100 (132 SMs), 7B decode (32 heads): ~4 programs per SM, a power of two, capped by tiles."""
    assert [default_num_splits(b, 32, 2048, 132) for b in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    assert default_num_splits(1, 32, 128, 132) == 2  # a 128-slot cache has only 2 tiles of 64
    assert default_num_splits(1, 8, 2048, 132, block_n=32) == 64  # MAX_SPLITS


def run_length_schedule(capture_lens, step_deltas, steps, hq, d, dtype, max_seq, config=None, graph=False):
    """The CUDA-graph replay schedule: lengths advance on the device between calls.

    Eagerly (graph=False) each step is one launcher call; with graph=True one capture at
    capture_lens is replayed at every step and compared bit-for-bit with an eager call. Keys are
    valid up to the largest length of the schedule and NaN beyond it, so a kernel that reads past
    cache_lens[b] fails the reference check.
    """
    lens = [[c + d_ * s for c, d_ in zip(capture_lens, step_deltas)] for s in range(steps)]
    valid = [max(col) + 1 for col in zip(*lens)]  # the last step writes position max(col)
    c = cast_case(make_attention_case([1] * len(capture_lens), capture_lens, hq, hq, d, torch.float32, max_seq,
                                      valid_lens=valid), dtype)
    out = torch.full_like(c["q"], float("nan"))
    args = _args(c)
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compile, cache the launch plan and its scratch
                decode_attention(*args, out=out, config=config)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            decode_attention(*args, out=out, config=config)
    for step_lens in lens:
        c["cache_lens"].copy_(torch.tensor(step_lens, dtype=torch.int32))
        for name in ("q", "k", "v"):
            c[name].copy_(torch.randn(c[name].shape).to(dtype))
        out.fill_(float("nan"))
        if graph:
            g.replay()
            torch.cuda.synchronize()
            eager = decode_attention(*args, config=config)  # rewrites the same cache position, same values
            torch.testing.assert_close(out, eager, atol=0, rtol=0)
        else:
            decode_attention(*args, out=out, config=config)
        _check_against_ref(f"decode at {step_lens}", c, dtype, out)


@pytest.mark.parametrize("config", [MMA, SIMT], ids=["mma", "simt"])
def test_decode_attention_lengths_advanced_on_device(config):
    """Issue 10: the graph replay test saw every output NaN after advancing cache_lens. Run eagerly,
    the same schedule (small shapes) is right when the keys it attends to are valid; the old test
    poisoned every position past the capture-time lengths, which is what the kernel then read."""
    run_length_schedule([5, 40], [7, 20], 3, 2, 64, torch.bfloat16, 128, config=config)


@requires_cuda
@pytest.mark.parametrize("config", [MMA, SIMT], ids=["mma", "simt"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_decode_attention_cuda_graph_replay(dtype, config):
    """Capture once, poison the output, replay with cache_lens changed on device; graph == eager
    bit for bit, and both match the float64 oracle."""
    run_length_schedule([100, 1500], [7, 200], 3, 32, 128, dtype, 2048, config=config, graph=True)


def test_bad_arguments_name_the_problem():
    c = make_attention_case([1], [3], 2, 2, 64, torch.float32, 64)
    args = list(_args(c))
    with pytest.raises(AssertionError, match="int32"):
        decode_attention(*args[:5], c["cache_lens"].long(), *args[6:])
    with pytest.raises(AssertionError, match="num_splits must be in"):
        decode_attention(*args, num_splits=-1)
    with pytest.raises(AssertionError, match="variant must be"):
        DecodeConfig("tensorcore")
    with pytest.raises(AssertionError, match="block_n must be"):
        DecodeConfig("mma", 48)
    out = decode_attention(*args, num_splits=2)  # the launcher is still usable after the errors
    assert torch.isfinite(out).all()
