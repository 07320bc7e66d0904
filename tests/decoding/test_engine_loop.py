"""The decode loop on the real backends (tiny checkpoint, CPU, fp32): the engine's eager twin of the
captured step and the reference's plain step.

- A step run ahead past a stop leaves no trace: the K/V it wrote sit at the committed length, where
  NaN poison changes nothing that a later call computes.
- Sequences batched together (mixed greedy / sampled rows, different budgets) draw exactly their
  solo tokens.
- The engine's self-advancing step traced on FAKE CUDA tensors: no host sync anywhere in it.
- Errors and misuse leave the engine usable.
"""
import pytest
import torch

from dreamllm_fast.checkpoint import load_checkpoint, load_tokenizer
from dreamllm_fast.config import EngineConfig, SpecialTokens
from dreamllm_fast.decoding import DecodeLoop
from dreamllm_fast.engine import EngineModel
from dreamllm_fast.errors import EngineBusyError, InvalidInputError
from dreamllm_fast.reference import ReferenceModel
from dreamllm_fast.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=40)
HOT = SamplingParams(max_new_tokens=40, do_sample=True, temperature=8.0, top_k=64)  # flat: every
# draw depends on the whole distribution (the tiny model's greedy margins are ~30 logits)


@pytest.fixture(scope="module")
def parts(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    tok = load_tokenizer(tiny_ckpt)
    special = SpecialTokens.from_tokenizer(tok)
    eng = EngineModel(ck, special, "cpu", torch.float32, engine_config=EngineConfig(max_batch=4, precision="fp32"))
    ref = ReferenceModel(ck, special, "cpu", torch.float32)
    return eng, ref, tok, special


def _prompt(m, n=23, start=5):
    return m.embed_tokens(list(range(start, start + n)))


def _run(m, tok, sp, seed=0, stops=(), run_ahead=True, emb=None):
    s = m.new_session()
    loop = DecodeLoop(m, tok, 2048, run_ahead=run_ahead)
    seq = loop.add(s, s.extend(_prompt(m) if emb is None else emb), sp, seed, stop_ids=stops)
    while not seq.finished:
        loop.step()
    loop.close()
    return seq, s


@pytest.mark.parametrize("backend", ["engine", "reference"])
def test_run_ahead_step_past_a_stop_leaves_no_trace(parts, backend):
    eng, ref, tok, _ = parts
    m = eng if backend == "engine" else ref
    probe, s = _run(m, tok, GREEDY, run_ahead=False)
    s.close()
    stop = probe.token_ids[9]  # stop where the 10th token comes: a run-ahead step is in flight then
    seq, s = _run(m, tok, GREEDY, stops={stop}, run_ahead=True)
    L = 23 + 9
    assert seq.token_ids == probe.token_ids[:10] and s.length == L
    more = m.embed_tokens(probe.token_ids[9:14])  # a later call appends to the same sequence
    if backend == "engine":
        k0 = m.cache.k[0][s.slot]
        assert k0[L].abs().sum() > 0, "the run-ahead step should have written position L"
        for t in m.cache.k + m.cache.v:
            t[s.slot, L:] = float("nan")  # poison everything at or past the committed length
    else:
        # the reference crops its cache to the committed length: nothing past it exists
        assert all(layer.keys.shape[-2] == L for layer in s.cache.layers)
    got = s.extend(more)
    s.close()
    ctl, sc = _run(m, tok, GREEDY, stops={stop}, run_ahead=False)
    assert sc.length == L
    want = sc.extend(more)
    sc.close()
    assert torch.isfinite(got).all(), "a later call read a position the discarded step wrote"
    assert torch.equal(got, want)


def test_batched_sequences_draw_their_solo_tokens(parts):
    eng, _, tok, _ = parts
    plans = [(GREEDY, 0), (HOT, 1234), (SamplingParams(max_new_tokens=17, do_sample=True, top_p=0.9), 99),
             (SamplingParams(max_new_tokens=25, do_sample=True, temperature=3.0, top_k=5), 7)]
    solo = []
    for i, (sp, seed) in enumerate(plans):
        seq, s = _run(eng, tok, sp, seed, emb=_prompt(eng, 20 + 3 * i, 5 + i))
        solo.append(seq.token_ids)
        s.close()
    loop = DecodeLoop(eng, tok, 2048)
    seqs, sess = [], []
    for i, (sp, seed) in enumerate(plans):
        s = eng.new_session()
        sess.append(s)
        seqs.append(loop.add(s, s.extend(_prompt(eng, 20 + 3 * i, 5 + i)), sp, seed))
        loop.step()  # they join one step apart
    while not all(q.finished for q in seqs):
        loop.step()
    loop.close()
    for s in sess:
        s.close()
    for q, want in zip(seqs, solo):
        assert q.token_ids == want
    assert len(set(solo[1])) > 10, "the hot row is not a degenerate sequence"


class _StandInGraphs:
    """A graph backend with no driver: capture runs the step once, replay runs it again and writes
    the new outputs into the captured ones (what a replay does to graph memory)."""

    def __init__(self):
        self.out = {}
        self.replays = 0

    def warmup(self, fn, runs=2):
        for _ in range(runs):
            fn()

    def capture(self, fn):
        out = fn()
        self.out[fn] = out
        return fn, out

    def replay(self, fn):
        self.out[fn].copy_(fn())
        self.replays += 1

    def synchronize(self):
        pass


def test_graph_runner_on_the_cpu_with_a_stand_in_backend(parts):
    """The runner's bookkeeping without a GPU: every (size, mode) captured, outputs poisoned, three
    sequences padded to a 4-row graph; tokens equal the eager step's, padding rows never advance
    and never leave the scratch slot; single-token extend goes through the logits graph."""
    from dreamllm_fast.engine.cuda_graph import MODES, CudaGraphRunner

    eng, _, tok, _ = parts
    backend = _StandInGraphs()
    runner = CudaGraphRunner(eng.decoder.step, eng.decoder.bufs, (1, 2, 4), "cpu", backend=backend)
    runner.capture()
    assert set(runner.graphs) == {(n, m) for n in (1, 2, 4) for m in MODES}
    for out in runner.step_outputs.values():
        out.fill_(float("nan"))
    plans = [(GREEDY, 0), (HOT, 1234), (SamplingParams(max_new_tokens=30, do_sample=True, top_p=0.9), 9)]

    def three():
        loop = DecodeLoop(eng, tok, 2048)
        seqs, sess = [], []
        for i, (sp, seed) in enumerate(plans):
            s = eng.new_session()
            sess.append(s)
            seqs.append(loop.add(s, s.extend(_prompt(eng, 20 + i, 4 + i)), sp, seed))
        padded = 0
        while not all(q.finished for q in seqs):
            loop.step()
            b = eng.decoder.running
            if eng.decoder.graphs is not None and b is not None:
                assert b.graph and b.n == runner.padded_size(b.B)
                padded += b.n > b.B
                for r in range(b.B, eng.decoder.bufs.capacity):  # padding: never advances, scratch slot only
                    assert eng.decoder.bufs.step_lens[r] == 0 and eng.decoder.bufs.step_slots[r] == eng.cache.scratch_slot
        assert eng.decoder.graphs is None or padded > 10, "three rows should have run padded to four"
        loop.close()
        for s in sess:
            s.close()
        return [q.token_ids for q in seqs]

    eng.decoder.graphs = runner
    try:
        got = three()
        assert backend.replays > 30
        s = eng.new_session()
        s.extend(_prompt(eng))
        one = s.extend(eng.embed_tokens([7]))  # 1 token: the logits graph
        s.close()
    finally:
        eng.decoder.graphs = None
    assert got == three()
    s = eng.new_session()
    s.extend(_prompt(eng))
    assert torch.equal(one, s.extend(eng.embed_tokens([7])))
    s.close()


def test_a_failed_sampling_capture_falls_back_to_the_eager_step(parts):
    from dreamllm_fast.engine.cuda_graph import CudaGraphRunner

    eng, _, tok, _ = parts
    calls = {"sample": 0}

    def step(n, mode):
        if mode == "sample":
            calls["sample"] += 1
            if calls["sample"] == 3:  # two warm-ups pass, the capture fails (e.g. a sort that syncs)
                raise RuntimeError("operation not permitted when stream is capturing")
        return eng.decoder.step(n, mode)

    runner = CudaGraphRunner(step, eng.decoder.bufs, (1,), "cpu", backend=_StandInGraphs())
    with pytest.warns(UserWarning, match="'sample' decode step failed"):
        runner.capture()
    assert "sample" in runner.skipped and (1, "greedy") in runner.graphs
    eng.decoder.graphs = runner
    s = eng.new_session()
    try:
        s.extend(_prompt(eng))
        b = eng.decode_batch([s], [5], [HOT], [1])
        assert not b.graph, "a sampled batch must run the eager step when its graph is missing"
        b.launch()
        b.result()
        b.close([s.length])
        b = eng.decode_batch([s], [5], [GREEDY], [0])
        assert b.graph
        b.close([s.length])
    finally:
        eng.decoder.graphs = None
        s.close()


_FAKE_CUDA_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from dreamllm_fast.checkpoint import llm_expected_shapes
from dreamllm_fast.config import DreamLLMConfig
from dreamllm_fast.engine.decode import EngineDecoder
from dreamllm_fast.engine.llm import KVCache, LlamaRunner, LlamaWeights
from dreamllm_fast.kernels import _utils
_utils._SM_COUNT[0] = 132  # no driver to ask: an H100's SM count
cfg = DreamLLMConfig.from_name("tiny").llm
with FakeTensorMode():
    dev = torch.device("cuda", 0)
    state = {k: torch.randn(s, device=dev, dtype=torch.bfloat16) for k, s in llm_expected_shapes(cfg).items()}
    weights = LlamaWeights(state, cfg, dev, torch.bfloat16)
    llm = LlamaRunner(cfg, weights, KVCache(cfg, 4, 256, dev, torch.bfloat16), dev)
    d = EngineDecoder(llm, 4, torch.bfloat16)  # the decode step and its static buffers
    for mode in ("logits", "greedy", "sample"):
        logits = d.step(3, mode)
        assert logits.shape == (3, cfg.vocab_size) and logits.dtype == torch.float32 and logits.is_cuda
    assert d.bufs.ids.dtype == torch.int64 and d.bufs.ids.is_cuda
print("traced")
"""


def test_decode_step_traces_on_fake_cuda_without_host_syncs():
    """The captured step's exact code on FAKE CUDA tensors (torch's CUDA build, no GPU): an .item(),
    .tolist() or data-dependent shape anywhere in it raises here, as it would break graph capture.
    A subprocess: under TRITON_INTERPRET (this process) the kernels would run on the fake data."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _FAKE_CUDA_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and "traced" in r.stdout, r.stderr[-3000:]


