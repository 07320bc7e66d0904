"""Shared test setup: Triton interpreter mode on CPU, GPU markers, seeds.

TRITON_INTERPRET must be set before any ``@triton.jit`` kernel is defined, so it is set here, at
import time of the first conftest, when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
IS_SM80 = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with CUDA; none found")
requires_sm80 = pytest.mark.skipif(
    not IS_SM80, reason="needs an Ampere-or-newer GPU (sm80+) for bf16; none found"
)
requires_trt = pytest.mark.skipif(
    not _has_tensorrt(),
    reason="TensorRT is not installed (its wheels download from NVIDIA's index at install time); "
    "pip install 'dreamllm-fast[tensorrt]' on a machine that reaches it",
)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run @slow tests (real checkpoints)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: pass --run-slow (and DREAMLLM_CHECKPOINT for real weights)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_clear():
    torch.manual_seed(0)
    yield
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random checkpoint in the official release layout (written once per run)."""
    from dreamllm_fast.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="session")
def ref_pipe(tiny_ckpt):
    """The reference pipeline on the tiny checkpoint, fp32 on the CPU."""
    from dreamllm_fast.pipeline import DreamLLMPipeline

    return DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32",
                                            backend="reference", progress=False)
