"""Stop strings belong to the decode loop (dreamllm_fast/decoding.py): every owner (the pipeline,
both servers) gets text that is already cut, and the sequence ends at the token that completes a
stop string, on the stub backend (scripted tokens) and through the pipeline on the tiny engine."""
import pytest
import torch

from dreamllm_fast.checkpoint import load_tokenizer
from dreamllm_fast.decoding import DecodeLoop, State
from dreamllm_fast.detokenize import StopStrings, stream_decode
from dreamllm_fast.errors import InvalidInputError
from dreamllm_fast.sampling import SamplingParams
from loop_helpers import PROMPT, WORDS, prefilled, stub  # noqa: E402


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_ckpt):
    from dreamllm_fast.pipeline import DreamLLMPipeline

    return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False)


def _boundary_stop(tok, n=60):
    """A stop string across the boundary of two streamed pieces, first found there: (stop, index of
    the token that completes it, the text before it)."""
    pieces = stream_decode(tok, WORDS[:n])[:-1]
    full = "".join(pieces)
    for k in range(12, n - 1):
        a, b = pieces[k - 1], pieces[k]
        if len(a) >= 2 and len(b) >= 2:
            stop = a[-2:] + b[:2]
            start = len("".join(pieces[:k])) - 2
            if full.find(stop) == start:
                return stop, k, full[:start]
    raise AssertionError("no usable boundary in the stub's walk")


def _run(m, tok, sp, run_ahead, **add):
    s, logits = prefilled(m)
    loop = DecodeLoop(m, tok, m.max_len, run_ahead=run_ahead)
    seq = loop.add(s, logits, sp, **add)
    events = []
    while not seq.finished and seq.state is not State.PAUSED:
        events += loop.step()
    return loop, seq, events, s


@pytest.mark.parametrize("run_ahead", [True, False])
def test_a_stop_string_ends_the_sequence_at_the_token_that_completes_it(tok, run_ahead):
    stop, k, before = _boundary_stop(tok)
    m = stub(tok)
    loop, seq, ev, s = _run(m, tok, SamplingParams(max_new_tokens=100), run_ahead, stop_strings=[stop])
    loop.close()
    assert seq.token_ids == WORDS[:k + 1] and seq.finish_reason == "stop"
    assert ev[-1].kind == "finish" and ev[-1].reason == "stop" and ev[-1].token == WORDS[k]
    assert "".join(e.text for e in ev) == before, "the text stops before the stop string"
    assert all(stop[:2] not in e.text for e in ev[-2:]), "a possible start of it is held back"
    assert s.length == PROMPT + k, "committed length: the completing token is never fed"
    assert m.launches == k + (1 if run_ahead else 0), "run ahead wastes at most one step"


def test_without_a_stop_string_the_same_walk_goes_on(tok):
    m = stub(tok)
    loop, seq, ev, s = _run(m, tok, SamplingParams(max_new_tokens=40), True, stop_strings=["\x00never"])
    loop.close()
    assert seq.token_ids == WORDS[:40] and seq.finish_reason == "length"
    assert "".join(e.text for e in ev) == tok.decode(WORDS[:40]), "held text comes out at the end"


def test_one_row_stopping_leaves_its_batch_mate_untouched(tok):
    stop, k, before = _boundary_stop(tok)
    m = stub(tok)
    loop = DecodeLoop(m, tok, m.max_len)
    a = loop.add(*prefilled(m), SamplingParams(max_new_tokens=50))
    b = loop.add(*prefilled(m), SamplingParams(max_new_tokens=50), stop_strings=(stop,))
    text = {id(a): "", id(b): ""}
    while not a.finished:
        for e in loop.step():
            text[id(e.seq)] += e.text
    loop.close()
    assert b.finish_reason == "stop" and b.token_ids == WORDS[:k + 1] and text[id(b)] == before
    assert a.token_ids == WORDS[:50] and text[id(a)] == tok.decode(WORDS[:50])


