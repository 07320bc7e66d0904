"""Edge cases where the batched scheduler meets the decode loop's run-ahead and its resets
(found in review; each test hung or failed the wrong request before its fix):

- a batch-mate is cancelled while B's last token is in the run-ahead step: `finish` drains the
  step and B's "length" event waits in the loop (`DecodeLoop.has_events`) with no sequence left
  running; the scheduler must still step to deliver it, or B hangs holding its KV slot;
- two decode-step failures while an interleaved choice draws its image: the second failure must
  not fail it (its sequence was not in either step);
- a failed step must not lose events drained before it.

In-process (no HTTP): the tiny checkpoint on the engine's CPU path, 3 KV slots.
"""
import asyncio
import time

from serving_helpers import Recorder  # noqa: E402
import pytest

from dreamllm_fast.config import EngineConfig
from dreamllm_fast.engine.decode import EngineDecodeBatch
from dreamllm_fast.pipeline import DreamLLMPipeline
from dreamllm_fast.sampling import SamplingParams
from dreamllm_fast.serving.batched import BatchedScheduler
from dreamllm_fast.serving.scheduler import (ChoiceDone, GenerationRequest, ImageOptions,
                                             RequestFailed)

SKY = [{"role": "user", "content": "Tell me about the sky."}]


@pytest.fixture
def sched(tiny_ckpt):
    pipe = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=3, precision="fp32"))
    s = BatchedScheduler(pipe, observer=Recorder(), max_batch=3, warmup=False)
    s.start()
    assert s.wait_ready(60), s.health()
    yield s
    s.shutdown(5)
    assert pipe.kv_slots() == (0, 3), "a KV slot leaked"


def req(kind, n, rid, steps=50):
    return GenerationRequest(kind=kind, seeds=[0], messages=SKY, max_new_tokens=n,
                             sampling=SamplingParams(max_new_tokens=n), request_id=rid,
                             image=ImageOptions(num_inference_steps=steps))


async def collect(h):
    return [ev async for ev in h]


def phase(sched, rid):
    return [p for r, _, p in sched.phases() if r == rid]


async def wait(cond, timeout=60):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.01)


def test_a_batch_mates_cancel_does_not_strand_the_last_token(sched):
    NB = 6
    fired = []

    async def main():
        ha = await sched.submit(req("chat", 40, "A"))
        hb = await sched.submit(req("chat", NB, "B"))

        def hook(s):  # cancel A while B's last token is in the run-ahead step
            if fired:
                return
            for r in s._reqs:
                c = r.choices[0]
                if r.handle.request_id == "B" and c.seq is not None and \
                        len(c.seq.token_ids) == NB - 2 and s.loop._batch is not None:
                    fired.append(s.loop._batch.inflight)
                    ha.cancel()

        sched.observer.on_iteration = hook
        tb, ta = asyncio.create_task(collect(hb)), asyncio.create_task(collect(ha))
        evs = await asyncio.wait_for(tb, 30)
        await ta
        return evs

    evs = asyncio.run(main())
    assert fired and fired[0] >= 1, "the scenario did not arise (no step in flight at the cancel)"
    assert isinstance(evs[-1], ChoiceDone) and evs[-1].finish_reason == "length"
    assert evs[-1].completion_tokens == NB
    assert sched.kv_slots()[0] == 0


def test_a_second_step_failure_spares_a_choice_drawing_its_image(sched, monkeypatch):
    real = EngineDecodeBatch.launch
    fail = {"n": 0}

    def launch(self):
        if fail["n"]:
            fail["n"] -= 1
            raise RuntimeError("an ordinary step failure")
        return real(self)

    monkeypatch.setattr(EngineDecodeBatch, "launch", launch)
    sched.observer.on_iteration = lambda s: time.sleep(0.01)

    async def main():
        hi = await sched.submit(req("interleaved", 75, "I", steps=400))
        ti = asyncio.create_task(collect(hi))
        await wait(lambda: phase(sched, "I") == ["diffuse"])
        for name in ("A", "B"):  # two failures, each while I draws
            h = await sched.submit(req("chat", 30, name))
            await wait(lambda: phase(sched, name) == ["decode"])
            fail["n"] = 1
            evs = await collect(h)
            assert isinstance(evs[-1], RequestFailed), (name, evs[-1])
            assert phase(sched, "I") == ["diffuse"], f"I was failed by {name}'s step"
        return await asyncio.wait_for(ti, 120)

    evs = asyncio.run(main())
    assert isinstance(evs[-1], ChoiceDone) and evs[-1].completion_tokens == 75


def test_a_failed_step_keeps_the_events_drained_before_it(sched):
    """DecodeLoop level: events drained by `finish` survive a failing step() and come with the
    next one."""
    from dreamllm_fast.decoding import DecodeLoop

    pipe = sched.pipeline  # a loop of its own: the scheduler's worker steps sched.loop
    loop = DecodeLoop(pipe.model, pipe.tokenizer, pipe.max_len)
    sentinel = object()
    loop._carry.append(sentinel)
    assert loop.has_events

    def boom(events):  # takes the carried events first, as the real step does, then fails
        loop._carry = []
        raise RuntimeError("injected")

    real, loop._step = loop._step, boom
    try:
        with pytest.raises(RuntimeError):
            loop.step()
        assert loop.has_events and loop._carry == [sentinel]
    finally:
        loop._step = real
    assert loop.step() == [sentinel] and not loop.has_events
