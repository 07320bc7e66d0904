"""`dreamllm-fast` command line: demo, chat, t2i, generate, serve, make-tiny, convert, export,
bench, eval-ppl.

Errors the user can fix (a bad checkpoint, image, prompt or setting) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import DreamLLMError

DEFAULT_CACHE = None  # where the embedded tiny checkpoint goes; None: tiny.default_cache()


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", "-c", required=required,
                   help="checkpoint directory in the official release layout")
    add_runtime_args(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of the generator")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs (the model commands and `serve`)."""
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backend", default=None, choices=("reference", "engine"),
                   help="model backend (default: engine on CUDA, reference on CPU)")
    p.add_argument("--unet-backend", default="eager",
                   choices=("eager", "compiled", "onnxruntime", "tensorrt", "graphs"))
    p.add_argument("--vae-backend", default="eager",
                   choices=("eager", "compiled", "onnxruntime", "tensorrt", "graphs"))
    p.add_argument("--weights", default=None, choices=("bf16", "int8", "fp8"),
                   help="LLaMA linears and LM head: bf16 (unquantized), int8 or fp8 weight-only with "
                        "per-channel scales (engine backend; fp8 needs compute capability >= 8.9); "
                        "default: as the checkpoint stores them (bf16, or what convert --weights wrote)")


def _add_image_args(p: argparse.ArgumentParser, steps: int = 50) -> None:
    p.add_argument("--steps", type=int, default=steps, help="DDPM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "dpmpp-2m", "unipc"),
                   help="diffusion sampler (default ddpm, the original's; the others are "
                        "diffusers' multistep schedulers for fewer --steps, e.g. 20)")


def _pipeline(args):
    from .pipeline import DreamLLMPipeline

    return DreamLLMPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                            backend=args.backend, unet_backend=args.unet_backend,
                                            vae_backend=args.vae_backend, weights=args.weights)


def _generator(args, pipe):
    import torch

    return torch.Generator(device=pipe.model.device).manual_seed(args.seed)


def _content(text: str, images) -> list:
    return [Path(p) for p in images or []] + ([text] if text else [])


def _print_timings(timings: dict) -> None:
    print("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed)
    print(f"wrote a tiny random DreamLLM checkpoint to {out}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    written = convert_checkpoint(args.src, args.dst, weights=args.weights)
    how = "" if args.weights == "bf16" else f"; LLM linears and LM head {args.weights} with per-channel scales"
    print(f"wrote {len(written)} files to {args.dst} (weights as safetensors{how})")
    return 0


def cmd_eval_ppl(args) -> int:
    import json

    from .eval_ppl import run

    r = run(args)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['perplexity']:.4f} over {r['tokens_scored']} scored tokens of {r['tokens']} "
              f"(window {r['max_length']}, stride {r['stride']}; {r['weights']} weights, {r['dtype']} "
              f"activations on {r['device']})")
    return 0


def cmd_chat(args) -> int:
    pipe = _pipeline(args)
    msgs = [{"role": "user", "content": _content(args.prompt, args.image)}]
    for piece in pipe.chat(msgs, max_new_tokens=args.max_new_tokens, stream=True,
                           do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                           top_p=args.top_p, generator=_generator(args, pipe)):
        print(piece, end="", flush=True)
    print()
    _print_timings(pipe.last_timings)
    return 0


def cmd_t2i(args) -> int:
    pipe = _pipeline(args)
    images = pipe.text_to_image(_content(args.prompt, args.image), num_inference_steps=args.steps,
                                guidance_scale=args.guidance, negative_prompt=args.negative,
                                generator=_generator(args, pipe), sampler=args.sampler)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(out)
    print(f"wrote {out}")
    _print_timings(pipe.last_timings)
    return 0


