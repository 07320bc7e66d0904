"""`dreamllm-fast export`: write an ONNX graph, a TensorRT engine or an AOTInductor package.

    dreamllm-fast export --checkpoint CKPT --component unet|vae|vision \\
        --format onnx|tensorrt|aoti --out DIR [--precision fp16|fp32] [--resolution 512]

Without --checkpoint the tiny preset with random weights (seed 0) is exported, which is what the
CPU tests use. The main CLI wires `add_export_arguments` / `run_export` in as a subcommand;
`python -m dreamllm_fast.export.cli` runs it standalone.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from .components import COMPONENTS, default_resolutions, get_spec

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "aoti")


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    # component/format are validated in run_export (one clear line, not argparse's usage dump).
    parser.add_argument("--checkpoint", default=None,
                        help="DreamLLM checkpoint dir; default: tiny preset, random weights")
    parser.add_argument("--component", required=True, help=f"one of {', '.join(COMPONENTS)}")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--precision", default="fp16", help="fp16 or fp32 (default fp16)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image pixels of the export sample / profile opt "
                             "(default: the model's, 512 for SD-2.1-base)")
    parser.add_argument("--preset", default=None,
                        help="config preset (default: the checkpoint's config, else tiny)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--max-images", type=int, default=2,
                        help="TensorRT profile: most images per call (U-Net batch = 2 x this)")
    return parser


def _load_modules(args, cfg, component: str):
    import torch

    dtype = torch.float32  # exporters convert to the target precision themselves
    if component == "vision":
        from transformers import CLIPVisionModel

        if args.checkpoint:
            raise SystemExit("error: --component vision with --checkpoint needs the vision loader "
                             "(dreamllm_fast.checkpoint), not wired yet; omit --checkpoint")
        torch.manual_seed(0)
        return CLIPVisionModel(cfg.vision.to_hf()).eval()
    if args.checkpoint:
        try:
            from dreamllm_fast.modules import load_unet_vae
        except ImportError as e:
            raise SystemExit(f"error: cannot load checkpoints yet ({e}); "
                             "dreamllm_fast.modules.load_unet_vae is not available") from None
        unet, vae = load_unet_vae(args.checkpoint, dtype=dtype, device="cpu")
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(cfg.diffusion.unet).eval() \
            if component == "unet" else None
        vae = AutoencoderKL.from_config(cfg.diffusion.vae).eval() if component == "vae" else None
    return unet if component == "unet" else vae


def _validate(args) -> Optional[str]:
    if args.component not in COMPONENTS:
        return f"unknown --component {args.component!r}; choose one of {', '.join(COMPONENTS)}"
    if args.format not in FORMATS:
        return f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}"
    if args.precision not in ("fp16", "fp32"):
        return f"unknown --precision {args.precision!r}; choose fp16 or fp32"
    if args.checkpoint and not Path(args.checkpoint).exists():
        return f"--checkpoint {args.checkpoint} does not exist"
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        return f"--resolution must be a positive multiple of 8, got {args.resolution}"
    if args.max_images < 1:
        return f"--max-images must be >= 1, got {args.max_images}"
    return None


def run_export(args) -> int:
    """Run one export; returns a process exit code (errors print one line to stderr)."""
    err = _validate(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from dreamllm_fast.config import DreamLLMConfig

    try:
        cfg = _config(args, DreamLLMConfig)
    except Exception as e:  # noqa: BLE001 - bad preset / unreadable checkpoint config
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolution = args.resolution or cfg.diffusion.default_resolution
    spec = get_spec(args.component, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        module = _load_modules(args, cfg, args.component)
        path = _export(args, module, spec, cfg, out, resolution)
    except SystemExit as e:
        print(str(e), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one clear line, not a traceback, for CLI users
        log.debug("export failed", exc_info=True)
        print(f"error: {args.component} export to {args.format} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    print(path)
    return 0


def _config(args, config_cls):
    if args.preset or not args.checkpoint:
        return config_cls.from_name(args.preset or "tiny")
    try:
        from dreamllm_fast.checkpoint import load_config
    except ImportError:
        return config_cls.from_name("dreamllm-7b")
    return load_config(args.checkpoint)  # the checkpoint's own shapes (tiny or 7B)


def _export(args, module, spec, cfg, out: Path, resolution: int) -> Path:
    from .onnx_export import export_onnx

    if args.format == "tensorrt":
        from .tensorrt import import_tensorrt

        import_tensorrt()  # fail before minutes of export work
    graph_precision = args.precision
    onnx_path = out / f"{spec.name}.onnx"
    if args.format == "aoti":
        import torch

        from .compiled import AOTIRunner

        if not torch.cuda.is_available():
            raise RuntimeError("AOTInductor packages are built for the GPU; no CUDA device here")
        dtype = torch.float16 if args.precision == "fp16" else torch.float32
        wrapped = spec.wrap(module.to("cuda", dtype)).eval()
        sample = spec.sample_inputs(spec.rows_per_image, resolution, dtype=dtype, device="cuda")
        runner = AOTIRunner(wrapped, spec.name, out, args.precision)
        runner(*sample)
        return runner.package_path(sample)
    export_onnx(module, spec, onnx_path, resolution=resolution, precision=graph_precision,
                opset=args.opset)
    if args.format == "onnx":
        return onnx_path
    from .tensorrt import Engine, import_tensorrt

    trt = import_tensorrt()
    profile = spec.profile((1, 1, args.max_images), default_resolutions(resolution))
    engine = Engine(out / f"{spec.name}-{args.precision}-trt{trt.__version__}.plan")
    engine.build(onnx_path, profile=profile, precision=args.precision, strongly_typed=True,
                 timing_cache=out / "timing.cache")
    return engine.engine_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dreamllm-fast export", description=__doc__.split("\n")[0])
    add_export_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())
