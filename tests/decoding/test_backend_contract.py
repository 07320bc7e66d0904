"""Every backend (engine, reference, stub) offers what dreamllm_fast/backend.py declares, and the
one-call-per-session passes of the reference and stub equal their sessions' own calls."""
import pytest
import torch

from dreamllm_fast.backend import Backend, DecodeBatch, Session
from dreamllm_fast.checkpoint import load_tokenizer
from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
from dreamllm_fast.pipeline import DreamLLMPipeline
from dreamllm_fast.sampling import SamplingParams
from dreamllm_fast.devtools.stub import StubModel

GREEDY = SamplingParams(max_new_tokens=4)


@pytest.fixture(scope="module")
def backends(tiny_ckpt, ref_pipe):
    eng = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                           progress=False).model
    tok = load_tokenizer(tiny_ckpt)
    stub = StubModel(DreamLLMConfig.from_name("tiny"), SpecialTokens.from_tokenizer(tok), [259, 260, 261])
    return {"engine": eng, "reference": ref_pipe.model, "stub": stub}


@pytest.mark.parametrize("name", ["engine", "reference", "stub"])
def test_backend_implements_the_protocols(backends, name):
    m = backends[name]
    assert isinstance(m, Backend), [a for a in Backend.__protocol_attrs__ if not hasattr(m, a)]
    assert isinstance(m.prefill_chunk, int) and m.prefill_chunk > 0 and m.max_len > 0
    s = m.new_session()
    try:
        assert isinstance(s, Session)
        s.extend(m.embed_tokens([1, 5, 9]))
        batch = m.decode_batch([s], [7], [GREEDY], [0])
        assert isinstance(batch, DecodeBatch)
        batch.launch()
        assert batch.inflight == 1 and len(batch.result()) == 1 and batch.inflight == 0
        batch.close([batch.base[0] + 1])  # accept the one step
        assert s.length == 4
    finally:
        s.close()


@pytest.mark.parametrize("name", ["engine", "reference"])
def test_batched_passes_equal_single_calls(backends, name):
    m = backends[name]
    emb = [m.embed_tokens([1, 5, 9, 11]), m.embed_tokens([1, 7])]
    rows = [[1, 2], [0]]
    solo = [m.new_session() for _ in emb]
    try:
        want = torch.stack([s.extend(e) for s, e in zip(solo, emb)])
        want_c = [s.extend_dream(e, r) for s, e, r in zip(solo, emb, rows)]
        assert [s.length for s in solo] == [8, 4]
    finally:
        for s in solo:
            s.close()
    pair = [m.new_session() for _ in emb]
    try:
        torch.testing.assert_close(m.extend_batch(pair, emb), want, rtol=1e-5, atol=1e-5)
        for g, w in zip(m.condition_pair(pair, emb, rows), want_c, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert [s.length for s in pair] == [8, 4]
    finally:
        for s in pair:
            s.close()
