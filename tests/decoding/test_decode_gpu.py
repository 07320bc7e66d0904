"""The decode loop on a GPU: captured self-advancing steps (greedy and sampling graphs) against the
same step run eagerly, run-ahead with graphs, poisoned graph outputs. Skips on the CPU (the CPU
suite checks the same step eagerly, its trace on fake CUDA tensors, and the kernel in interpreter
mode)."""
import pytest
import torch

from dreamllm_fast.checkpoint import load_checkpoint, load_tokenizer
from dreamllm_fast.config import EngineConfig, SpecialTokens
from dreamllm_fast.decoding import DecodeLoop
from dreamllm_fast.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA; none found")
HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8

PLANS = [(SamplingParams(max_new_tokens=48), 0),
         (SamplingParams(max_new_tokens=48, do_sample=True, temperature=8.0, top_k=64), 1234),
         (SamplingParams(max_new_tokens=33, do_sample=True, temperature=1.5, top_p=0.9), 7),
         (SamplingParams(max_new_tokens=40, do_sample=True, temperature=0.7), 99)]


def _engine(tiny_ckpt, dtype, max_batch=4):
    from dreamllm_fast.engine import EngineModel

    ck = load_checkpoint(tiny_ckpt)
    tok = load_tokenizer(tiny_ckpt)
    ec = EngineConfig(max_batch=max_batch, precision=dtype, cuda_graph_batch_sizes=(1, 2, 4),
                      capture_logits_graphs=True)
    return EngineModel(ck, SpecialTokens.from_tokenizer(tok), "cuda", dtype, engine_config=ec), tok


def _loop(m, tok, plans, run_ahead=True, stops=()):
    loop = DecodeLoop(m, tok, m.max_len, run_ahead=run_ahead)
    seqs, sess = [], []
    for i, (sp, seed) in enumerate(plans):
        s = m.new_session()
        sess.append(s)
        emb = m.embed_tokens(list(range(5 + i, 25 + 3 * i)))
        seqs.append(loop.add(s, s.extend(emb), sp, seed, stop_ids=stops))
    while not all(q.finished for q in seqs):
        loop.step()
    loop.close()
    for s in sess:
        s.close()
    return [q.token_ids for q in seqs]


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if HAS_SM80 else []))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_graph_loop_equals_eager_loop(tiny_ckpt, dtype, n):
    m, tok = _engine(tiny_ckpt, dtype)
    assert m.decoder.graphs is not None and not m.decoder.graphs.skipped, f"capture skipped: {m.decoder.graphs.skipped}"
    assert all((s, mode) in m.decoder.graphs.graphs for s in (1, 2, 4) for mode in ("logits", "greedy", "sample"))
    got = _loop(m, tok, PLANS[:n])
    saved, m.decoder.graphs = m.decoder.graphs, None
    try:
        want = _loop(m, tok, PLANS[:n])
    finally:
        m.decoder.graphs = saved
    assert got == want
    assert len(set(got[-1])) > 5


def test_run_ahead_with_graphs_equals_one_step_at_a_time(tiny_ckpt):
    m, tok = _engine(tiny_ckpt, torch.float32)
    probe = _loop(m, tok, PLANS[1:2], run_ahead=False)[0]
    stops = {probe[20]}
    assert _loop(m, tok, PLANS[:3], run_ahead=True, stops=stops) == _loop(m, tok, PLANS[:3], run_ahead=False, stops=stops)


def test_sampling_graph_outputs_and_ids_poisoned_then_rewritten(tiny_ckpt):
    """Poisoned outputs for the self-advancing step: NaN its captured logits, junk its ids buffer's
    padding, replay through a batch, compare with the eager step."""
    m, tok = _engine(tiny_ckpt, torch.float32)
    s = m.new_session()
    s.extend(m.embed_tokens(list(range(3, 30))))
    for out in m.decoder.graphs.step_outputs.values():
        out.fill_(float("nan"))
    sp = [PLANS[1][0]]
    b = m.decode_batch([s], [11], sp, [1234])
    m.decoder.bufs.ids[1:].fill_(7)  # padding rows' ids: any valid id; they must not matter
    assert b.graph and b.n == 1
    b.launch()
    got_ids, got_logits = b.result(), b.logits.clone()
    b.close([s.length])
    saved, m.decoder.graphs = m.decoder.graphs, None
    b = m.decode_batch([s], [11], sp, [1234])
    b.launch()
    want_ids, want_logits = b.result(), b.logits.clone()
    b.close([s.length])
    m.decoder.graphs = saved
    s.close()
    assert torch.isfinite(got_logits).all() and torch.equal(got_logits, want_logits)
    assert got_ids == want_ids


def test_run_ahead_step_past_a_stop_leaves_no_trace_gpu(tiny_ckpt):
    """With graphs: the step run past a stop wrote K/V at the committed length; NaN there (and
    beyond) changes nothing a later call computes."""
    m, tok = _engine(tiny_ckpt, torch.float32)
    sp = SamplingParams(max_new_tokens=40)
    probe = _loop(m, tok, [(sp, 0)], run_ahead=False)[0]
    emb = m.embed_tokens(list(range(5, 25)))
    more = m.embed_tokens(probe[9:14])
    out = []
    for run_ahead in (True, False):
        s = m.new_session()
        loop = DecodeLoop(m, tok, m.max_len, run_ahead=run_ahead)
        seq = loop.add(s, s.extend(emb), sp, stop_ids={probe[9]})
        while not seq.finished:
            loop.step()
        loop.close()
        L = 20 + 9
        assert s.length == L and seq.token_ids == probe[:10]
        if run_ahead:
            assert m.cache.k[0][s.slot, L].abs().sum() > 0, "the run-ahead step should have written L"
            for t in m.cache.k + m.cache.v:
                t[s.slot, L:] = float("nan")
        out.append(s.extend(more))
        s.close()
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], out[1])
