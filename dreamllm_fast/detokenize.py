"""Incremental detokenization: text pieces per token whose concatenation is the full decode.

`IncrementalDetokenizer.add(id) -> str` returns the new text of one token; `flush() -> str` the
rest at the end. Joined, the pieces equal `tokenizer.decode(all_ids, skip_special_tokens=True)`
exactly, including characters split across byte-fallback tokens and bytes that never complete.

How (the prefix/read-offset window of streaming detokenizers, e.g. vLLM's and TGI's):
- Special ids are dropped on arrival: with skip_special_tokens they contribute nothing, and a window
  must never start on one (the decoder strips the leading space of the first decoded piece, which
  would then be the wrong piece).
- The new text is decode(ids[prefix:]) minus decode(ids[prefix:read]): both windows start on the
  same token, so the decoder's first-piece treatment (the SentencePiece dummy-prefix strip) cancels.
  After an emission the window slides: prefix <- read, read <- len(ids). Two decodes of a few ids
  per token: constant work, whatever the answer's length. Faster, once the segment's first text is
  out (the strip applies only to the very start of the text): decode([anchor] + unread ids) minus
  decode([anchor]), with a fixed plain piece as the anchor: one decode per token.
- Byte-fallback tokens (<0x..>) are held back until a non-byte token (or the end) closes their run:
  the decoder turns a run into text only if the WHOLE run is valid UTF-8 and otherwise emits U+FFFD
  per byte (transformers 5 / tokenizers ByteFallback: "<0xC3><0xA9>" -> "é", but
  "<0xC3><0xA9><0xFF>" -> three U+FFFD), so no prefix of an open run is final. Holding a run costs no
  decode (it is just appended) and one decode of the run when it closes: amortized constant work.
- `flush` emits whatever is held, even an incomplete byte sequence: the non-streamed text equals the
  full decode (a reply ending mid-character used to lose its tail).

`StopStrings` then cuts that stream at the first stop string (OpenAI's `stop`): the decode loop
(dreamllm_fast/decoding.py) runs every sequence's text through its own.
"""
from __future__ import annotations

import re
from typing import Iterable, Union

from .errors import InvalidInputError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class TokenizerInfo:
    """What the detokenizer needs to know about a tokenizer, computed once per tokenizer.

    decode: `tokenizer.decode(ids, skip_special_tokens=True)`, or the very call it makes into the
    Rust tokenizer when nothing else happens around it (transformers 5 `TokenizersBackend` without
    clean-up): transformers' Python wrapper costs ~15 us a call, more than the decode itself.
    anchor: a plain piece to start windows with (see `IncrementalDetokenizer`), or None.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = frozenset(int(i) for i in tokenizer.all_special_ids)
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.byte_ids = frozenset(i for i, t in enumerate(vocab) if t and _BYTE_PIECE.match(t))
        self.decode = self._wrapped
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            if isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode \
                    and not tokenizer.clean_up_tokenization_spaces:
                rust = tokenizer._tokenizer
                self.decode = lambda ids: rust.decode(ids, skip_special_tokens=True)
        except ImportError:  # transformers 4: the wrapper it is
            pass
        self.anchor, self.anchor_text = self._find_anchor(vocab)

    def _wrapped(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _find_anchor(self, vocab):
        """A non-special, non-byte piece with no leading word boundary whose text survives as the
        prefix of any continuation (checked on a few probes)."""
        probes = [i for i, t in enumerate(vocab) if t and t.startswith("\u2581") and len(t) > 1][:8]
        probes += sorted(self.byte_ids)[:2] + [i for i, t in enumerate(vocab) if t == "\u2581"]
        for text in ("a", "x", "e", ".", "0"):
            i = self.tokenizer.convert_tokens_to_ids(text)
            if i is None or i in self.special or i in self.byte_ids or vocab[i] != text:
                continue
            at = self.decode([i])
            if at and all(self.decode([i, p]).startswith(at) for p in probes):
                return i, at
        return None, ""


_INFO: dict = {}


def tokenizer_info(tokenizer) -> TokenizerInfo:
    info = _INFO.get(id(tokenizer))
    if info is None or info.tokenizer is not tokenizer:
        info = _INFO[id(tokenizer)] = TokenizerInfo(tokenizer)
    return info


class IncrementalDetokenizer:
    """Streams the text of one segment of ids (`add` per id, `flush` at the end)."""

    __slots__ = ("info", "ids", "prefix", "read", "prefix_text", "started")

    def __init__(self, tokenizer_or_info):
        self.info = tokenizer_or_info if isinstance(tokenizer_or_info, TokenizerInfo) \
            else tokenizer_info(tokenizer_or_info)
        self.ids: list[int] = []  # non-special ids of the segment (a sliding tail would do; see _trim)
        self.prefix = 0  # window start: first id of the previous emission
        self.read = 0  # ids before this are emitted
        self.prefix_text = ""  # decode(ids[prefix:read])
        self.started = False  # the segment's first text is out (the decoder's strip is spent)

    def add(self, token_id: int) -> str:
        """The text that token_id completes ("" while it is held back)."""
        info = self.info
        if token_id in info.special:
            return ""
        self.ids.append(token_id)
        if token_id in info.byte_ids:
            return ""
        return self._emit()

    def flush(self) -> str:
        """Everything still held (an open byte run, complete or not); the segment then ends."""
        return self._emit() if self.read < len(self.ids) else ""

    def _emit(self) -> str:
        info = self.info
        if info.anchor is not None and self.started:
            # one decode: [anchor] + the unread ids; the decoder's first-piece strip hits the anchor
            new = info.decode([info.anchor] + self.ids[self.read:])[len(info.anchor_text):]
            self.read = len(self.ids)
            self.prefix = self.read
            self._trim()
            return new
        window = self.ids[self.prefix:]
        text = info.decode(window)
        new = text[len(self.prefix_text):]  # the window's first id is in both: its strip cancels
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = info.decode(self.ids[self.prefix:self.read])
        self.started = True
        self._trim()
        return new

    def _trim(self) -> None:
        """Drop ids before the window so memory stays flat on long answers."""
        if self.prefix > 64:
            del self.ids[:self.prefix]
            self.read -= self.prefix
            self.prefix = 0


def stream_decode(tokenizer, ids) -> list[str]:
    """The pieces of `ids` as the decode loop streams them (tests and tools)."""
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.add(int(i)) for i in ids]
    pieces.append(d.flush())
    return pieces


class StopStrings:
    """Cuts streamed text at the first stop string, holding back text that could start one.

    feed(piece) -> (text safe to show now, stopped); flush() -> the held-back rest (at the end of
    the text, or of a segment: a stop string never spans an image). The stop string itself and
    everything after it are never returned (OpenAI's behaviour). Empty strings are ignored.
    """

    __slots__ = ("stops", "_hold", "_buf", "stopped")

    def __init__(self, stops: Union[str, Iterable[str], None]):
        if stops is None:
            stops = ()
        elif isinstance(stops, str):
            stops = (stops,)
        if not isinstance(stops, (list, tuple, set, frozenset)) or not all(isinstance(x, str) for x in stops):
            raise InvalidInputError(f"stop must be a string or a list of strings, got {stops!r}")
        self.stops = sorted({x for x in stops if x})  # sorted: the same cut whatever the order
        self._hold = max((len(x) for x in self.stops), default=1) - 1
        self._buf = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        self._buf += piece
        cut = min((i for i in (self._buf.find(x) for x in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out, True
        keep = self._hold
        out = self._buf[:-keep] if keep else self._buf
        self._buf = self._buf[len(out):]
        return out, False

    def flush(self) -> str:
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out
