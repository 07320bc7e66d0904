"""CPU checks of the export path: ONNX graphs with dynamic axes, onnxruntime backends, fallbacks,
the artifact cache, a short DDPM + CFG loop and the export CLI. Tiny preset, random weights.

Tolerances (fp32, onnxruntime CPU EP vs PyTorch CPU, measured on this machine, torch 2.13,
onnxruntime 1.31): U-Net max |diff| 1.2e-6 .. 2.7e-6 (outputs ~1.3), VAE 5.4e-6 .. 7.8e-6, CLIP
tower 3.3e-6, 3-step DDPM+CFG image 6.6e-6 (image ~2.2). ONNX_ATOL = 1e-4 leaves 10x+ headroom for other CPUs'
reduction orders while still failing on any real graph bug (those show up at 1e-2 and above).
"""
import logging

import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402

from dreamllm_fast.config import DreamLLMConfig  # noqa: E402
from dreamllm_fast.export import backends as B  # noqa: E402
from dreamllm_fast.export.cache import ArtifactKey, module_fingerprint  # noqa: E402
from dreamllm_fast.export.components import default_resolutions, get_spec  # noqa: E402
from dreamllm_fast.export.onnx_export import export_onnx  # noqa: E402

ONNX_ATOL = 1e-4
# (batch rows, latent h, latent w): none equals the export sample (2, 8, 8); one is non-square.
UNET_SHAPES = [(4, 12, 12), (1, 16, 8)]
VAE_SHAPES = [(3, 6, 6), (1, 10, 4)]


@pytest.fixture(scope="module")
def cfg():
    return DreamLLMConfig.from_name("tiny")


@pytest.fixture(scope="module")
def unet(cfg):
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(cfg.diffusion.unet).eval()


@pytest.fixture(scope="module")
def vae(cfg):
    torch.manual_seed(1)
    return AutoencoderKL.from_config(cfg.diffusion.vae).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export_cache")


@pytest.fixture(scope="module")
def ort_unet(unet, cfg, cache_dir):
    return B.make_unet_backend(unet, "onnxruntime", precision="fp32", cache_dir=cache_dir, cfg=cfg)


@pytest.fixture(scope="module")
def ort_vae(vae, cfg, cache_dir):
    return B.make_vae_backend(vae, "onnxruntime", precision="fp32", cache_dir=cache_dir, cfg=cfg)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _report(name, got, ref):
    d = (got - ref).abs()
    print(f"{name}: max|diff| {d.max().item():.3g} mean {d.mean().item():.3g} "
          f"max|ref| {ref.abs().max().item():.3g}")
    return d.max().item()


def test_real_model_profile_covers_guidance_batch_at_512_and_768():
    spec = get_spec("unet", DreamLLMConfig.from_name("dreamllm-7b"))
    prof = spec.profile((1, 1, 2), default_resolutions(512))
    assert prof["sample"] == ((2, 4, 64, 64), (2, 4, 64, 64), (4, 4, 96, 96))
    assert prof["timestep"] == ((2,), (2,), (4,))
    assert prof["encoder_hidden_states"][2] == (4, 64, 1024)
    vae = get_spec("vae", DreamLLMConfig.from_name("dreamllm-7b"))
    assert vae.shape_dict(1, 768) == {"latent": (1, 4, 96, 96), "image": (1, 3, 768, 768)}
    vis = get_spec("vision", DreamLLMConfig.from_name("dreamllm-7b"))
    assert vis.shape_dict(2, 512)["image_features"] == (2, 256, 1024)


def test_unet_onnx_matches_torch_at_other_batch_and_spatial_sizes(unet, cfg, tmp_path):
    spec = get_spec("unet", cfg)
    path = export_onnx(unet, spec, tmp_path / "unet.onnx", resolution=64, precision="fp32")
    sess = _session(path)
    axes = {i.name: i.shape for i in sess.get_inputs()}
    assert isinstance(axes["sample"][0], str) and isinstance(axes["sample"][2], str)
    for n, h, w in UNET_SHAPES:
        x, t, e = torch.randn(n, 4, h, w), torch.randint(0, 1000, (n,)).float(), \
            torch.randn(n, 16, 48)
        with torch.no_grad():
            ref = spec.wrap(unet)(x, t, e)
        got = torch.from_numpy(sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                                               "encoder_hidden_states": e.numpy()})[0])
        assert got.shape == ref.shape == (n, 4, h, w)
        assert _report(f"unet {n}x{h}x{w}", got, ref) < ONNX_ATOL


