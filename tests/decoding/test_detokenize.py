"""Incremental detokenization: streamed pieces joined == tokenizer.decode(all, skip_special_tokens=True).

The tiny checkpoint's real SentencePiece tokenizer (byte fallback, dummy prefix, 11 special ids),
loaded through transformers as the pipeline loads it. Hypothesis draws id sequences weighted toward
the hard cases: UTF-8 lead and continuation bytes as byte-fallback tokens (multi-byte characters
split across tokens, invalid and unfinished sequences), special ids anywhere, the bare word-boundary
piece, and ordinary pieces.
"""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamllm_fast.checkpoint import load_tokenizer
from dreamllm_fast.detokenize import IncrementalDetokenizer, TokenizerInfo, stream_decode, tokenizer_info

BYTE0 = 3  # <0x00> in LLaMA-style SentencePiece vocabularies: ids 3..258 are the 256 bytes
UTF8 = [0xE2, 0x82, 0xAC, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, 0xE4, 0xB8, 0xAD, 0x20, 0x41, 0xFF, 0xC0]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def _ids_strategy(tok):
    info = tokenizer_info(tok)
    special = sorted(info.special)
    pieces = [i for i in range(len(tok)) if i not in info.special and i not in info.byte_ids]
    space = tok.convert_tokens_to_ids("\u2581")
    one = st.one_of(
        st.sampled_from([BYTE0 + b for b in UTF8]),  # bytes of multi-byte characters, and junk
        st.integers(BYTE0, BYTE0 + 255),  # any byte
        st.sampled_from(special),
        st.just(space),
        st.sampled_from(pieces),
    )
    return st.lists(one, max_size=40)


def test_tokenizer_facts(tok):
    """The premises the detokenizer relies on, for this tokenizer."""
    info = tokenizer_info(tok)
    assert len(info.byte_ids) == 256 and min(info.byte_ids) == BYTE0
    e = [BYTE0 + b for b in (0xC3, 0xA9)]
    assert tok.decode(e) == "é"
    assert tok.decode(e + [BYTE0 + 0xFF]) == "\ufffd" * 3, "a run is text only if all of it is valid"
    assert info.anchor is not None, "the one-decode fast path should find an anchor piece here"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_pieces_join_to_the_full_decode(tok, data):
    ids = data.draw(_ids_strategy(tok))
    full = tok.decode(ids, skip_special_tokens=True)
    pieces = stream_decode(tok, ids)
    assert "".join(pieces) == full, (ids, pieces, full)
    # the non-streamed text of a prefix (what a stop there leaves) is that prefix's full decode
    cut = data.draw(st.integers(0, len(ids)))
    assert "".join(stream_decode(tok, ids[:cut])) == tok.decode(ids[:cut], skip_special_tokens=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_slow_path_without_anchor_and_wrapper_decode(tok, data):
    """The two-decode window (no anchor) through transformers' own decode gives the same text."""
    info = TokenizerInfo(tok)
    info.anchor, info.anchor_text = None, ""
    info.decode = info._wrapped
    ids = data.draw(_ids_strategy(tok))
    d = IncrementalDetokenizer(info)
    got = "".join([d.add(i) for i in ids] + [d.flush()])
    assert got == tok.decode(ids, skip_special_tokens=True)


def test_split_character_streams_once_complete_and_tail_is_flushed(tok):
    word = tok.convert_tokens_to_ids("\u2581a")
    euro = [BYTE0 + b for b in (0xE2, 0x82, 0xAC)]
    d = IncrementalDetokenizer(tok)
    assert [d.add(i) for i in [word] + euro] == ["a", "", "", ""]  # held: the run is still open
    assert d.add(word) == "€ a"  # a plain piece closes the run
    assert d.add(BYTE0 + 0xE2) == "" and d.add(BYTE0 + 0x82) == ""
    assert d.flush() == "\ufffd\ufffd", "an unfinished character is flushed, not lost"
    ids = [word] + euro + [word, BYTE0 + 0xE2, BYTE0 + 0x82]
    assert "".join(stream_decode(tok, ids)) == tok.decode(ids, skip_special_tokens=True) == "a€ a\ufffd\ufffd"


def test_special_ids_vanish_and_work_stays_flat(tok):
    info = tokenizer_info(tok)
    word = tok.convert_tokens_to_ids("\u2581a")
    d = IncrementalDetokenizer(tok)
    out = []
    for i in range(3000):
        out.append(d.add(word if i % 3 else min(info.special)))
        assert len(d.ids) <= 70, "the window must stay bounded on long answers"
    out.append(d.flush())
    assert "".join(out) == "a" + " a" * 1999
