"""Captured prefill graphs on a GPU: replay == eager bit for bit, poisoned outputs rewritten, graph
memory reported (issue 11 item 2). Skips on the CPU, where tests/parity/test_prefill_graphs.py runs
the same runner code eagerly and through the stand-in backend.

The eager path runs the same bucketed shapes as the graphs (same kernels, same launch configs,
max_seqlen_q = the bucket), so equality is exact (atol 0), for prompt prefill, appended chunks,
the dream branch and the packed [uncond; cond] condition pair.
"""
from __future__ import annotations

import pytest
import torch

from dreamllm_fast.checkpoint import load_checkpoint
from dreamllm_fast.config import EngineConfig, SpecialTokens
from dreamllm_fast.devtools.parity import graphs_disabled

HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
pytestmark = pytest.mark.skipif(not HAS_SM80, reason="needs an Ampere-or-newer NVIDIA GPU (bf16, CUDA graphs); none found")

BUCKETS = (16, 32, 64, 96, 128)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def model(request, tmp_path_factory):
    from dreamllm_fast.engine import EngineModel
    from dreamllm_fast.tiny import make_tiny

    ck = load_checkpoint(make_tiny(tmp_path_factory.mktemp("tiny_prefill_gpu")))
    m = EngineModel(ck, SpecialTokens.from_tokenizer(ck.tokenizer()), device="cuda", dtype=request.param,
                    engine_config=EngineConfig(precision=request.param, prefill_buckets=BUCKETS))
    print(f"graph memory: {m.graph_memory}")
    return m


def _both(m, fn):
    """fn() with graphs replayed, then eagerly (same bucketed shapes); fresh sessions each time."""
    assert sorted(m.prefill.graphs) == list(BUCKETS) and m.prefill.use_graphs
    got = fn()
    with graphs_disabled(m):
        assert not m.prefill.use_graphs
        want = fn()
    return got, want


def _extend(m, lens, prefix=0):
    def fn():
        ss = [m.new_session() for _ in lens]
        try:
            if prefix:
                m.extend_batch(ss, [m.embed_tokens(list(range(3, 3 + prefix)))] * len(ss))
            return m.extend_batch(ss, [m.embed_tokens([5 + (7 * i + j) % 300 for j in range(n)])
                                       for i, n in enumerate(lens)])
        finally:
            for s in ss:
                s.close()
    return fn


@pytest.mark.parametrize("lens, prefix", [((5,), 0), ((37,), 0), ((128,), 0), ((13, 40), 0), ((70,), 9),
                                          ((3, 60), 17)])
def test_prefill_graph_equals_eager_bitwise(model, lens, prefix):
    got, want = _both(model, _extend(model, lens, prefix))
    assert torch.isfinite(got).all()
    assert torch.equal(got, want), f"graph vs eager max diff {(got - want).abs().max().item():.3g}"


def test_dream_branch_and_condition_pair_graph_equals_eager(model):
    m, sp = model, model.special
    Q = m.dream_queries.shape[0]
    span = torch.cat([m.embed_tokens([sp.dream_start]), m.dream_queries])

    def dream():
        s = m.new_session()
        try:
            s.extend(m.embed_tokens(list(range(3, 50))))
            return s.extend_dream(span, list(range(1, Q + 1)))
        finally:
            s.close()

    def pair():
        ss = [m.new_session(), m.new_session()]
        try:
            e_u = torch.cat([m.embed_tokens([sp.bos]), span])
            e_c = torch.cat([m.embed_tokens([sp.bos] + list(range(20, 31))), span])
            return torch.cat(m.condition_pair(ss, [e_u, e_c], [list(range(2, 2 + Q)), list(range(13, 13 + Q))]))
        finally:
            for s in ss:
                s.close()

    for fn in (dream, pair):
        got, want = _both(m, fn)
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_poisoned_static_output_is_rewritten(model):
    """Poisoned outputs: NaN-fill the graphs' static output, replay, compare to eager."""
    m = model
    m.prefill.hidden.fill_(float("nan"))
    got, want = _both(m, _extend(m, (21,)))
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_graph_memory_is_reported(model):
    gm = model.graph_memory
    print(f"prefill + decode graphs share one pool of {gm['pool_bytes'] / 2**20:.2f} MiB")
    assert gm["prefill_graphs"] == len(BUCKETS) and gm["decode_graphs"] >= 1
    assert gm["pool_bytes"] > 0 and gm["kv_cache_bytes"] == model.cache.nbytes
