"""`dreamllm-fast eval-ppl`: perplexity of the engine's LLM over a text file, with any weights.

    dreamllm-fast eval-ppl --checkpoint DIR --text FILE [--weights int8] [--max-length 2048] [--stride 512]

So anyone with the released checkpoint can measure what int8/fp8 weights cost in quality (torchao
reports Llama-2-7B-chat wikitext perplexity 12.212 bf16 -> 12.204 int8 weight-only), on a text of
their choosing: the command ships no data set.

Sliding window, as Hugging Face's perplexity guide computes it for fixed-length models: the file is
tokenized once (with BOS); windows of `max_length` tokens start every `stride` tokens; each window
runs in a fresh sequence (empty KV cache) and scores only its tokens that the previous window did
not (the last `end - prev_end`), so every token after the first is predicted once, with up to
`max_length - stride` tokens of context. Defaults: the model's context (2048 for DreamLLM-7B) and
stride 512. The NLL is summed in float64 from fp32 log-softmax.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import InvalidInputError

DEFAULT_STRIDE = 512


def windows(n_tokens: int, max_length: int, stride: int):
    """(begin, end, n_scored) of each window: tokens [begin, end) in, the last n_scored scored."""
    if max_length < 2 or not 1 <= stride <= max_length:
        raise InvalidInputError(f"need max_length >= 2 and 1 <= stride <= max_length, got "
                                f"max_length={max_length}, stride={stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model, ids: list[int], max_length: int, stride: int = DEFAULT_STRIDE) -> dict:
    """Perplexity of token `ids` under `model` (the engine: sessions with `extend_logits`)."""
    if len(ids) < 2:
        raise InvalidInputError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    nll, count = 0.0, 0
    for begin, end, n_scored in windows(len(ids), max_length, stride):
        # row r predicts token begin + r + 1; score the targets in [end - n_scored, end)
        first = max(0, end - n_scored - 1 - begin)
        rows = list(range(first, end - begin - 1))
        if not rows:
            continue
        s = model.new_session()
        try:
            logits = s.extend_logits(model.embed_tokens(ids[begin:end]), rows)
        finally:
            s.close()
        target = torch.tensor([ids[begin + r + 1] for r in rows], device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, target[:, None])
        nll -= logp.double().sum().item()
        count += len(rows)
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "tokens_scored": count,
            "tokens": len(ids), "max_length": max_length, "stride": stride}


def run(args) -> dict:
    from pathlib import Path

    from .pipeline import DreamLLMPipeline

    path = Path(args.text)
    if not path.is_file():
        raise InvalidInputError(f"--text {path}: no such file")
    pipe = DreamLLMPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                            backend="engine", weights=args.weights, progress=False)
    ids = pipe.tokenizer.encode(path.read_text(encoding="utf-8"))  # BOS first
    max_length: Optional[int] = args.max_length or pipe.max_len
    if max_length > pipe.max_len:
        raise InvalidInputError(f"--max-length {max_length} exceeds the model's context {pipe.max_len}")
    out = perplexity(pipe.model, ids, max_length, args.stride)
    out.update(weights=pipe.model.engine_config.weights.value, dtype=str(pipe.model.dtype).replace("torch.", ""),
               device=str(pipe.model.device), text=str(path))
    return out
