"""Bucketed, padded, chunked prefill and the graph runners' code path, on the CPU (issue 11 item 2).

The engine runs every multi-token pass (prefill, dream branch, condition pair) padded to a length
bucket over static buffers; on CUDA each bucket is a captured graph. Here the same runner code runs
eagerly, and through `StandInGraphs` (capture = run the step, replay = run it again), against
the unpadded path (`prefill_buckets=()`) on the tiny checkpoint in fp32:

- padded == unpadded, one sequence and two packed, logits and dream conditions;
- padding never writes a live slot: the whole KV cache NaN-poisoned, then every position a
  sequence does not own must still be NaN after prefills, decode steps padded from batch 1 to 2,
  and a condition pair (and every output finite: nothing read a poisoned position);
- chunked prefill of a long prompt == one pass, rows spanning chunk boundaries, any row order;
- the stand-in captures every bucket and decode size and replays them; replay == eager bitwise.

Measured on CPU fp32 (torch 2.14.1): padded vs unpadded max |logit diff| 1.9e-6, condition rel err
3e-7; chunked vs one pass max |logit diff| 2.9e-6.
"""
from __future__ import annotations

import pytest
import torch

from dreamllm_fast.checkpoint import load_checkpoint
from dreamllm_fast.config import EngineConfig, SpecialTokens
from dreamllm_fast.engine import EngineModel
from dreamllm_fast.engine.graphs import StandInGraphs

BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
LOGIT_ATOL = 2e-5  # fp32, measured 1.9e-6 (padded) / 2.9e-6 (chunked): GEMM blocking differs with M
COND_RTOL = 1e-5  # measured 3e-7


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    return ck, SpecialTokens.from_tokenizer(ck.tokenizer())


def _engine(ckpt, graphs=False, **cfg):
    ck, special = ckpt
    ec = EngineConfig(precision="fp32", **cfg)
    return EngineModel(ck, special, "cpu", torch.float32, engine_config=ec,
                       graph_backend=StandInGraphs() if graphs else None)


@pytest.fixture(scope="module")
def unpadded(ckpt):
    return _engine(ckpt, prefill_buckets=())


@pytest.fixture(scope="module")
def bucketed(ckpt):
    return _engine(ckpt, graphs=True, prefill_buckets=BUCKETS, cuda_graph_batch_sizes=(2,))


def _emb(m, n, start=3):
    return m.embed_tokens([start + i % 300 for i in range(n)])


def _extend(m, blocks):
    """Fresh sessions extended by `blocks` (one block per session, one packed call); closed after."""
    ss = [m.new_session() for _ in blocks]
    try:
        return m.extend_batch(ss, blocks)
    finally:
        for s in ss:
            s.close()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("lens", [(5,), (13,), (37,), (128,), (13, 37), (3, 120)])
def test_padded_prefill_equals_unpadded(bucketed, unpadded, lens):
    blocks = [_emb(unpadded, n, start=3 + 7 * i) for i, n in enumerate(lens)]
    got, want = _extend(bucketed, blocks), _extend(unpadded, blocks)
    worst = (got - want).abs().max().item()
    print(f"lens {lens}: max |logit diff| {worst:.3g}")
    assert got.shape == want.shape == (len(lens), unpadded.config.llm.vocab_size)
    assert worst <= LOGIT_ATOL


def test_padded_condition_pair_equals_unpadded(bucketed, unpadded):
    m, Q = unpadded, unpadded.dream_queries.shape[0]
    e_u = torch.cat([m.embed_tokens([1, 5]), m.dream_queries])
    e_c = torch.cat([_emb(m, 11), m.dream_queries])
    rows = [list(range(2, 2 + Q)), list(range(11, 11 + Q))]
    out = []
    for eng in (bucketed, unpadded):
        ss = [eng.new_session(), eng.new_session()]
        out.append(eng.condition_pair(ss, [e_u, e_c], rows))
        for s in ss:
            s.close()
    for got, want in zip(*out):
        print(f"condition rel err {_rel(got, want):.3g}")
        assert got.shape == want.shape == (Q, m.config.diffusion.cross_attention_dim)
        assert _rel(got, want) <= COND_RTOL


def _owned_positions_finite_rest_nan(m, owned: dict[int, int]) -> None:
    """owned: slot -> length. In every layer's K and V, positions < length are finite, the rest NaN."""
    c = m.cache
    for i in range(m.config.llm.num_hidden_layers):
        for kv in ("k", "v"):
            live = c.live(i, kv)
            for slot in range(c.num_slots):
                n = owned.get(slot, 0)
                assert torch.isfinite(live[slot, :n]).all(), f"layer {i} {kv} slot {slot}: a valid position is NaN"
                assert torch.isnan(live[slot, n:]).all(), \
                    f"layer {i} {kv} slot {slot}: a position past the sequence ({n}) was written"


