"""Checkpoint loading: the released layout, conversions, and one clear error per kind of damage."""
import json
import shutil

import pytest
import torch

from dreamllm_fast.checkpoint import (DREAM_FILE, HEAD_FILE, LLM_FILE, VISION_FILE,
                                      clip_keys_to_installed, clip_keys_to_released,
                                      load_checkpoint, load_config)
from dreamllm_fast.convert import convert_checkpoint
from dreamllm_fast.config import ADDED_TOKENS, DreamLLMConfig, SpecialTokens
from dreamllm_fast.errors import CheckpointError


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, d)
    return d


def test_release_layout_and_keys(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert {LLM_FILE, VISION_FILE, DREAM_FILE, HEAD_FILE, "config.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= names
    assert "tokenizer.json" not in names
    llm = torch.load(tiny_ckpt / LLM_FILE, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for k, v in llm.items() if "inv_freq" not in k)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in llm
    vis = torch.load(tiny_ckpt / VISION_FILE, weights_only=True)
    assert "clip_vision_model.vision_model.encoder.layers.0.self_attn.q_proj.weight" in vis
    assert "projector.projector.bias" in vis
    head = torch.load(tiny_ckpt / HEAD_FILE, weights_only=True)
    assert "projector.projector.weight" in head and "projector.projector.bias" not in head
    assert any(k.startswith("unet.") and k.endswith("to_q.weight") for k in head)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, -1)


def test_special_tokens_come_from_tokenizer_in_released_order(tiny_ckpt):
    tok = load_checkpoint(tiny_ckpt).tokenizer()
    sp = SpecialTokens.from_tokenizer(tok)
    base = len(tok) - len(ADDED_TOKENS)
    assert (sp.bos, sp.eos, sp.unk) == (1, 2, 0)  # not config.json's legacy 0/1
    assert [sp.pad, sp.im_start, sp.dream_end, sp.dream_start, sp.im_patch, sp.im_end, sp.image,
            sp.dream] == list(range(base, base + 8))
    # legacy SentencePiece spacing: text after a special token gets the dummy prefix
    pieces = tok.convert_ids_to_tokens(tok("<im_end>What").input_ids)
    assert pieces[:3] == ["<s>", "<im_end>", pieces[2]] and pieces[2].startswith("\u2581")


def test_load_maps_and_checks_everything(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    cfg = DreamLLMConfig.from_name("tiny")
    assert ck.config.llm == cfg.llm and ck.config.num_dream_queries == cfg.num_dream_queries
    assert ck.dream_queries.shape == (cfg.num_dream_queries, cfg.llm.hidden_size)
    assert not any("inv_freq" in k for k in ck.llm)
    assert ck.cond_proj_weight.shape == (cfg.diffusion.cross_attention_dim, cfg.llm.hidden_size)


def test_clip_key_mapping_round_trips():
    released = {"clip_vision_model.vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1),
                "clip_vision_model.vision_model.pre_layrnorm.bias": torch.zeros(1)}
    installed = clip_keys_to_installed(released)
    assert clip_keys_to_released(installed).keys() == released.keys()
    # both transformers generations map back to the released names
    assert set(clip_keys_to_released({"vision_model.post_layernorm.weight": 1,
                                      "post_layernorm.bias": 2})) == {
        "clip_vision_model.vision_model.post_layernorm.weight",
        "clip_vision_model.vision_model.post_layernorm.bias"}


def test_convert_to_safetensors_is_preferred_and_equal(tiny_ckpt, tmp_path):
    out = tmp_path / "st"
    convert_checkpoint(tiny_ckpt, out)
    assert (out / "model.safetensors").is_file() and not (out / LLM_FILE).exists()
    a, b = load_checkpoint(tiny_ckpt), load_checkpoint(out)
    for k in a.llm:
        assert torch.equal(a.llm[k], b.llm[k])
    assert torch.equal(a.dream_queries, b.dream_queries) and torch.equal(a.unet["conv_in.weight"], b.unet["conv_in.weight"])


def test_sharded_llm(ckpt_copy):
    from safetensors.torch import save_file

    state = torch.load(ckpt_copy / LLM_FILE, weights_only=True)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(ckpt_copy / name))
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (ckpt_copy / LLM_FILE).unlink()
    ck = load_checkpoint(ckpt_copy)
    assert torch.equal(ck.llm["lm_head.weight"], state["lm_head.weight"])


def test_legacy_dream_queries_file(ckpt_copy):
    dq = torch.load(ckpt_copy / DREAM_FILE, weights_only=True)["dream_queries"]
    (ckpt_copy / DREAM_FILE).unlink()
    torch.save(dq, ckpt_copy / "dream_queries.pt")
    assert torch.equal(load_checkpoint(ckpt_copy).dream_queries, dq[0])


@pytest.mark.parametrize("victim", [LLM_FILE, VISION_FILE, DREAM_FILE, HEAD_FILE, "config.json"])
def test_missing_file_is_named(ckpt_copy, victim):
    (ckpt_copy / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing {victim}"):
        load_checkpoint(ckpt_copy)


def test_missing_tokenizer_file_is_named(ckpt_copy):
    (ckpt_copy / "added_tokens.json").unlink()
    ck = load_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="added_tokens.json"):
        ck.tokenizer()


def test_truncated_file(ckpt_copy):
    p = ckpt_copy / HEAD_FILE
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{HEAD_FILE}.*truncated or corrupt"):
        load_checkpoint(ckpt_copy)


def test_arbitrary_pickle_is_refused(ckpt_copy):
    import collections

    torch.save({"dream_queries": torch.zeros(1, 16, 128), "x": collections.Counter(a=1)},
               ckpt_copy / DREAM_FILE)
    with pytest.raises(CheckpointError, match="will not be unpickled|state dict of tensors"):
        load_checkpoint(ckpt_copy)


def test_shape_mismatch_names_file_key_and_shapes(ckpt_copy):
    state = torch.load(ckpt_copy / LLM_FILE, weights_only=True)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(255, 128, dtype=torch.bfloat16)
    torch.save(state, ckpt_copy / LLM_FILE)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_copy)
    msg = str(e.value)
    assert LLM_FILE in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "[255, 128]" in msg and "[256, 128]" in msg


def test_unexpected_and_missing_keys(ckpt_copy):
    state = torch.load(ckpt_copy / VISION_FILE, weights_only=True)
    del state["projector.projector.bias"]
    torch.save(state, ckpt_copy / VISION_FILE)
    with pytest.raises(CheckpointError, match="missing 1 tensor.*projector.projector.bias"):
        load_checkpoint(ckpt_copy)


def test_bad_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_config(ckpt_copy)


def test_released_7b_config_is_parsed_as_released(tmp_path):
    """The released config.json fields; component configs fall back to SD-2.1."""
    raw = {"architectures": ["DreamLLMForCausalMLM"], "model_type": "dreamllm", "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
           "max_sequence_length": 2048, "attention_bias": False, "bos_token_id": 0,
           "eos_token_id": 1, "pad_token_id": -1, "vocab_size": 32008, "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path)
    ref = DreamLLMConfig.from_name("dreamllm-7b")
    assert cfg.llm == ref.llm and cfg.diffusion == ref.diffusion and cfg.vision.clip == ref.vision.clip
    assert cfg.image_span_len == 258 and cfg.dream_span_len == 66
    assert cfg.diffusion.default_resolution == 512
