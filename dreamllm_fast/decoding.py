"""`DecodeLoop`: the one decode loop of the project, for one sequence (the pipeline) or many (a server).

The loop owns a set of sequences. Each holds its backend session, sampling settings and seed, stop
and pause ids, stop strings, token budget, incremental detokenizer and the ids it generated.
`step()` runs one batched decode step over every running sequence and returns `Event`s:

    Event(seq, "token", token, text)         a token was appended; `text` is its new text ("" if held)
    Event(seq, "pause", token, text)         a pause id (e.g. <dream_start>): the sequence left the
                                             batch; its owner runs the branch, then `resume(seq, logits)`
                                             or `finish(seq)`. `text` flushes the segment.
    Event(seq, "finish", token, text, reason)  done: "stop" (a stop id or a stop string), "length"
                                             (token budget), "context" (context end); `token` is None
                                             when the budget ran out on a resume. `text` flushes the
                                             segment.

Text is final when it leaves the loop: it went through the sequence's stop strings
(detokenize.StopStrings), which hold back text that could start one and end the sequence at the
token that completes one, with reason "stop" and the text before the stop string; a stop string
found in a pause's flushed text ends the sequence instead of pausing it; a segment's held-back text
comes with its pause (a stop string never spans an image). So every owner (the pipeline, both
servers) sees the same text and the same last token.

Between steps the owner may `add` sequences (prefilled sessions with their last logits), `resume`
paused ones and `finish` (cancel) any; the loop rebuilds the backend's decode batch when the set of
running sequences changes.

Host work per token is constant: the backend's batch advances itself on the device (the engine's
captured step takes the previous ids, samples the next and bumps the cache lengths), and the loop
runs one step ahead: step n+1 is enqueued before step n's ids are read (pinned host copies, an event
per step), so the device never waits for Python. Stops stop at exactly the token the one-at-a-time
loop stopped at: a step run past a stop is discarded; the committed length (`seq.cached`) never
counts it, and the K/V it wrote lie at or beyond that length, where attention never reads (it reads
positions < cache length) and the next write lands.

A composition change (a sequence pauses, finishes, joins) drains the batch: the in-flight step is
waited for and its ids are accepted for the rows still running (nothing is recomputed), lengths are
committed to the sessions, and the next `step()` builds a new batch (a few small host->device copies
of ids, lengths, slots and sampling rows). The cost is one pipeline bubble: the device idles for the
host time between that step's end and the next launch.
"""
from __future__ import annotations

import enum
from typing import Any, Iterable, Optional

import torch

from .devices import device_failed
from .detokenize import IncrementalDetokenizer, StopStrings, tokenizer_info
from .errors import InvalidInputError
from .sampling import SamplingParams, SamplingRows, sample_next


class State(str, enum.Enum):
    WAITING = "waiting"  # has logits to draw its next token from (after a prefill or a resume)
    RUNNING = "running"  # in the decode batch
    PAUSED = "paused"  # hit a pause id; its owner runs a branch
    FINISHED = "finished"


class Sequence:
    """One generation: a session plus everything the loop tracks about it."""

    __slots__ = ("session", "params", "seed", "stop_ids", "pause_ids", "stops", "max_new_tokens",
                 "detok", "token_ids", "cached", "state", "finish_reason", "tag", "logits", "error",
                 "_pending")

    def __init__(self, session, params: SamplingParams, seed: int, stop_ids: Iterable[int],
                 pause_ids: Iterable[int], max_new_tokens: int, detok, tag: Any = None,
                 stop_strings: Optional[StopStrings] = None):
        self.session = session
        self.params = params
        self.seed = int(seed)
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.pause_ids = frozenset(int(i) for i in pause_ids)
        self.stops = stop_strings if stop_strings is not None and stop_strings.stops else None
        self.max_new_tokens = int(max_new_tokens)
        self.detok = detok
        self.token_ids: list[int] = []  # every accepted id: text, pause and stop ids
        self.cached = session.length  # committed cache length (tokens fed to the model)
        self.state = State.WAITING
        self.finish_reason: Optional[str] = None
        self.tag = tag
        self.logits: Optional[list] = None  # per accepted token, when the loop records logits
        self.error: Optional[BaseException] = None  # why it finished with reason "error"
        self._pending: Optional[torch.Tensor] = None  # [V] logits to draw the next token from

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED

    def cut(self, text: str) -> tuple[str, bool]:
        """`text` through the stop strings: (what may be shown, whether one was completed)."""
        if self.stops is None or not text:
            return text, False
        return self.stops.feed(text)