def test_padding_never_writes_a_live_slot(ckpt):
    m = _engine(ckpt, graphs=True, prefill_buckets=BUCKETS, cuda_graph_batch_sizes=(2,))
    m.cache.buffer.fill_(float("nan"))  # live slots and scratch
    a, b = m.new_session(), m.new_session()
    assert torch.isfinite(m.extend_batch([a, b], [_emb(m, 21), _emb(m, 30)])).all()  # 51 -> bucket 64
    _owned_positions_finite_rest_nan(m, {a.slot: 21, b.slot: 30})
    assert torch.isfinite(a.extend(_emb(m, 9))).all()  # appended: 9 -> bucket 16
    for step in range(5):  # decode at batch 1 replays the batch-2 graph: one padding row
        assert torch.isfinite(a.extend(m.embed_tokens([40 + step]))).all()
    _owned_positions_finite_rest_nan(m, {a.slot: 35, b.slot: 30})
    Q = m.dream_queries.shape[0]
    cond = b.extend_dream(torch.cat([m.embed_tokens([5]), m.dream_queries]), list(range(1, Q + 1)))
    assert torch.isfinite(cond).all()
    _owned_positions_finite_rest_nan(m, {a.slot: 35, b.slot: 30 + Q + 1})
    written = ~torch.isnan(m.cache.scratch(0)).all(dim=(1, 2))
    assert written.any(), "no padding reached the scratch slot: the test padded nothing"
    assert m.graphs.graphs and m.prefill.graphs and m.graph_backend.replays > 0
    a.close()
    b.close()


def test_chunked_prefill_equals_one_pass(ckpt, unpadded):
    m = _engine(ckpt, graphs=True, prefill_buckets=(8, 16, 32), prefill_chunk=32)
    assert m.prefill.chunk == 32
    x = _emb(unpadded, 100)
    got, want = _extend(m, [x]), _extend(unpadded, [x])
    worst = (got - want).abs().max().item()
    print(f"100 tokens in chunks of 32: max |logit diff| {worst:.3g}")
    assert worst <= LOGIT_ATOL
    # two sequences whose tokens straddle chunks; rows crossing boundaries, unsorted, repeated
    ys = [_emb(unpadded, 45, start=9), _emb(unpadded, 38, start=70)]
    rows = [[44, 3, 31, 32, 33, 3], [0, 37, 20]]
    out = []
    for eng in (m, unpadded):
        ss = [eng.new_session(), eng.new_session()]
        out.append(eng.condition_pair(ss, ys, rows))
        for s in ss:
            s.close()
    for got, want in zip(*out):
        assert got.shape == want.shape
        assert _rel(got, want) <= COND_RTOL
    assert torch.equal(out[0][0][1], out[0][0][5]), "a repeated row must give the same condition"


def test_stand_in_graphs_capture_all_and_replay_equals_eager(bucketed):
    m = bucketed
    be = m.graph_backend
    assert sorted(m.prefill.graphs) == list(BUCKETS) and sorted(m.graphs.graphs) == [2]
    assert be.captures >= len(BUCKETS) + 1
    x = _emb(m, 41)
    r0 = be.replays
    replayed = _extend(m, [x])
    assert be.replays == r0 + 1, "the bucket-48 pass did not replay its graph"
    with m.graphs_disabled():
        eager = _extend(m, [x])
    assert be.replays == r0 + 1
    assert torch.equal(replayed, eager)
    assert set(m.graph_memory) >= {"pool_bytes", "kv_cache_bytes", "prefill_graphs", "decode_graphs"}


def test_kv_cache_views_and_scratch_size(ckpt):
    """Each layer's K and V live slots are distinct memory; the scratch slot is short."""
    m = _engine(ckpt, prefill_buckets=BUCKETS)
    c = m.cache
    assert c.scratch_len == 32  # the largest bucket gap (96 -> 128), a multiple of 8
    L = m.config.llm.num_hidden_layers
    for i in range(L):
        for j, kv in enumerate("kv"):
            c.live(i, kv).fill_(2 * i + j)
            c.scratch(i, kv).fill_(-1.0 - (2 * i + j))
    for i in range(L):
        for j, kv in enumerate("kv"):
            assert (c.live(i, kv) == 2 * i + j).all() and (c.scratch(i, kv) == -1.0 - (2 * i + j)).all()
    full = 2 * L * (c.num_slots + 1) * c.max_seq * c.k[0].shape[2] * c.k[0].shape[3] * 4
    print(f"KV cache {c.nbytes} bytes vs {full} with a full-length scratch slot")
    assert c.nbytes < full


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefill_buckets=(0, 8)), "positive integers"),
    (dict(prefill_buckets=(8, 16), prefill_chunk=32), "exceeds the largest prefill bucket"),
    (dict(prefill_chunk=0), "positive integer"),
])
def test_bad_prefill_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_wrong_embedding_width_is_a_clear_error_and_frees_the_slot(bucketed):
    from dreamllm_fast.errors import InvalidInputError

    m = bucketed
    s = m.new_session()
    with pytest.raises(InvalidInputError, match=r"embeddings must be \[n >= 1, 128\]"):
        s.extend(torch.zeros(4, 129))
    assert sorted(m._free) == list(range(m.engine_config.max_batch))
    assert torch.isfinite(_extend(m, [_emb(m, 6)])).all()  # still usable
