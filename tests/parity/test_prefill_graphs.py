"""Bucketed, padded, chunked prefill and the graph runners' code path, on the CPU (issue 11 item 2).

The engine runs every multi-token pass (prefill, dream branch, condition pair) padded to a length
bucket over static buffers; on CUDA each bucket is a captured graph. Here the same runner code runs
eagerly, and through `StandInGraphs` (capture = run the step, replay = run it again), against
the unpadded path (`prefill_buckets=()`) on the tiny checkpoint in fp32:

- padded == unpadded (each sequence alone), one sequence and two packed, logits and conditions;
- padding never writes a live slot: the whole KV cache NaN-poisoned, then after prefills, an
  appended chunk, decode steps padded from batch 1 to 2 and a dream branch, every position a
  sequence owns equals the unpadded engine's and every other one is still NaN (and every output is
  finite: nothing read a poisoned position);
- chunked prefill of a long prompt == one pass, rows spanning chunk boundaries, any row order;
- the stand-in captures every bucket and decode size and replays them; replay == eager bitwise.

Measured on CPU fp32 (torch 2.14.1): padded vs unpadded max |logit diff| 0 to 2.5e-6 (GEMMs of other
row counts), condition rel err 0; chunked (32) vs one pass 0.
"""
from __future__ import annotations

import pytest
import torch

from dreamllm_fast.checkpoint import load_checkpoint
from dreamllm_fast.config import EngineConfig, SpecialTokens
from dreamllm_fast.devtools.parity import graphs_disabled
from dreamllm_fast.engine import EngineModel
from dreamllm_fast.engine.graphs import StandInGraphs

BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128)
LOGIT_ATOL = 2e-5  # fp32, measured <= 2.5e-6 (logits std ~3): GEMM blocking may differ with the row count
COND_RTOL = 1e-5  # measured 0


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
    return _engine(ckpt, graphs=True, prefill_buckets=BUCKETS, cuda_graph_batch_sizes=(2,),
                   capture_logits_graphs=True)


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


def _live(cache, i: int, kv: str = "k") -> torch.Tensor:
    """Layer i's live slots only, [num_slots, max_seq, Hkv, D] (engine/llm.py: KVCache's layout)."""
    return (cache.k if kv == "k" else cache.v)[i][:cache.num_slots]


def _scratch(cache, i: int, kv: str = "k") -> torch.Tensor:
    """Layer i's writable scratch positions, [scratch_len, Hkv, D]."""
    return (cache.k if kv == "k" else cache.v)[i][cache.scratch_slot, :cache.scratch_len]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("lens", [(5,), (13,), (37,), (128,), (13, 37), (3, 120)])
def test_padded_prefill_equals_unpadded(bucketed, unpadded, lens):
    """Packed and padded vs each sequence alone, unpadded (so packing offsets are checked too)."""
    blocks = [_emb(unpadded, n, start=3 + 7 * i) for i, n in enumerate(lens)]
    got = _extend(bucketed, blocks)
    want = torch.cat([_extend(unpadded, [b]) for b in blocks])
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


def _check_cache(m, ref, owned: dict[int, int]) -> None:
    """owned: slot -> length. In every layer's K and V, positions < length hold what the unpadded
    eager engine `ref` wrote there (so no padding overwrote them); every later position is still NaN."""
    for i in range(m.config.llm.num_hidden_layers):
        for kv in ("k", "v"):
            live, want = _live(m.cache, i, kv), _live(ref.cache, i, kv)
            for slot in range(m.cache.num_slots):
                n = owned.get(slot, 0)
                assert torch.allclose(live[slot, :n], want[slot, :n], atol=1e-5, rtol=0), \
                    f"layer {i} {kv} slot {slot}: a valid position differs from the unpadded run"
                assert torch.isnan(live[slot, n:]).all(), \
                    f"layer {i} {kv} slot {slot}: a position past the sequence ({n}) was written"


