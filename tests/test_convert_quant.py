"""`dreamllm-fast convert --weights int8|fp8`: quantized safetensors that later loads use as stored."""
import pytest
import torch
from safetensors import safe_open

from dreamllm_fast.checkpoint import SAFETENSORS_NAME, LLM_FILE, load_checkpoint
from dreamllm_fast.cli import main
from dreamllm_fast.errors import CheckpointError, InvalidInputError
from dreamllm_fast.pipeline import DreamLLMPipeline


@pytest.fixture(scope="module")
def converted(tiny_ckpt, tmp_path_factory):
    out = {}
    for fmt in ("int8", "fp8"):
        d = tmp_path_factory.mktemp(f"tiny_{fmt}")
        assert main(["convert", str(tiny_ckpt), str(d), "--weights", fmt]) == 0
        out[fmt] = d
    return out


@pytest.mark.parametrize("fmt,dtype", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_converted_files_hold_quantized_linears_and_scales(converted, fmt, dtype):
    with safe_open(str(converted[fmt] / SAFETENSORS_NAME[LLM_FILE]), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["dreamllm_fast.weights"] == fmt
        assert f.get_tensor("lm_head.weight").dtype == dtype
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # stays as released
        assert f.get_tensor("model.layers.1.input_layernorm.weight").dtype == torch.bfloat16
    assert sum(k.endswith("_scale") for k in keys) == 2 * 7 + 1  # 2 layers x 7 linears + LM head
    assert load_checkpoint(converted[fmt]).llm_weights == fmt


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_stored_weights_are_used_as_stored_and_equal_load_time_quantization(tiny_ckpt, converted, fmt):
    stored = DreamLLMPipeline.from_pretrained(converted[fmt], device="cpu", dtype="fp32", progress=False)
    assert stored.model.engine_config.weights.value == fmt  # picked up without --weights
    fresh = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", weights=fmt, progress=False)
    a, b = stored.model.weights.tensors(), fresh.model.weights.tensors()
    assert len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_mismatched_loads_and_double_conversion_are_refused(converted, tmp_path):
    with pytest.raises(InvalidInputError, match="int8-quantized.*weights='int8'"):
        DreamLLMPipeline.from_pretrained(converted["int8"], device="cpu", weights="fp8")
    with pytest.raises(InvalidInputError, match="int8-quantized"):
        DreamLLMPipeline.from_pretrained(converted["int8"], device="cpu", weights="bf16")
    with pytest.raises(CheckpointError, match="already quantized"):
        from dreamllm_fast.convert import convert_checkpoint

        convert_checkpoint(converted["int8"], tmp_path / "again", weights="fp8")