def test_a_pause_flushes_held_text_and_a_stop_string_never_spans_an_image(tok):
    m = stub(tok, dream_every=6)
    ds = m.special.dream_start
    seg1 = tok.decode(WORDS[:6])
    seg2 = stream_decode(tok, WORDS[6:12])
    stop = seg1[-2:] + "".join(seg2)[:2]  # would match if the two segments were one text
    assert stop not in seg1
    loop, seq, ev, s = _run(m, tok, SamplingParams(max_new_tokens=30), True, pause_ids={ds},
                            stop_strings=[stop])
    assert seq.state is State.PAUSED and ev[-1].kind == "pause"
    assert "".join(e.text for e in ev) == seg1, "the held-back tail comes with the pause"
    s.extend_dream(torch.zeros(17, 4), list(range(1, 17)))
    loop.resume(seq, s.extend(torch.zeros(259, 4)))
    ev = []
    while seq.state is not State.PAUSED:
        ev += loop.step()
    assert seq.token_ids == WORDS[:6] + [ds] + WORDS[6:12] + [ds], "no stop across the image"
    loop.close()


def test_a_stop_string_in_a_pause_flush_ends_the_sequence_instead(tok):
    m = stub(tok, dream_every=6)
    ds = m.special.dream_start
    seg1 = tok.decode(WORDS[:6])
    stop = seg1[-3:]  # completed by the segment's last text token, or found in the pause's flush
    loop, seq, ev, s = _run(m, tok, SamplingParams(max_new_tokens=30), True, pause_ids={ds},
                            stop_strings=[stop])
    loop.close()
    assert seq.finished and seq.finish_reason == "stop" and ev[-1].kind == "finish"
    assert "".join(e.text for e in ev) == seg1[:seg1.find(stop)]
    assert seq.state is not State.PAUSED


def test_an_error_ending_stays_an_error(tok):
    """A sequence whose own step raised ends with "error" (DecodeLoop._isolate calls `_end` so),
    even when its held text would complete a stop string: the server fails that request."""
    m = stub(tok)
    loop = DecodeLoop(m, tok, m.max_len)
    seq = loop.add(*prefilled(m), SamplingParams(max_new_tokens=10), stop_strings=["\u00e9"])
    for piece in ("<0xC3>", "<0xA9>"):  # "é" as an open byte run: held until something closes it
        assert seq.detok.add(tok.convert_tokens_to_ids(piece)) == ""
    events = []
    loop._end(seq, State.FINISHED, None, events, "error")
    assert seq.finish_reason == "error" and events[-1].reason == "error"
    loop.close()


def test_stop_strings_refuse_what_is_not_text():
    assert StopStrings("ab").stops == ["ab"] and StopStrings(None).stops == [] and StopStrings(["", "x"]).stops == ["x"]
    for bad in (3, [b"x"], ["a", None], "x".encode()):
        with pytest.raises(InvalidInputError, match="stop must be a string or a list of strings"):
            StopStrings(bad)


def test_the_pipeline_applies_stop_strings_through_the_loop(tiny_pipe):
    pipe = tiny_pipe
    msgs = [{"role": "user", "content": "Describe a cat."}]
    full = pipe.chat(msgs, max_new_tokens=24)
    ids = pipe.last_token_ids()
    assert pipe.last_finish_reason() in ("stop", "length") and len(full) > 6
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[:full.find(stop)]
    got = "".join(pipe.chat(msgs, max_new_tokens=24, stream=True, stop=[stop]))
    assert got == want and pipe.last_finish_reason() == "stop"
    assert pipe.last_token_ids() == ids[:len(pipe.last_token_ids())] and len(pipe.last_token_ids()) < len(ids)
    assert pipe.chat(msgs, max_new_tokens=24, stop=stop) == want, "a bare string is one stop string"
    doc = pipe.generate(msgs, max_new_tokens=24, max_images=0, stop=[stop])
    assert isinstance(doc[0], str) and doc[0].startswith(want[:1]) and stop not in "".join(doc[:1])
    with pytest.raises(InvalidInputError, match="stop must be"):
        pipe.chat(msgs, stop=5)