def test_padding_never_writes_a_live_slot(ckpt):
    """The same calls on a padded engine (stand-in graphs, whole KV buffer NaN-poisoned) and on the
    unpadded eager one: equal outputs, equal cache where sequences live, NaN everywhere else."""
    m = _engine(ckpt, graphs=True, prefill_buckets=BUCKETS, cuda_graph_batch_sizes=(2,))
    ref = _engine(ckpt, prefill_buckets=())
    m.cache.buffer.fill_(float("nan"))  # live slots and scratch
    Q = m.dream_queries.shape[0]
    span = torch.cat([m.embed_tokens([5]), m.dream_queries])
    calls = [  # (session indices, embeddings) in order; lengths after each call
        ((0, 1), [_emb(m, 21), _emb(m, 30)], (21, 30)),  # packed 51 -> bucket 64: 13 padding rows
        ((0,), [_emb(m, 9, start=50)], (30, 30)),  # appended: 9 -> bucket 16
        *[((0,), [m.embed_tokens([40 + k])], (31 + k, 30)) for k in range(5)],  # batch 1 in the batch-2 graph
    ]
    ss = {e: [eng.new_session(), eng.new_session()] for e, eng in (("m", m), ("r", ref))}
    for idx, blocks, lens in calls:
        got = m.extend_batch([ss["m"][i] for i in idx], blocks)
        want = ref.extend_batch([ss["r"][i] for i in idx], blocks)
        assert torch.isfinite(got).all() and (got - want).abs().max().item() <= LOGIT_ATOL
        _check_cache(m, ref, {ss["m"][0].slot: lens[0], ss["m"][1].slot: lens[1]})
    got = ss["m"][1].extend_dream(span, list(range(1, Q + 1)))
    want = ss["r"][1].extend_dream(span, list(range(1, Q + 1)))
    assert torch.isfinite(got).all() and _rel(got, want) <= COND_RTOL
    _check_cache(m, ref, {ss["m"][0].slot: 35, ss["m"][1].slot: 30 + Q + 1})
    written = ~torch.isnan(_scratch(m.cache, 0)).all(dim=(1, 2))
    assert written.any(), "no padding reached the scratch slot: the test padded nothing"
    assert m.decoder.graphs.graphs and m.prefill.graphs and m.graph_backend.replays > 0
    for s in ss["m"] + ss["r"]:
        s.close()


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


def test_logits_step_is_captured_only_when_asked_for(ckpt):
    """The decode loop steps greedy/sample only: by default the bare "logits" step is not captured
    (one graph per batch size saved), and a single-token extend runs it eagerly."""
    m = _engine(ckpt, graphs=True, prefill_buckets=BUCKETS, cuda_graph_batch_sizes=(2,))
    assert sorted(m.decoder.graphs.graphs) == [(2, 'greedy'), (2, 'sample')]
    s = m.new_session()
    try:
        s.extend(_emb(m, 5))
        r0 = m.graph_backend.replays
        assert torch.isfinite(s.extend(_emb(m, 1))).all() and m.graph_backend.replays == r0
    finally:
        s.close()


def test_stand_in_graphs_capture_all_and_replay_equals_eager(bucketed):
    m = bucketed
    be = m.graph_backend
    assert sorted(m.prefill.graphs) == list(BUCKETS)
    assert sorted(m.decoder.graphs.graphs) == [(2, 'greedy'), (2, 'logits'), (2, 'sample')]  # decode: 3 modes
    assert be.captures >= len(BUCKETS) + 3
    x = _emb(m, 41)
    r0 = be.replays
    replayed = _extend(m, [x])
    assert be.replays == r0 + 1, "the bucket-48 pass did not replay its graph"
    with graphs_disabled(m):
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
            _live(c, i, kv).fill_(2 * i + j)
            _scratch(c, i, kv).fill_(-1.0 - (2 * i + j))
    for i in range(L):
        for j, kv in enumerate("kv"):
            assert (_live(c, i, kv) == 2 * i + j).all() and (_scratch(c, i, kv) == -1.0 - (2 * i + j)).all()
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


def test_buckets_past_the_context_are_dropped(ckpt):
    m = _engine(ckpt, prefill_buckets=(8, 16, 64, 128, 256), max_seq=40)
    assert m.prefill.buckets == [8, 16, 40] and m.prefill.chunk == 40  # the context replaces 64..256
    assert m.cache.scratch_len == 24  # the largest gap, 16 -> 40
    for n in (17, 40):
        assert torch.isfinite(_extend(m, [_emb(m, n)])).all()
