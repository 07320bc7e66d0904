"""The second line of defence: a request whose share of a shared step raises fails alone.

Requests are validated before admission (test_hostile.py), but a Python-level error inside a
batched decode step or a shared U-Net call must still fail only the request that causes it; the
other requests in that step go on and their answers equal their solo answers.

The failing request is injected through the backend, not through hooks in the scheduler: a proxy
of the engine model (`Marked`) raises in `decode_batch` (building the batch), in a decode step's
`launch`, or in `unet_eps`, whenever a row of the marked request is in the call. The mark is a
setting only the culprit uses: top_k == MARK_TOP_K (a sampled request) for decoding, the first
timestep of a MARK_STEPS-step schedule for the U-Net.

In-process (no HTTP): the tiny checkpoint on the engine's CPU path, 3 KV slots. The worker is held
(an injected observer, `Observer.iteration`) until every request is queued, so they are admitted and stepped together.
"""
import asyncio
import threading

import numpy as np
from serving_helpers import Recorder  # noqa: E402
import pytest
import torch

from dreamllm_fast.config import EngineConfig
from dreamllm_fast.diffusion import make_noise_scheduler
from dreamllm_fast.pipeline import DreamLLMPipeline
from dreamllm_fast.sampling import SamplingParams
from dreamllm_fast.serving.batched import BatchedScheduler
from dreamllm_fast.serving.scheduler import (ChoiceDone, GenerationRequest, ImageOptions,
                                             ImageResult, RequestFailed, TextDelta)

SKY = [{"role": "user", "content": "Tell me about the sky."}]
SEA = [{"role": "user", "content": "What lives in the sea?"}]
MARK_TOP_K = 4242
MARK_STEPS = 7
SLOTS = 3


class _MarkedBatch:
    """A decode batch whose launch raises when it holds a marked row."""

    def __init__(self, inner, marked: bool):
        self._inner, self._marked = inner, marked

    def launch(self):
        if self._marked:
            raise ValueError("injected: this row's step fails")
        return self._inner.launch()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class Marked:
    """The engine model, except that calls holding a marked row raise (`where` says which)."""

    def __init__(self, model, where: str, mark_t: int):
        self._m, self.where, self.mark_t = model, where, mark_t
        self.raised = 0

    def __getattr__(self, name):
        return getattr(self._m, name)

    def decode_batch(self, sessions, token_ids, params, seeds):
        marked = any(p.do_sample and p.top_k == MARK_TOP_K for p in params)
        if marked and self.where == "build":
            self.raised += 1
            raise ValueError("injected: Overflow when unpacking long long")
        batch = self._m.decode_batch(sessions, token_ids, params, seeds)
        if marked and self.where == "launch":
            self.raised += 1
        return _MarkedBatch(batch, marked and self.where == "launch")

    def unet_eps(self, sample, t, cond):
        if self.where == "unet" and bool((torch.as_tensor(t) == self.mark_t).any()):
            self.raised += 1
            raise IndexError("injected: index 1000 is out of bounds")
        return self._m.unet_eps(sample, t, cond)


@pytest.fixture(scope="module")
def engine_pipe(tiny_ckpt):
    return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="engine",
                                            progress=False,
                                            engine_config=EngineConfig(max_batch=SLOTS, precision="fp32"))


def _first_timestep(pipe, steps: int) -> int:
    s = make_noise_scheduler(pipe.config.diffusion.scheduler)
    s.set_timesteps(steps)
    return int(s.timesteps[0])


@pytest.fixture(params=["build", "launch", "unet"])
def marked(request, engine_pipe):
    model = Marked(engine_pipe.model, request.param, _first_timestep(engine_pipe, MARK_STEPS))
    pipe = DreamLLMPipeline(model, engine_pipe.tokenizer, progress=False)
    sched = BatchedScheduler(pipe, observer=Recorder(), max_batch=SLOTS, warmup=False)
    sched.start()
    assert sched.wait_ready(60), sched.health()
    yield sched, model
    sched.shutdown(5)
    assert engine_pipe.kv_slots() == (0, SLOTS), "a KV slot leaked"


def chat(messages, n_tokens, rid, top_k=0):
    sp = SamplingParams(max_new_tokens=n_tokens, do_sample=bool(top_k), top_k=top_k)
    return GenerationRequest(kind="chat", seeds=[3], messages=messages, max_new_tokens=n_tokens,
                             sampling=sp, request_id=rid)


def image(prompt, steps, rid, seed):
    return GenerationRequest(kind="image", seeds=[seed], prompt=prompt, request_id=rid,
                             image=ImageOptions(num_inference_steps=steps, guidance_scale=3.0,
                                                size=(32, 32)))


def run_together(sched, requests):
    """Queue every request while the worker is held, then collect each one's events."""
    gate = threading.Event()
    sched.observer.on_iteration = lambda s: gate.wait(30)

    async def main():
        handles = [await sched.submit(r) for r in requests]
        gate.set()
        return await asyncio.wait_for(
            asyncio.gather(*[_collect(h) for h in handles]), 300)

    try:
        return asyncio.run(main())
    finally:
        sched.observer.on_iteration = None
        gate.set()


async def _collect(h):
    return [ev async for ev in h]


def text_of(events):
    assert isinstance(events[-1], ChoiceDone), events[-1]
    return "".join(e.text for e in events if isinstance(e, (TextDelta, ChoiceDone)))


def image_of(events):
    assert isinstance(events[-1], ChoiceDone), events[-1]
    (im,) = [e.image for e in events if isinstance(e, ImageResult)]
    return np.asarray(im)


def test_a_failing_row_of_a_shared_step_fails_only_its_request(marked, ref_pipe):
    sched, model = marked
    if model.where == "unet":
        # innocent: a greedy chat and a 3-step image in the same U-Net calls as the marked one
        reqs = [chat(SKY, 12, "A"), image("a red house", 3, "B", seed=5),
                image("a blue lake", MARK_STEPS, "X", seed=6)]
    else:
        # innocent: two greedy chats decoding in the same batch as the marked sampled one
        reqs = [chat(SKY, 12, "A"), chat(SEA, 9, "B"), chat(SKY, 12, "X", top_k=MARK_TOP_K)]
    a, b, x = run_together(sched, reqs)
    assert model.raised >= 1, "the injected failure never fired: the test tests nothing"
    assert isinstance(x[-1], RequestFailed) and "injected" in str(x[-1].error), x[-1]
    # the innocents equal their solo answers
    assert text_of(a) == ref_pipe.chat(SKY, max_new_tokens=12)
    if model.where == "unet":
        solo = run_together(sched, [image("a red house", 3, "B1", seed=5)])[0]
        assert np.array_equal(image_of(b), image_of(solo))
    else:
        assert text_of(b) == ref_pipe.chat(SEA, max_new_tokens=9)
    # and the server goes on serving
    (again,) = run_together(sched, [chat(SEA, 5, "C")])
    assert text_of(again) == ref_pipe.chat(SEA, max_new_tokens=5)
