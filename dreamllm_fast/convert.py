"""Write a checkpoint in the released layout with every weight file as safetensors, optionally
with the LLM quantized (`dreamllm-fast convert`). Reading is dreamllm_fast/checkpoint.py."""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import (COMPONENT_CONFIGS, LLM_FILE, QUANTIZABLE_SUFFIXES, SAFETENSORS_NAME, SCALE_SUFFIX,
                         TOKENIZER_FILES, WEIGHT_FILES, _llm_ignorable, load_checkpoint, read_weight_file)
from .config import WeightFormat
from .errors import CheckpointError


def quantize_llm_state(state: dict, weights: str) -> dict:
    """The LLM state with every quantizable linear (q/k/v/o, gate/up/down, the LM head) replaced by
    its per-channel quantized weight and `<name>_scale` (dreamllm_fast/quant.py); the rest as is."""
    from .quant import quantize

    out = {}
    for k, v in state.items():
        if k.endswith(QUANTIZABLE_SUFFIXES) and k.startswith(("model.layers.", "lm_head.")):
            qw = quantize(v, weights)
            out[k], out[k + SCALE_SUFFIX] = qw.qweight, qw.scale
        else:
            out[k] = v
    return out


def convert_checkpoint(src: "str | Path", dst: "str | Path", weights: str = "bf16") -> list[Path]:
    """Copy a checkpoint to `dst` with every weight file as safetensors (same key names).

    The loader prefers the safetensors (mmapped, no unpickling). Config and tokenizer files are
    copied as they are. weights "int8"/"fp8": the LLM's linears and LM head are written quantized
    per output channel (`quantize_llm_state`), so later loads skip the quantization; the source
    must hold unquantized weights. Returns the files written.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    fmt = WeightFormat.parse(weights)
    ck = load_checkpoint(src)  # validate everything before writing anything
    if fmt.quantized and ck.llm_weights != "bf16":
        raise CheckpointError(f"{src}: its LLM is already quantized ({ck.llm_weights}); convert the "
                              f"bf16 checkpoint instead")
    del ck
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in WEIGHT_FILES:
        state, _ = read_weight_file(src, name)
        meta = {"format": "pt"}
        if name == LLM_FILE and fmt.quantized:
            state = quantize_llm_state({k: v for k, v in state.items() if not _llm_ignorable(k)}, fmt)
            meta["dreamllm_fast.weights"] = fmt.value
        out = dst / SAFETENSORS_NAME[name]
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
        written.append(out)
    for rel in ("config.json", "generation_config.json") + TOKENIZER_FILES + COMPONENT_CONFIGS:
        if (src / rel).is_file() and (src / rel).resolve() != (dst / rel).resolve():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
            written.append(dst / rel)
    return written