def test_vae_onnx_matches_torch_with_external_data(vae, cfg, tmp_path):
    spec = get_spec("vae", cfg)
    path = export_onnx(vae, spec, tmp_path / "vae.onnx", resolution=64, precision="fp32",
                       external_data=True)
    assert (tmp_path / "vae.onnx.data").stat().st_size > 0.9 * sum(
        p.numel() * 4 for p in vae.decoder.parameters())
    onnx.checker.check_model(str(path))
    sess = _session(path)
    for n, h, w in VAE_SHAPES:
        z = torch.randn(n, 4, h, w)
        with torch.no_grad():
            ref = vae.decode(z).sample
        got = torch.from_numpy(sess.run(None, {"latent": z.numpy()})[0])
        assert got.shape == (n, 3, 8 * h, 8 * w)
        assert _report(f"vae {n}x{h}x{w}", got, ref) < ONNX_ATOL


def test_vision_tower_onnx_is_penultimate_layer_without_cls(cfg, tmp_path):
    from transformers import CLIPVisionModel

    torch.manual_seed(2)
    clip = CLIPVisionModel(cfg.vision.to_hf()).eval()
    path = export_onnx(clip, get_spec("vision", cfg), tmp_path / "vision.onnx", resolution=224)
    px = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ref = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = torch.from_numpy(_session(path).run(None, {"pixel_values": px.numpy()})[0])
    assert got.shape == (3, 256, 32)
    assert _report("vision", got, ref) < ONNX_ATOL


@pytest.mark.parametrize("n,h,w", UNET_SHAPES)
def test_onnxruntime_unet_backend_matches_eager(ort_unet, unet, n, h, w):
    assert ort_unet.name == "onnxruntime" and ort_unet.fallback_reason is None
    eager = B.make_unet_backend(unet, "eager")
    x, e = torch.randn(n, 4, h, w), torch.randn(n, 16, 48)
    got, ref = ort_unet(x, 981, e), eager(x, 981, e)
    assert got.dtype == x.dtype and got.device == x.device
    assert _report("unet backend", got, ref) < ONNX_ATOL
    # a scalar timestep is the same as one per row
    assert torch.allclose(eager(x, torch.full((n,), 981.0), e), ref, atol=0, rtol=0)


def test_onnxruntime_vae_backend_matches_eager(ort_vae, vae):
    z = torch.randn(2, 4, 6, 10)
    got, ref = ort_vae(z), B.make_vae_backend(vae, "eager")(z)
    assert got.shape == (2, 3, 48, 80)
    assert _report("vae backend", got, ref) < ONNX_ATOL


def test_export_is_reused_from_the_cache(ort_unet, unet, cfg, cache_dir):
    assert ort_unet.runner.reused is False  # the fixture exported it
    mtime = ort_unet.runner.path.stat().st_mtime_ns
    again = B.make_unet_backend(unet, "onnxruntime", precision="fp32", cache_dir=cache_dir,
                                cfg=cfg)
    assert again.runner.reused is True
    assert again.runner.path == ort_unet.runner.path
    assert again.runner.path.stat().st_mtime_ns == mtime


def test_cache_key_changes_with_precision_shapes_and_weights(unet, cfg):
    spec = get_spec("unet", cfg)
    base = B.onnx_key(unet, spec, precision="fp32", resolution=64)
    assert base == B.onnx_key(unet, spec, precision="fp32", resolution=64)
    assert base.digest != B.onnx_key(unet, spec, precision="fp16", resolution=64).digest
    assert base.digest != B.onnx_key(unet, spec, precision="fp32", resolution=96).digest
    assert base.digest != B.onnx_key(unet, spec, precision="fp32", resolution=64, opset=18).digest
    torch.manual_seed(5)  # the fixture used seed 0
    other = UNet2DConditionModel.from_config(cfg.diffusion.unet)
    assert module_fingerprint(other) != module_fingerprint(unet)
    prof = spec.profile((1, 1, 2), (64, 64, 96))
    k = ArtifactKey("unet", "tensorrt", "fp16", shapes=prof, extra={"tensorrt": "10.9"})
    assert k.digest != ArtifactKey("unet", "tensorrt", "fp16", shapes=prof,
                                   extra={"tensorrt": "10.13"}).digest
    assert k.digest != ArtifactKey("unet", "tensorrt", "fp16",
                                   shapes=spec.profile((1, 1, 4), (64, 64, 96)),
                                   extra={"tensorrt": "10.9"}).digest


