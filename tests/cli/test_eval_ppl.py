"""`dreamllm-fast eval-ppl` on the tiny checkpoint: the sliding-window math against transformers'
own loss over the same windows, and the int8 engine's perplexity beside the unquantized one.

The tiny checkpoint's random LLM predicts "previous id + 1" with a large margin, so its perplexity
of ordinary text is astronomical (~2e19, NLL ~44 nats per token): the figures test the arithmetic,
not a language model. Measured (2-core CPU, window 64, stride 32, 326 tokens): engine vs
transformers NLL per token differ by < 1e-5; int8 weights change it by 1.2e-3 nats per token.
"""
import json
import random

import pytest
import torch

from dreamllm_fast.cli import main
from dreamllm_fast.eval_ppl import windows

WORDS = "the cat sat on a mat while small dogs ran past red houses under a yellow sun and blue sky".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("ppl") / "text.txt"
    p.write_text(" ".join(rng.choice(WORDS) for _ in range(120)), encoding="utf-8")
    return p


def _run(capsys, ckpt, text, *extra):
    assert main(["eval-ppl", "--checkpoint", str(ckpt), "--text", str(text), "--max-length", "64",
                 "--stride", "32", "--device", "cpu", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("n,L,S", [(10, 4, 2), (100, 64, 32), (64, 64, 16), (7, 64, 512 // 8)])
def test_windows_predict_every_token_but_the_first_once(n, L, S):
    scored = []
    for begin, end, k in windows(n, L, S):
        assert 0 < end - begin <= L and k <= end - begin
        scored += list(range(max(begin + 1, end - k), end))
    assert scored == list(range(1, n))


def test_engine_perplexity_matches_transformers_sliding_window(tiny_ckpt, text_file, capsys):
    got = _run(capsys, tiny_ckpt, text_file, "--weights", "bf16")
    from dreamllm_fast.pipeline import DreamLLMPipeline

    ref = DreamLLMPipeline.from_pretrained(tiny_ckpt, device="cpu", dtype="fp32", backend="reference",
                                           progress=False)
    ids = ref.tokenizer.encode(text_file.read_text(encoding="utf-8"))
    nll, count = 0.0, 0
    with torch.no_grad():  # Hugging Face's perplexity recipe, independently of eval_ppl.py
        for begin, end, k in windows(len(ids), 64, 32):
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[:, :-k] = -100
            n_valid = int((labels[:, 1:] != -100).sum())
            nll += ref.model.llm(input_ids=x, labels=labels).loss.double().item() * n_valid
            count += n_valid
    print(f"eval-ppl NLL/token {got['nll_per_token']:.6f}, transformers {nll / count:.6f}, "
          f"{got['tokens_scored']} tokens")
    assert got["tokens_scored"] == count == got["tokens"] - 1
    assert abs(got["nll_per_token"] - nll / count) <= 1e-4  # measured < 1e-5 (fp32)


def test_int8_perplexity_beside_bf16(tiny_ckpt, text_file, capsys):
    base = _run(capsys, tiny_ckpt, text_file, "--weights", "bf16")
    q = _run(capsys, tiny_ckpt, text_file, "--weights", "int8")
    d = q["nll_per_token"] - base["nll_per_token"]
    print(f"perplexity bf16 {base['perplexity']:.6g} int8 {q['perplexity']:.6g}: NLL/token +{d:.3g}")
    assert q["weights"] == "int8" and q["max_length"] == 64 and q["stride"] == 32
    assert 0 < abs(d) <= 0.05  # measured 1.2e-3 nats per token


def test_bad_window_is_refused(tiny_ckpt, text_file, capsys):
    assert main(["eval-ppl", "--checkpoint", str(tiny_ckpt), "--text", str(text_file), "--device", "cpu",
                 "--max-length", "16", "--stride", "32"]) == 2
    assert "stride <= max_length" in capsys.readouterr().err