def _write_document(doc: list, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in doc:
        if isinstance(item, str):
            print(item)
        else:
            p = out_dir / f"{stem}_{len(paths)}.png"
            item.save(p)
            paths.append(p)
            print(f"[image: {p}]")
    return paths


def cmd_generate(args) -> int:
    pipe = _pipeline(args)
    doc = pipe.generate([{"role": "user", "content": _content(args.prompt, args.image)}],
                        max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                        num_inference_steps=args.steps, guidance_scale=args.guidance,
                        negative_prompt=args.negative, generator=_generator(args, pipe),
                        sampler=args.sampler)
    _write_document(doc, Path(args.out_dir), "generated")
    _print_timings(pipe.last_timings)
    return 0


def _demo_image():
    """An embedded default input: a small synthetic scene (sky, sun, grass), made in code."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 240), (120, 170, 235))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 160, 320, 240], fill=(60, 150, 60))
    d.ellipse([230, 30, 290, 90], fill=(250, 220, 60))
    d.rectangle([60, 110, 140, 170], fill=(170, 60, 50))
    d.polygon([(50, 110), (100, 70), (150, 110)], fill=(110, 40, 30))
    return im


def cmd_demo(args) -> int:
    default_checkpoint(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = _pipeline(args)
    print(f"loaded {args.checkpoint} ({pipe.model.name} backend, {pipe.model.device}, "
          f"{str(pipe.model.dtype).replace('torch.', '')}) in {time.perf_counter() - t0:.2f} s")
    image = _demo_image()
    image.save(out / "demo_input.png")

    print("\n== chat on an image ==")
    answer = pipe.chat([{"role": "user", "content": [image, "What is in this picture?"]}],
                       max_new_tokens=args.max_new_tokens)
    print(repr(answer))
    _print_timings(pipe.last_timings)

    print("\n== text-to-image ==")
    prompt = "a red house under a yellow sun"
    img = pipe.text_to_image(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                             generator=_generator(args, pipe), sampler=args.sampler)[0]
    img.save(out / "demo_t2i.png")
    print(f"{prompt!r} -> {out / 'demo_t2i.png'} ({img.size[0]}x{img.size[1]})")
    _print_timings(pipe.last_timings)

    print("\n== interleaved answer ==")
    doc = pipe.generate([{"role": "user", "content": "Write a short illustrated story about a cat."}],
                        max_new_tokens=args.max_new_tokens, max_images=2,
                        num_inference_steps=args.steps, guidance_scale=args.guidance,
                        generator=_generator(args, pipe), sampler=args.sampler)
    paths = _write_document(doc, out, "demo_interleaved")
    print(f"({sum(isinstance(x, str) for x in doc)} text part(s), {len(paths)} image(s))")
    if not paths:
        print(f"(no <dream_start> within {args.max_new_tokens} tokens, so no image: raise --max-new-tokens)")
    _print_timings(pipe.last_timings)
    return 0


def default_checkpoint(args) -> None:
    """No --checkpoint: the embedded tiny random checkpoint (written once to the cache)."""
    from .tiny import embedded_checkpoint

    args.checkpoint = embedded_checkpoint(args.checkpoint, DEFAULT_CACHE)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dreamllm-fast",
        description="Fast, faithful inference for DreamLLM: chat with images, text-to-image, "
                    "interleaved documents.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run chat, text-to-image and an interleaved answer "
                                    "(a tiny random checkpoint when none is given)")
    _add_model_args(p, required=False)
    _add_image_args(p, steps=20)
    p.add_argument("--out-dir", default="dreamllm_demo", help="where the PNGs go")
    # The tiny checkpoint's interleaved answer is 70 tokens, <dream_start>, an image, 40 tokens,
    # </s> (112 in all): the default must reach past the image, or the demo shows no image.
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("chat", help="answer a question about images")
    _add_model_args(p)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--image", action="append", help="input image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("t2i", help="text (and images) to image")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("prompt")
    p.add_argument("--image", action="append", help="image placed before the text (in-context)")
    p.add_argument("--out", default="dreamllm.png")
    p.set_defaults(fn=cmd_t2i)

    p = sub.add_parser("generate", help="an interleaved text-and-image answer")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("prompt")
    p.add_argument("--image", action="append")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--out-dir", default="dreamllm_generate")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, images, "
                                     "interleaved answers); needs the 'serve' extra")
    from .serve_cli import add_serve_args, cmd_serve  # no serving import until `serve` runs

    add_serve_args(p)
    add_runtime_args(p)
    p.set_defaults(fn=lambda args: cmd_serve(args, default_checkpoint))

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the release layout")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_make_tiny)

    p = sub.add_parser("convert", help="copy a checkpoint with its weights as safetensors")
    p.add_argument("src")
    p.add_argument("dst", help="output directory (may equal src: safetensors are written beside)")
    p.add_argument("--weights", default="bf16", choices=("bf16", "int8", "fp8"),
                   help="write the LLaMA linears and LM head quantized (int8/fp8 with per-channel "
                        "scales; later loads use them as stored) or as they are (bf16, default)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("eval-ppl", help="perplexity of the LLM over a text file (sliding window), "
                                        "e.g. to measure what int8/fp8 weights cost")
    p.add_argument("--checkpoint", "-c", required=True, help="checkpoint directory")
    p.add_argument("--text", required=True, help="a UTF-8 text file (yours: no data set ships)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--weights", default=None, choices=("bf16", "int8", "fp8"),
                   help="LLaMA linears and LM head (default: as the checkpoint stores them)")
    p.add_argument("--max-length", type=int, default=None, help="window in tokens (default: the context)")
    p.add_argument("--stride", type=int, default=512, help="tokens between window starts (default 512)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=cmd_eval_ppl)

    from .bench.run import add_bench_arguments, run_bench

    p = sub.add_parser("bench", help="measure every stage beside its baselines and the hardware "
                                     "limit (random 7B-shape weights unless --checkpoint)")
    add_bench_arguments(p)
    p.set_defaults(fn=run_bench)

    try:
        from .export.cli import add_export_arguments, run_export
    except ImportError:
        pass
    else:
        p = sub.add_parser("export", help="export the U-Net / VAE / vision tower (ONNX, TensorRT, AOTI)")
        add_export_arguments(p)
        p.set_defaults(fn=run_export)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except DreamLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
