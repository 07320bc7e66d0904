"""DecodeLoop bookkeeping over the stub backend (scripted tokens, no model math): stop rules,
run-ahead, pause/resume, many sequences joining and leaving, cancellation, errors.

The stub's walk is the same for every sequence: ordinary pieces WORDS[0], WORDS[1], ... (cycling),
and with `dream_every` a `<dream_start>` after every that many text tokens. Its decode batch raises
if a step would write at or past the context, and counts launched steps.
"""
import pytest
import torch

from dreamllm_fast.checkpoint import load_tokenizer
from dreamllm_fast.decoding import DecodeLoop, State
from dreamllm_fast.sampling import SamplingParams
from loop_helpers import PROMPT, WORDS, prefilled, stub  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def run_one(model, tok, sp, stops=(), pauses=(), run_ahead=True, max_len=None, prompt=PROMPT):
    s, logits = prefilled(model, prompt)
    loop = DecodeLoop(model, tok, max_len or model.max_len, run_ahead=run_ahead)
    seq = loop.add(s, logits, sp, stop_ids=stops, pause_ids=pauses)
    events = []
    while not seq.finished:
        events += loop.step()
    loop.close()
    return seq, [(e.kind, e.token, e.text, e.reason) for e in events], s


@pytest.mark.parametrize("run_ahead", [True, False])
def test_stop_id_stops_at_exactly_that_token(tok, run_ahead):
    m = stub(tok)
    stop = WORDS[37]
    seq, ev, s = run_one(m, tok, SamplingParams(max_new_tokens=100), stops={stop}, run_ahead=run_ahead)
    assert seq.token_ids == WORDS[:38] and seq.finish_reason == "stop"
    assert ev[-1][:2] == ("finish", stop) and all(k == "token" for k, *_ in ev[:-1])
    assert "".join(e[2] for e in ev) == tok.decode(WORDS[:37])
    assert s.length == PROMPT + 37, "committed length: the stop token is never fed"
    # run ahead wastes at most the one step past the stop
    assert m.launches == 37 + (1 if run_ahead else 0)


def test_run_ahead_changes_nothing_but_timing(tok):
    a = run_one(stub(tok, dream_every=7), tok, SamplingParams(max_new_tokens=60), stops={WORDS[40]},
                pauses=set(), run_ahead=True)
    b = run_one(stub(tok, dream_every=7), tok, SamplingParams(max_new_tokens=60), stops={WORDS[40]},
                pauses=set(), run_ahead=False)
    assert a[1] == b[1] and a[0].token_ids == b[0].token_ids and a[2].length == b[2].length


def test_budget_ends_without_a_wasted_step(tok):
    m = stub(tok)
    seq, ev, s = run_one(m, tok, SamplingParams(max_new_tokens=25))
    assert len(seq.token_ids) == 25 and seq.finish_reason == "length"
    assert m.launches == 24, "token 1 comes from the prefill; a 25th step would be wasted"
    assert s.length == PROMPT + 24


def test_context_end_finishes_before_any_step_could_overflow(tok):
    m = stub(tok, max_positions=64)
    seq, ev, s = run_one(m, tok, SamplingParams(max_new_tokens=100), prompt=54)
    # the one-at-a-time rule: after a text token, stop once the cache holds the whole context
    assert seq.finish_reason == "context" and len(seq.token_ids) == 11 and s.length == 64
    assert m.launches == 10  # the stub raises on a launch at position >= 64


def test_pause_resume_and_budget_spent_on_the_pause(tok):
    m = stub(tok, dream_every=6)
    ds = m.special.dream_start
    assert tok.convert_ids_to_tokens(WORDS[6]).startswith("\u2581"), "segment 2 must start on a word"
    s, logits = prefilled(m)
    loop = DecodeLoop(m, tok, m.max_len)
    seq = loop.add(s, logits, SamplingParams(max_new_tokens=14), pause_ids={ds})

    def until_pause():
        ev = []
        while seq.state is not State.PAUSED and not seq.finished:
            ev += loop.step()
        return ev

    ev = until_pause()
    assert ev[-1].kind == "pause" and ev[-1].token == ds and seq.token_ids == WORDS[:6] + [ds]
    assert "".join(e.text for e in ev) == tok.decode(WORDS[:6]), "the pause flushes the segment"
    assert s.length == PROMPT + 6, "the session is committed before the owner sees the pause"
    s.extend_dream(torch.zeros(17, 4), list(range(1, 17)))  # the dream branch, then the image span
    loop.resume(seq, s.extend(torch.zeros(259, 4)))
    ev = until_pause()
    assert seq.token_ids == WORDS[:6] + [ds] + WORDS[6:12] + [ds]
    # a new segment, decoded on its own as between images: its first word loses its leading space
    assert "".join(e.text for e in ev) == tok.decode(WORDS[6:12]) and not ev[0].text.startswith(" ")
    loop.resume(seq, s.extend(torch.zeros(3, 4)))
    ev = loop.step()
    assert seq.finish_reason == "length" and [(e.kind, e.token) for e in ev] == [("finish", None)], \
        "the 14th token was the pause: the image is drawn, then nothing more"
    assert len(seq.token_ids) == 14


