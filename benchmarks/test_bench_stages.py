"""pytest-benchmark suite over the engine's stages (not part of the test suite: `tests/` only).

    python -m pytest benchmarks/test_bench_stages.py --benchmark-autosave          # record a run
    python -m pytest benchmarks/test_bench_stages.py --benchmark-compare           # vs the last one
    python -m pytest benchmarks/test_bench_stages.py --benchmark-compare=0001 --benchmark-compare-fail=median:5%

On CUDA the models are random weights at the 7B shapes; elsewhere the tiny preset (a smoke run,
not a performance claim). The same stage functions as `dreamllm-fast bench`.
"""
import pytest
import torch

from dreamllm_fast.bench.stages import BenchSettings, _embeds, _interleaved, _t2i

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", params=["engine", "reference"])
def model(request, tmp_path_factory):
    from dreamllm_fast.checkpoint import load_checkpoint, load_tokenizer
    from dreamllm_fast.config import DreamLLMConfig, SpecialTokens
    from dreamllm_fast.tiny import make_tiny

    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    special = SpecialTokens.from_tokenizer(load_tokenizer(tiny))
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    if CUDA:
        from dreamllm_fast.devtools.testing import random_checkpoint

        ckpt = random_checkpoint(DreamLLMConfig.from_name("dreamllm-7b"), device=device, dtype=dtype)
    else:
        ckpt = load_checkpoint(tiny)
    if request.param == "engine":
        from dreamllm_fast.engine import EngineModel

        return EngineModel(ckpt, special, device=device, dtype=dtype)
    from dreamllm_fast.reference import ReferenceModel

    return ReferenceModel(ckpt, special, device=device, dtype=dtype)


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out
    return run


SETTINGS = BenchSettings() if CUDA else BenchSettings(prefill_text_tokens=32, t2i_steps=2,
                                                      interleaved_tokens=12, interleaved_images=1)


def test_prefill(benchmark, model):
    emb = _embeds(model, SETTINGS.prefill_text_tokens + model.config.image_span_len)

    def run():
        s = model.new_session()
        try:
            return s.extend(emb)
        finally:
            s.close()

    benchmark(_sync(run))


def test_decode_token(benchmark, model):
    s = model.new_session()
    s.extend(_embeds(model, 128))
    e = model.embed_tokens([5])
    start = s.length
    from dreamllm_fast.bench.stages import _rewind

    def run():
        if s.length >= start + 64:
            _rewind(s, start)
        return s.extend(e)

    benchmark(_sync(run))
    s.close()


def test_text_to_image(benchmark, model):
    benchmark.pedantic(_sync(lambda: _t2i(model, SETTINGS.t2i_steps)), rounds=3, warmup_rounds=1)


def test_interleaved(benchmark, model):
    benchmark.pedantic(_sync(lambda: _interleaved(model, SETTINGS.interleaved_tokens,
                                                  SETTINGS.interleaved_images, SETTINGS.t2i_steps)),
                       rounds=2, warmup_rounds=1)