def test_errors_and_misuse_leave_the_engine_usable(parts):
    eng, _, tok, _ = parts
    s1, s2 = eng.new_session(), eng.new_session()
    try:
        s1.extend(_prompt(eng))
        s2.extend(_prompt(eng))
        b = eng.decode_batch([s1], [5], [GREEDY], [0])
        with pytest.raises(EngineBusyError, match="already running"):
            eng.decode_batch([s2], [5], [GREEDY], [0])
        with pytest.raises(InvalidInputError, match="running decode batch"):
            s1.extend(_prompt(eng, 2))  # its device length runs ahead of its host length
        assert not s1.closed, "a refused extend must not release a session the batch still steps"
        b.close([s1.length])
        with pytest.raises(InvalidInputError, match="distinct"):
            eng.decode_batch([s1, s1], [5, 5], [GREEDY] * 2, [0, 0])
        with pytest.raises(InvalidInputError, match="token ids"):
            eng.decode_batch([s1], [10 ** 6], [GREEDY], [0])
        orig = eng.decoder.step

        def boom(n, mode):
            raise RuntimeError("kernel fault")

        eng.decoder.step = boom
        loop = DecodeLoop(eng, tok, 2048)
        loop.add(s1, s1.extend(_prompt(eng, 3)), GREEDY)
        with pytest.raises(RuntimeError, match="kernel fault"):
            for _ in range(3):
                loop.step()
        eng.decoder.step = orig
        assert eng.decoder.running is None, "a failed step must let go of the engine"
    finally:
        s1.close()
        s2.close()
    seq, s = _run(eng, tok, SamplingParams(max_new_tokens=5))
    s.close()
    assert len(seq.token_ids) == 5


def test_abort_after_a_sticky_cuda_error_still_frees_the_engine(parts, monkeypatch):
    """A sticky CUDA error makes abort's synchronize raise: the engine must not stay locked to the
    dead batch (every later call would be refused with EngineBusyError)."""
    eng = parts[0]
    s = eng.new_session()
    try:
        s.extend(_prompt(eng))
        batch = eng.decode_batch([s], [5], [GREEDY], [0])
        batch.cuda = True  # pretend: its abort synchronizes the engine's CUDA stream

        def sticky(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(torch.cuda, "current_stream", sticky)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            batch.abort()
        monkeypatch.undo()
        assert eng.decoder.running is None and s.decoding is None
        eng.decode_batch([s], [5], [GREEDY], [0]).abort()  # a new batch is accepted
    finally:
        s.close()