def test_tensorrt_request_without_tensorrt_falls_back_to_eager(unet, caplog, tmp_path):
    from dreamllm_fast.export.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here: there is no fallback to observe")
    with caplog.at_level(logging.WARNING, logger="dreamllm_fast.export"):
        b = B.make_unet_backend(unet, "tensorrt", precision="fp32", cache_dir=tmp_path)
    assert b.name == "eager" and b.requested == "tensorrt"
    assert "TensorRT" in b.fallback_reason
    assert any("falling back to eager" in r.getMessage() and "TensorRT" in r.getMessage()
               for r in caplog.records)
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 48)
    with torch.no_grad():
        ref = unet(x, torch.tensor([5.0, 5.0]), encoder_hidden_states=e).sample
    assert torch.equal(b(x, 5, e), ref)
    assert not list(tmp_path.iterdir())  # no export work before the TensorRT check
    with pytest.raises(RuntimeError, match="TensorRT"):
        B.make_unet_backend(unet, "tensorrt", cache_dir=tmp_path, strict=True)


def test_compiled_request_on_cpu_falls_back_to_eager(vae, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled backend runs (tested in test_gpu.py)")
    with caplog.at_level(logging.WARNING, logger="dreamllm_fast.export"):
        b = B.make_vae_backend(vae, "compiled", precision="fp32")
    assert b.name == "eager" and "CUDA" in b.fallback_reason
    assert any("'compiled'" in r.getMessage() for r in caplog.records)


def test_unknown_kind_is_an_error(unet):
    with pytest.raises(ValueError, match="unknown backend kind"):
        B.make_unet_backend(unet, "tensorflow")


def _ddpm_cfg_image(cfg, unet_b, vae_b, steps=3, guidance=7.5):
    """The pipeline's loop in miniature: CFG over [uncond; cond], DDPM ancestral steps, decode."""
    sched = DDPMScheduler.from_config(cfg.diffusion.scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1234)
    cond = torch.randn(1, cfg.num_dream_queries, cfg.diffusion.cross_attention_dim, generator=g)
    ehs = torch.cat([torch.zeros_like(cond), cond])  # [2B, Q, C]
    lat = torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps:
        eps_u, eps_c = unet_b(torch.cat([lat, lat]), t, ehs).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        lat = sched.step(eps, t, lat, generator=g).prev_sample
    return vae_b(lat / cfg.diffusion.vae_scaling_factor)


def test_ddpm_cfg_loop_onnxruntime_matches_eager(cfg, unet, vae, ort_unet, ort_vae):
    ref = _ddpm_cfg_image(cfg, B.make_unet_backend(unet), B.make_vae_backend(vae))
    got = _ddpm_cfg_image(cfg, ort_unet, ort_vae)
    assert got.shape == (1, 3, 64, 64)
    assert _report("ddpm+cfg image", got, ref) < ONNX_ATOL


def test_cli_exports_a_valid_onnx(tmp_path):
    import argparse

    from dreamllm_fast.export.cli import add_export_arguments, run_export

    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--component", "vae", "--format", "onnx", "--out", str(tmp_path),
                              "--precision", "fp32"])
    assert run_export(args) == 0
    onnx.checker.check_model(str(tmp_path / "vae.onnx"))
    inputs = {i.name for i in onnx.load(str(tmp_path / "vae.onnx")).graph.input}
    assert inputs == {"latent"}


@pytest.mark.parametrize("argv,msg", [
    (["--component", "text_encoder"], "unknown --component 'text_encoder'"),
    (["--component", "unet", "--format", "coreml"], "unknown --format"),
    (["--component", "unet", "--precision", "int4"], "unknown --precision"),
    (["--component", "unet", "--checkpoint", "/no/such/dir"], "does not exist"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, argv, msg):
    import argparse

    from dreamllm_fast.export.cli import add_export_arguments, run_export

    args = add_export_arguments(argparse.ArgumentParser()).parse_args(
        argv + ["--out", str(tmp_path)])
    assert run_export(args) != 0
    err = capsys.readouterr().err.strip()
    assert msg in err and err.startswith("error:") and len(err.splitlines()) == 1
