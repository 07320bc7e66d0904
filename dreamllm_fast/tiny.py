"""`make-tiny`: a random tiny DreamLLM checkpoint written in exactly the released layout.

Same file names, key names (transformers-4.x CLIP naming, diffusers U-Net/VAE naming, the LLM's
persistent `rotary_emb.inv_freq` buffers), bf16 pickles, a DreamLLM-style config.json with the legacy
bos/eos/pad of 0/1/-1, and a real SentencePiece tokenizer trained here with the 8 added tokens in the
released id order. One loader therefore serves the tiny model and the real one. Unlike the 7B
release, the tiny checkpoint also carries its component configs (the 7B one builds CLIP ViT-L/14 and
SD-2.1-base from built-in constants).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from .checkpoint import (DREAM_FILE, HEAD_FILE, LLM_FILE, VISION_FILE, clip_keys_to_released)
from .config import ADDED_TOKENS, TINY_BASE_VOCAB, DreamLLMConfig

# Added tokens that the original lists as additional special tokens ([PAD] is the pad token).
ADDITIONAL_SPECIAL = ["<image>", "<im_patch>", "<im_start>", "<im_end>", "<dream>", "<dream_start>",
                      "<dream_end>"]
_WORDS = (
    "a the of and to in is it that was he for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him see "
    "time could no make than first been its who now people my made over did down only way find use "
    "may water long little very after words called just where most know get through back much go "
    "good new write our me man too any day same right look think also around another came come work "
    "three word must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might "
    "next sound below saw something thought both few those always looked show large often together "
    "asked house dog cat sun sky tree red blue green image picture photo draw paint user assistant "
    "chat question answer helpful detailed polite curious artificial intelligence"
).split()


def _train_tokenizer(out: Path, vocab: int, seed: int) -> None:
    import sentencepiece as spm

    rng = random.Random(seed)
    sents = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize()
             + rng.choice(".?!,") for _ in range(3000)]
    # LLaMA's tokenizer: BPE, byte fallback, <unk>=0 <s>=1 </s>=2, no pad, dummy prefix.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=vocab, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, character_coverage=1.0, normalization_rule_name="identity",
        split_digits=True, remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)


def _write_tokenizer_files(out: Path, base_vocab: int) -> None:
    def entry(c):
        return {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    added = {t: base_vocab + i for i, t in enumerate(ADDED_TOKENS)}
    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    decoder.update({str(i): entry(t) for t, i in added.items()})
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": ADDITIONAL_SPECIAL, "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "[PAD]", "unk_token": "<unk>"}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
         "additional_special_tokens": ADDITIONAL_SPECIAL, "bos_token": "<s>",
         "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
         "model_max_length": 2048, "pad_token": "[PAD]", "padding_side": "right",
         "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"},
        indent=2))


def _released_config(cfg: DreamLLMConfig, base_vocab: int) -> dict:
    c = cfg.llm
    plugin = lambda target, **kw: dict(_target_=target, pretrained_model_name_or_path="none", **kw)  # noqa: E731
    return {
        "_name_or_path": "tiny-dreamllm", "architectures": ["DreamLLMForCausalMLM"],
        "model_type": "dreamllm", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
        "max_sequence_length": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None, "attention_bias": False,
        "pretraining_tp": 1, "tie_word_embeddings": False, "initializer_range": 0.02,
        "vocab_size": c.vocab_size, "torch_dtype": "bfloat16", "use_cache": True,
        # Legacy values of the release; the engine ignores them (ids come from the tokenizer).
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
        "loss_weight_lm": 1.0, "loss_weight_vm": 10.0, "loss_scale_schedule": "none",
        "plugins_type": {"clip_vision_embedding": "embedding", "dream_embedding": "embedding",
                         "stable_diffusion_head": "head"},
        "plugins_init_kwargs": {
            "clip_vision_embedding": plugin(
                "omni.models.dreamllm.modeling_plugins.CLIPVisionEmbedding",
                embed_hidden_size=c.hidden_size, projector_type="linear", projector_depth=1,
                clip_vision_model_name_or_path="openai/clip-vit-large-patch14", select_layer=-2),
            "dream_embedding": plugin("omni.models.dreamllm.modeling_plugins.DreamEmbedding",
                                      num_dream_queries=cfg.num_dream_queries,
                                      embed_hidden_size=c.hidden_size),
            "stable_diffusion_head": plugin(
                "omni.models.dreamllm.modeling_plugins.StableDiffusionHead",
                diffusion_name_or_path="stabilityai/stable-diffusion-2-1-base",
                embed_hidden_size=c.hidden_size, freeze_unet=True),
        },
        "special_tokens2ids_dict": {
            "<s>": 1, "</s>": 2, "<unk>": 0, "[PAD]": base_vocab,
            "additional_special_tokens": {t: base_vocab + ADDED_TOKENS.index(t)
                                          for t in ADDITIONAL_SPECIAL},
        },
    }


# Greedy walk of the tiny model. Its prompt ends with ':' ("ASSISTANT:"), byte token 3 + 0x3A.
_COLON, _FIRST_RUN, _SECOND_RUN = 3 + 0x3A, 70, 40


def _shape_greedy_walk(state: dict, g: torch.Generator) -> None:
    """Give the random LLM a readable, testable greedy behaviour.

    Token embeddings get unit scale (the layers' random updates stay smaller), and the rows of
    lm_head are set so the last token's embedding points at a chosen successor: after ':' the model
    writes 70 distinct tokens, then `<dream_start>`; after `<im_end>` (an image fed back) 40
    more, then `</s>`. Attention and MLP still shift every logit, so the walk exercises the whole
    network: a wrong position, mask or cache changes the logits and, soon, the tokens.
    """
    emb = torch.randn(state["model.embed_tokens.weight"].shape, generator=g)
    state["model.embed_tokens.weight"] = emb
    V, H = emb.shape
    base = TINY_BASE_VOCAB
    # Multi-character pieces first (ids past the 3 specials and 256 bytes), then printable bytes.
    printable = [3 + b for b in range(0x61, 0x7B)] + [3 + b for b in range(0x41, 0x5B)]
    pool = [i for i in range(3 + 256, base)] + printable
    pool = [i for i in pool if i != _COLON]
    first, second = pool[:_FIRST_RUN], pool[_FIRST_RUN:_FIRST_RUN + _SECOND_RUN]
    dream_start, im_end = base + ADDED_TOKENS.index("<dream_start>"), base + ADDED_TOKENS.index("<im_end>")
    chain = [(_COLON, first[0])] + list(zip(first, first[1:])) + [(first[-1], dream_start)]
    chain += [(im_end, second[0])] + list(zip(second, second[1:])) + [(second[-1], 2)]
    head = 0.02 * torch.randn(V, H, generator=g)
    for prev, nxt in chain:
        head[nxt] += 4.0 * emb[prev] / emb[prev].norm()
    state["lm_head.weight"] = head


def make_tiny(out_dir: "str | Path", seed: int = 0, init_std: float = 0.05) -> Path:
    """Write a random tiny checkpoint (preset ``tiny``) to `out_dir`; returns the directory.

    `init_std` scales the LLM's random weights (larger than LLaMA's 0.02 so that the tiny model's
    logits are not flat and greedy decoding is not a tie-break contest).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DreamLLMConfig.from_name("tiny")
    base_vocab = TINY_BASE_VOCAB
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def randomize(module, std):
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.data = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                p.data = std * torch.randn(p.shape, generator=g)

    bf16 = lambda sd: {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}  # noqa: E731

    llm = LlamaForCausalLM(cfg.llm.to_hf())
    randomize(llm, init_std)
    state = llm.state_dict()
    _shape_greedy_walk(state, g)
    state = bf16(state)
    d = cfg.llm.head_dim
    inv_freq = 1.0 / (cfg.llm.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    for i in range(cfg.llm.num_hidden_layers):  # persistent buffer in the original class
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(state, out / LLM_FILE)

    clip = CLIPVisionModel(cfg.vision.to_hf())
    randomize(clip, 0.05)
    vstate = clip_keys_to_released({k: v for k, v in clip.state_dict().items()
                                    if not k.endswith("position_ids")})
    vstate["projector.projector.weight"] = 0.05 * torch.randn(cfg.llm.hidden_size,
                                                              cfg.vision.hidden_size, generator=g)
    vstate["projector.projector.bias"] = 0.05 * torch.randn(cfg.llm.hidden_size, generator=g)
    torch.save(bf16(vstate), out / VISION_FILE)

    dq = torch.randn(1, cfg.num_dream_queries, cfg.llm.hidden_size, generator=g)
    torch.save(bf16({"dream_queries": dq}), out / DREAM_FILE)

    unet = UNet2DConditionModel.from_config(cfg.diffusion.unet)
    vae = AutoencoderKL.from_config(cfg.diffusion.vae)
    head = {"unet." + k: v for k, v in unet.state_dict().items()}
    head.update({"vae." + k: v for k, v in vae.state_dict().items()})
    head["projector.projector.weight"] = 0.05 * torch.randn(cfg.diffusion.cross_attention_dim,
                                                            cfg.llm.hidden_size, generator=g)
    torch.save(bf16(head), out / HEAD_FILE)

    (out / "config.json").write_text(json.dumps(_released_config(cfg, base_vocab), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1},
        indent=2))
    (out / "vision_config.json").write_text(json.dumps(cfg.vision.clip, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(cfg.vision.preprocessor, indent=2))
    for sub, conf, fname in (("unet", cfg.diffusion.unet, "config.json"),
                             ("vae", cfg.diffusion.vae, "config.json"),
                             ("scheduler", cfg.diffusion.scheduler, "scheduler_config.json")):
        (out / sub).mkdir(exist_ok=True)
        (out / sub / fname).write_text(json.dumps(conf, indent=2))
    _train_tokenizer(out, base_vocab, seed)
    _write_tokenizer_files(out, base_vocab)
    return out


def default_cache() -> Path:
    """Where the embedded tiny checkpoint is written: $DREAMLLM_FAST_CACHE, else
    ~/.cache/dreamllm-fast."""
    return Path(os.environ.get("DREAMLLM_FAST_CACHE", Path.home() / ".cache" / "dreamllm-fast"))


def embedded_checkpoint(checkpoint=None, cache=None) -> str:
    """`checkpoint`, or when None the embedded tiny random checkpoint (written once under `cache`,
    default `default_cache()`), with a note that its output is noise."""
    if checkpoint is not None:
        return str(checkpoint)
    path = Path(cache or default_cache()) / "tiny"
    if not (path / "config.json").is_file():
        print(f"no --checkpoint: writing a tiny random checkpoint to {path}")
        make_tiny(path)
    print("note: the tiny checkpoint has random weights; its text and images are noise. "
          "Pass --checkpoint with a released DreamLLM model for real output.")
    return str(path)

