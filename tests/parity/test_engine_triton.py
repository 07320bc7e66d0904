"""The engine's GPU code path (the Triton kernels) against the reference, on CPU.

Under TRITON_INTERPRET=1 (set by tests/conftest.py when no GPU is present), forcing the Triton
backend runs every kernel launch the engine makes on CUDA: fused-qkv strided views, packed
append-attention metadata, decode-attention cache offsets, the dream projection's row gather.
Measured (tiny random model, fp32): logits max diff 1.2e-6, condition relative error 5.6e-7.
On a GPU this module skips: tests/parity/test_engine_gpu.py covers the same path natively.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from dreamllm_fast import kernels as K  # noqa: E402
from dreamllm_fast.checkpoint import load_tokenizer  # noqa: E402
from dreamllm_fast.config import DreamLLMConfig, SpecialTokens  # noqa: E402
from dreamllm_fast.engine import EngineModel  # noqa: E402
from dreamllm_fast.devtools.testing import random_checkpoint  # noqa: E402
from dreamllm_fast.reference import ReferenceModel  # noqa: E402
from dreamllm_fast.tiny import make_tiny  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter-mode check of the Triton path on CPU; on a GPU test_engine_gpu.py covers it")

LOGIT_ATOL = 1e-4  # measured 1.2e-6
COND_RTOL = 1e-5  # measured 5.6e-7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = make_tiny(tmp_path_factory.mktemp("tiny_triton"))
    special = SpecialTokens.from_tokenizer(load_tokenizer(d))
    ck = random_checkpoint(DreamLLMConfig.from_name("tiny"), dtype=torch.float32, std=0.05, seed=1)
    return (EngineModel(ck, special, "cpu", torch.float32),
            ReferenceModel(ck, special, "cpu", torch.float32), special)


@pytest.fixture
def triton_backend():
    K.set_backend("triton")
    yield
    K.set_backend(None)


def test_triton_path_prefill_decode_dream(models, triton_backend):
    eng, ref, special = models
    emb = ref.embed_tokens(list(range(5, 50)))
    se, sr = eng.new_session(), ref.new_session()
    try:
        le, lr = se.extend(emb[:20]), sr.extend(emb[:20])
        le, lr = se.extend(emb[20:]), sr.extend(emb[20:])  # append onto a cached prefix
        worst = (le - lr).abs().max().item()
        for _ in range(4):
            tok = int(lr.argmax())
            assert int(le.argmax()) == tok
            le, lr = se.extend(eng.embed_tokens([tok])), sr.extend(ref.embed_tokens([tok]))
            worst = max(worst, (le - lr).abs().max().item())
        print(f"max |logit diff| {worst:.3g}")
        assert worst <= LOGIT_ATOL
        Q = ref.dream_queries.shape[0]
        span = torch.cat([ref.embed_tokens([special.dream_start]), ref.dream_queries])
        ce = se.extend_dream(span, list(range(1, Q + 1)))
        cr = sr.extend_dream(span, list(range(1, Q + 1)))
        rel = ((ce - cr).norm() / cr.norm()).item()
        print(f"condition rel err {rel:.3g}")
        assert rel <= COND_RTOL
    finally:
        se.close()
        sr.close()