def test_a_drain_keeps_the_in_flight_tokens(tok):
    """b stops at its 11th token while step 10 is in flight: a keeps that step's token (no step is
    recomputed), so a's 50 tokens cost exactly 49 launches."""
    m = stub(tok)
    loop = DecodeLoop(m, tok, m.max_len)
    a = loop.add(*prefilled(m), SamplingParams(max_new_tokens=50))
    b = loop.add(*prefilled(m), SamplingParams(max_new_tokens=50), stop_ids={WORDS[10]})
    while not a.finished:
        loop.step()
    assert b.finish_reason == "stop" and len(b.token_ids) == 11 and a.token_ids == WORDS[:50]
    assert m.launches == 49


def test_many_sequences_joining_and_leaving_equal_solo_runs(tok):
    """Four sequences through one loop, with run-ahead: joins at different steps, a stop, budgets,
    a cancellation; each sequence's tokens, text and committed length equal its solo run."""
    m = stub(tok)
    plans = {  # name: (params, stops, join at step, cancel at step)
        "a": (SamplingParams(max_new_tokens=30), set(), 0, None),
        "b": (SamplingParams(max_new_tokens=50), {WORDS[10]}, 0, None),
        "c": (SamplingParams(max_new_tokens=12), set(), 5, None),
        "d": (SamplingParams(max_new_tokens=40), set(), 2, 9),
    }
    loop = DecodeLoop(m, tok, m.max_len)
    seqs, texts, sess = {}, {}, {}
    for step in range(200):
        for name, (sp, stops, join, cancel) in plans.items():
            if step == join:
                sess[name], logits = prefilled(m)
                seqs[name] = loop.add(sess[name], logits, sp, stop_ids=stops, tag=name)
                texts[name] = []
            if step == cancel:
                loop.finish(seqs[name])
                assert sess[name].length == PROMPT + len(seqs[name].token_ids) - 1
        for e in loop.step():
            texts[e.seq.tag].append(e.text)
        if all(s.finished for s in seqs.values()) and len(seqs) == 4:
            break
    loop.close()
    for name, (sp, stops, join, cancel) in plans.items():
        if cancel is not None:
            assert seqs[name].finish_reason == "cancelled" and 0 < len(seqs[name].token_ids) < 40
            continue
        solo, ev, s = run_one(stub(tok), tok, sp, stops=stops)
        assert seqs[name].token_ids == solo.token_ids, name
        assert "".join(texts[name]) == "".join(e[2] for e in ev), name
        assert sess[name].length == s.length, name


def test_error_in_a_step_ends_the_loop_and_leaves_the_backend_usable(tok):
    m = stub(tok)
    s, logits = prefilled(m)
    loop = DecodeLoop(m, tok, m.max_len)
    seq = loop.add(s, logits, SamplingParams(max_new_tokens=40))
    loop.step()
    orig = m.decode_batch

    def broken(*a, **k):
        b = orig(*a, **k)
        b.launch = lambda: (_ for _ in ()).throw(RuntimeError("device fault"))
        return b

    loop.finish(seq)  # forces a rebuild at the next step
    seq2 = loop.add(*prefilled(m), SamplingParams(max_new_tokens=40))
    m.decode_batch = broken
    with pytest.raises(RuntimeError, match="device fault"):
        loop.step()
    m.decode_batch = orig
    assert seq2.finished and seq2.finish_reason == "error" and loop.active == []
    again, _, _ = run_one(m, tok, SamplingParams(max_new_tokens=5))
    assert again.token_ids == WORDS[:5]


def test_add_refuses_a_logits_batch(tok):
    m = stub(tok)
    s, logits = prefilled(m)
    with pytest.raises(Exception, match=r"logits \[V\]"):
        DecodeLoop(m, tok, m.max_len).add(s, logits[None], SamplingParams())