class Event:
    __slots__ = ("seq", "kind", "token", "text", "reason")

    def __init__(self, seq: Sequence, kind: str, token: Optional[int], text: str = "",
                 reason: Optional[str] = None):
        self.seq, self.kind, self.token, self.text, self.reason = seq, kind, token, text, reason

    def __repr__(self) -> str:
        return f"Event({self.kind}, token={self.token}, text={self.text!r}, reason={self.reason})"


class DecodeLoop:
    """Drives `model.decode_batch` for a changing set of sequences (see the module docstring).

    model: a backend (EngineModel, ReferenceModel or anything with the same `decode_batch`).
    max_len: the context: a sequence whose committed length reaches it finishes ("context").
    run_ahead: enqueue step n+1 before reading step n (False: one step at a time).
    record_logits: keep each accepted token's fp32 logits on the CPU in `seq.logits` (tests;
    implies run_ahead=False, since a step run ahead overwrites the static logits buffer).
    """

    def __init__(self, model, tokenizer, max_len: int, run_ahead: bool = True,
                 record_logits: bool = False):
        self.model = model
        self.info = tokenizer_info(tokenizer)
        self.max_len = int(max_len)
        self.record_logits = record_logits
        self.run_ahead = run_ahead and not record_logits
        self.seqs: list[Sequence] = []
        self._batch = None
        self._batch_seqs: list[Sequence] = []
        self._dirty = False  # the running set differs from the batch's rows
        self._carry: list[Event] = []  # events produced outside step() (drains in finish)

    # -- membership ---------------------------------------------------------------------------
    def add(self, session, logits: torch.Tensor, params: SamplingParams, seed: int = 0,
            stop_ids: Iterable[int] = (), pause_ids: Iterable[int] = (), tag: Any = None,
            stop_strings: Iterable[str] = ()) -> Sequence:
        """A prefilled session joins; its first token is drawn from `logits` [V] at the next step.

        seed: the request's Philox key (`sampling.draw_seed`; ignored when greedy).
        stop_strings: texts that end the sequence where they appear (OpenAI's `stop`); neither
        they nor anything after them is returned.
        """
        if logits.dim() != 1:
            raise InvalidInputError(f"add() takes the last position's logits [V], got {list(logits.shape)}")
        seq = Sequence(session, params, seed, stop_ids, pause_ids, params.max_new_tokens,
                       IncrementalDetokenizer(self.info), tag, StopStrings(stop_strings))
        if self.record_logits:
            seq.logits = []
        seq._pending = logits
        self.seqs.append(seq)
        return seq

    def resume(self, seq: Sequence, logits: torch.Tensor) -> None:
        """A paused sequence goes on from `logits` [V] (after its branch extended the session);
        its text starts a new segment (decoded on its own, as between images)."""
        if seq.state is not State.PAUSED:
            raise InvalidInputError(f"resume() needs a paused sequence, this one is {seq.state.value}")
        seq.cached = seq.session.length
        seq.detok = IncrementalDetokenizer(self.info)
        seq._pending = logits
        seq.state = State.WAITING

    def finish(self, seq: Sequence, reason: str = "cancelled") -> None:
        """End a sequence from outside (cancel, or a declined pause: text its stop strings still
        hold is dropped; a pause has flushed it already). When it is in the running
        batch, the batch is drained first, so its session is committed and free to use or close;
        events of other sequences produced by the drain come with the next `step()` (see
        `has_events`: the drained sequences may all have finished, leaving none running)."""
        if seq.state is State.FINISHED:
            return
        in_batch = seq.state is State.RUNNING
        seq.state = State.FINISHED
        seq.finish_reason = reason
        seq._pending = None
        if in_batch and self._batch is not None:
            self._dirty = True
            try:
                self._drain(self._carry)
            except BaseException:
                self._fail()
                raise
        self._forget_finished()

    def close(self) -> None:
        """Finish every sequence and commit every session (call before closing the sessions)."""
        for s in list(self.seqs):
            self.finish(s, "cancelled")
        if self._batch is not None:
            self._drain(self._carry)

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.seqs if s.state is not State.FINISHED]

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """One decode step over the running sequences (plus first tokens of waiting ones).

        When the step raises a Python-level error (not one that leaves the device unusable:
        `devices.device_failed`) and several sequences were in it, the loop looks for the ones
        that caused it (`_isolate`): each alone is tried on the committed state, and those
        whose own step raises finish with reason "error" (`seq.error` holds the exception);
        the others go on from where they were, with the tokens they would have drawn anyway
        (a token is a function of the cache, the previous token, the seed and the position).
        Otherwise (one sequence, no culprit found, a device error) every sequence ends with
        reason "error", the backend's batch is let go (nothing committed: close the sessions)
        and the exception propagates; the loop and the backend stay usable.
        """
        carried = list(self._carry)
        events: list[Event] = []
        try:
            return self._step(events)
        except Exception as e:
            error = e
            try:
                if not device_failed(e) and self._isolate(e, events):
                    self._forget_finished()
                    return events
            except Exception as probe:  # noqa: BLE001 - a device error while trying a row alone
                error = probe
            # events drained before this step (a `finish` of a batch-mate) describe work that
            # happened: they come with the next step() (`has_events`), not lost with this one
            self._carry = carried
            self._fail()
            raise error
        except BaseException:
            self._carry = carried
            self._fail()
            raise

    def _isolate(self, error: Exception, events: list) -> bool:
        """After a failed step: commit what was accepted, try each live sequence alone, end the
        ones whose own step raises. True when some but not all were culprits (the step's other
        sequences go on); False to fail them all."""
        live = [s for s in self.seqs if s.state in (State.WAITING, State.RUNNING)]
        if len(live) < 2:
            return False
        if self._batch is not None:
            try:  # rows keep the steps they accepted; steps in flight are discarded (re-run)
                self._batch.close([s.cached for s in self._batch_seqs])
            except Exception:  # noqa: BLE001 - the batch cannot be committed: fail them all
                return False
            self._batch, self._batch_seqs, self._dirty = None, [], False
        culprits = []
        for s in live:
            try:
                self._try_alone(s)
            except Exception as e:  # noqa: BLE001 - this sequence's own step fails
                if device_failed(e):
                    raise
                culprits.append((s, e))
        if not culprits or len(culprits) == len(live):
            return False
        for s, e in culprits:
            s.error = e
            s._pending = None
            self._end(s, State.FINISHED, None, events, "error")
        return True

    def _try_alone(self, s: Sequence) -> None:
        """The sequence's next draw on its own, thrown away: its first token's draw (waiting), or
        one decode step of a batch of it alone, closed without committing (the K/V it wrote lie
        at the committed length, where the real step writes the same values)."""
        if s.state is State.WAITING:
            logits = s._pending.float()[None]
            rows = SamplingRows.of([s.params], [s.seed], logits.device)
            pos = torch.tensor([s.cached], dtype=torch.int64, device=logits.device)
            sample_next(logits, rows, pos, greedy_only=s.params.greedy)
            return
        b = self.model.decode_batch([s.session], [s.token_ids[-1]], [s.params], [s.seed])
        try:
            b.launch()
            b.result()
        except BaseException:
            b.abort()
            raise
        b.close([s.cached])

    @property
    def has_events(self) -> bool:
        """Events wait for the next `step()` (drained by `finish` from a batch-mate's run-ahead
        step, e.g. its last token): call `step()` even if no sequence is running."""
        return bool(self._carry)

    def _fail(self) -> None:
        b, self._batch, self._batch_seqs, self._dirty = self._batch, None, [], False
        for s in self.seqs:
            if s.state is not State.FINISHED:
                s.state, s.finish_reason, s._pending = State.FINISHED, "error", None
        self.seqs = []
        if b is not None:
            b.abort()

    def _step(self, events: list) -> list[Event]:
        events.extend(self._carry)
        self._carry = []
        if any(s.state is State.WAITING for s in self.seqs):
            self._admit(events)
        if self._dirty and self._batch is not None:
            self._drain(events)
        running = [s for s in self.seqs if s.state is State.RUNNING]
        if running:
            if self._batch is None:
                self._build(running)
            b = self._batch
            if b.inflight == 0:
                self._launch()
            if self.run_ahead and self._ahead_ok():
                self._launch()
            self._accept_step(b.result(), events)
            if self._dirty:  # someone left: commit sessions now, their owners act on the events
                self._drain(events)
        self._forget_finished()
        return events

    def _admit(self, events: list) -> None:
        """Draw the first token of every waiting sequence (one batched, eager draw)."""
        waiting = [s for s in self.seqs if s.state is State.WAITING]
        for s in [s for s in waiting if len(s.token_ids) >= s.max_new_tokens]:
            # the budget ran out on the token that paused it (as the one-at-a-time loop did)
            self._end(s, State.FINISHED, None, events, "length")
        waiting = [s for s in waiting if s.state is State.WAITING]
        if not waiting:
            return
        logits = torch.stack([s._pending.float() for s in waiting])
        rows = SamplingRows.of([s.params for s in waiting], [s.seed for s in waiting], logits.device)
        pos = torch.tensor([s.cached for s in waiting], dtype=torch.int64, device=logits.device)
        greedy = all(s.params.greedy for s in waiting)
        ids = sample_next(logits, rows, pos, greedy_only=greedy).tolist()
        for s, lg, tok in zip(waiting, logits, ids):
            s._pending = None
            s.state = State.RUNNING
            if s.logits is not None:
                s.logits.append(lg.detach().cpu())
            self._accept(s, tok, events)
        if self._batch is not None:
            self._dirty = True

    def _build(self, running: list[Sequence]) -> None:
        self._batch = self.model.decode_batch(
            [s.session for s in running], [s.token_ids[-1] for s in running],
            [s.params for s in running], [s.seed for s in running])
        self._batch_seqs = running
        # run-ahead gates, O(1) per step: positions written by step j are base + j
        self._max_base = max(s.cached for s in running)
        self._max_left = max(s.max_new_tokens - len(s.token_ids) for s in running)
        self._dirty = False

    def _ahead_ok(self) -> bool:
        """Launch step j (= steps launched so far) ahead only if it cannot write past the context
        (it runs every row of the batch) and some row may still need its token (budget)."""
        j = self._batch.launched
        return self._max_base + j < self.max_len and j + 1 <= self._max_left

    def _launch(self) -> None:
        b = self._batch
        if self._max_base + b.launched >= self.max_len:  # unreachable: rows at the end finish first
            raise RuntimeError("decode step would write past the context; the loop's stop rules are broken")
        b.launch()

    def _accept_step(self, ids: list[int], events: list) -> None:
        rows = self._batch_seqs
        logits = self._batch.logits if self.record_logits else None
        for i, (s, tok) in enumerate(zip(rows, ids)):
            if s.state is not State.RUNNING:
                continue  # left the batch earlier: this row's step is discarded
            s.cached += 1  # the step fed the previous token
            if logits is not None:
                s.logits.append(logits[i].detach().float().cpu())
            self._accept(s, tok, events)

    def _drain(self, events: list) -> None:
        """Wait for in-flight steps (accepting their ids for rows still running), then commit each
        row's length to its session and drop the batch."""
        b = self._batch
        while b.inflight:
            self._accept_step(b.result(), events)
        b.close([s.cached for s in self._batch_seqs])
        self._batch = None
        self._batch_seqs = []
        self._dirty = False

    def _accept(self, s: Sequence, tok: int, events: list) -> None:
        """The stop rules, in the order the one-at-a-time loop applied them."""
        s.token_ids.append(tok)
        if tok in s.stop_ids:
            self._end(s, State.FINISHED, tok, events, "stop")
        elif tok in s.pause_ids:
            self._end(s, State.PAUSED, tok, events, None)
        else:
            text, hit = s.cut(s.detok.add(tok))
            if hit:  # a stop string: the text before it is the last
                self._end(s, State.FINISHED, tok, events, "stop", text, stopped=True)
            elif s.cached >= self.max_len:
                self._end(s, State.FINISHED, tok, events, "context", text)
            elif len(s.token_ids) >= s.max_new_tokens:
                self._end(s, State.FINISHED, tok, events, "length", text)
            else:
                events.append(Event(s, "token", tok, text))

    def _end(self, s: Sequence, state: State, tok, events: list, reason, text: str = "",
             stopped: bool = False) -> None:
        """The segment ends (pause or finish): its held text is flushed through the stop strings;
        one found there ends the sequence ("stop") instead. `stopped`: a stop string already did.
        An "error" ending stays one (its text is flushed as it is)."""
        was_running = s.state is State.RUNNING
        if reason == "error":
            text += s.detok.flush()
        elif not stopped:
            tail, hit = s.cut(s.detok.flush())
            text += tail
            if hit:
                state, reason = State.FINISHED, "stop"
            elif s.stops is not None:
                text += s.stops.flush()
        s.state = state
        s.finish_reason = reason
        kind = "pause" if state is State.PAUSED else "finish"
        events.append(Event(s, kind, tok, text, reason))
        if was_running and self._batch is not None:
            self._dirty = True

    def _forget_finished(self) -> None:
        if any(s.state is State.FINISHED for s in self.seqs):  # the batch keeps its own row list
            self.seqs = [s for s in self.seqs if s.state is not State.FINISHED]
