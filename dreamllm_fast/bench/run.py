"""`dreamllm-fast bench`: run the stages, writing the report after every one of them.

A run that loses a stage keeps the rest (H100, 2026-11-23: one failed baseline lost the whole
report, and with max-autotune the run did not finish in 7 minutes):

- each stage and each provider is isolated: a failure is an error row (type, message, where);
- baselines that can poison the CUDA context (torch.compile + CUDA graphs: the compile +
  StaticCache decode, the compiled U-Net/VAE) run in a child process with a timeout;
- after an in-process failure on CUDA the context is checked; if it is unusable, the remaining
  in-process stages are skipped with that reason (children still run: they get fresh contexts);
- ``report.json`` and ``report.md`` are rewritten after every stage (whole files, atomically);
- ``--budget-s`` bounds the run: stages (and isolated jobs) that would start after it are listed as
  skipped, and an isolated job's timeout never reaches past it.

This module imports no torch at import time: building the CLI parser stays cheap.
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from . import BACKENDS, GRAPH_STAGES, LLM_STAGES, QUANT_STAGES, QUANT_WEIGHTS, STAGES

DIFFUSION_BACKENDS = ("eager", "compiled", "compiled-aoti", "onnxruntime", "tensorrt", "graphs")
ISOLATED_TIMEOUT_S = 300.0  # one compile+StaticCache context compiled in ~70 s on the H100
_monotonic = time.monotonic  # the budget's clock (tests replace it)


def add_bench_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", default=None, choices=("dreamllm-7b", "tiny"),
                   help="random weights at these shapes (default: dreamllm-7b on CUDA, tiny on CPU)")
    p.add_argument("--checkpoint", default=None, help="measure a real checkpoint instead")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp16 or bf16 on CUDA (default bf16); fp32 on CPU")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                   help="model backends to compare (engine_eager: the engine without CUDA graphs, "
                        "measured on prefill, decode and dream only)")
    p.add_argument("--weights", nargs="+", default=["bf16"], choices=("bf16",) + QUANT_WEIGHTS,
                   help="add the weight-only quantized engines as providers engine-int8 / engine-fp8 "
                        f"on the {', '.join(QUANT_STAGES)} stages, beside the bf16 engine, each with "
                        "its own floor (bytes it reads per token); bf16 alone: none (default)")
    p.add_argument("--no-compile-baseline", action="store_true",
                   help="skip the torch.compile + static-cache decode baseline")
    p.add_argument("--diffusion-backends", nargs="+", default=None, choices=DIFFUSION_BACKENDS,
                   help="U-Net/VAE backends (default: eager compiled on CUDA, eager elsewhere); "
                        "all but eager run in a child process")
    p.add_argument("--autotune", action="store_true",
                   help="let Inductor max-autotune the compiled U-Net/VAE (minutes per shape; "
                        "default: Inductor's default mode)")
    p.add_argument("--contexts", nargs="+", type=int, default=None,
                   help="decode contexts (default 128 1024; 16 64 for tiny)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per decode run (default 32)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps (default 50; 2 for tiny)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole run; later stages are skipped and listed")
    p.add_argument("--isolated-timeout-s", type=float, default=ISOLATED_TIMEOUT_S,
                   help="timeout of each child-process baseline")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results/<gpu>/<date>)")
    return p


def _settings(args, device, tiny: bool):
    from .stages import BenchSettings

    s = BenchSettings(stages=tuple(args.stages))
    if tiny:  # a smoke run of the same code, not a performance claim
        s = BenchSettings(contexts=(16, 64), decode_tokens=4, prefill_text_tokens=32, t2i_steps=2,
                          interleaved_tokens=12, interleaved_images=1, stages=tuple(args.stages))
    s.contexts = tuple(args.contexts or s.contexts)
    s.decode_tokens = args.decode_tokens or s.decode_tokens
    s.t2i_steps = args.steps or s.t2i_steps
    s.unet_backends = tuple(args.diffusion_backends or (("eager", "compiled") if device.type == "cuda"
                                                         else ("eager",)))
    return s


def _cuda_problem(device):
    """None if the CUDA context still works, else what broke it."""
    import torch

    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


class _Run:
    """The report being built, written whole after every change."""

    def __init__(self, out: Path, report: dict):
        self.out, self.report = out, report

    def add(self, rows: list[dict]) -> None:
        self.report["rows"] += rows
        self.write()

    def skip(self, stage: str, reason: str, provider: str = "*") -> None:
        self.report["meta"]["skipped"].append({"stage": stage, "provider": provider, "reason": reason})
        self.add([{"stage": stage, "provider": provider, "skipped": reason}])

    def write(self, chart: bool = False) -> None:
        from .report import write_report

        write_report(self.out, self.report, chart=chart)


def run_bench(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..config import Precision
    from .harness import REPO, ceilings, env_info, gpu_dirname
    from .isolated import run_isolated
    from .models import DiffusionModels, build_models, resolve_preset
    from .report import table
    from .stages import RUNNERS, error_row, models_for

    t_start = _monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = Precision.parse(args.dtype or ("bf16" if device.type == "cuda" else "fp32")).dtype
    preset = resolve_preset(args.preset, args.checkpoint, device)
    s = _settings(args, device, tiny=preset == "tiny")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M%S")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / gpu_dirname() / date
    meta = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "preset": preset,
            "checkpoint": args.checkpoint, "smoke_run_not_a_claim": device.type != "cuda",
            "settings": {k: v for k, v in vars(s).items() if k != "extra"},
            "budget_s": args.budget_s, "autotune": args.autotune, "status": "running", "skipped": [],
            "weights": list(args.weights)}
    run = _Run(out, {"env": env_info(), "ceilings": {}, "meta": meta, "rows": []})
    run.write()
    print(f"measuring ceilings on {device} ...", flush=True)
    ceil = run.report["ceilings"] = ceilings()

    def left():
        return None if args.budget_s is None else args.budget_s - (_monotonic() - t_start)

    needs_llm = any(st in LLM_STAGES for st in s.stages)
    backends = [b for b in args.backends if b != "engine_eager" or any(st in GRAPH_STAGES for st in s.stages)]
    broken = None  # why in-process stages can no longer run
    quant_errors: list = []
    try:
        models = (build_models(backends, args.preset, args.checkpoint, device, dtype, args.weights, quant_errors)
                  if needs_llm else {"diffusion": DiffusionModels(args.preset, args.checkpoint, device, dtype)})
        run.add([error_row("setup", name, e) for name, e in quant_errors])
    except Exception as e:
        run.add([error_row("setup", ",".join(backends) if needs_llm else "diffusion", e)])
        broken, models = f"the models could not be built ({type(e).__name__})", {}
    meta["setup_s"] = _monotonic() - t_start
    spec = {"preset": None if preset == "checkpoint" else preset, "checkpoint": args.checkpoint,
            "device": str(device), "dtype": meta["dtype"], "ceilings": ceil,
            "settings": {"contexts": list(s.contexts), "decode_tokens": s.decode_tokens}}

    def isolated(job, stage, provider, options, fields=None):
        rem = left()
        if rem is not None and rem <= 0:
            return run.skip(stage, f"budget of {args.budget_s:g} s spent", provider)
        timeout = args.isolated_timeout_s if rem is None else min(args.isolated_timeout_s, rem)
        run.add(run_isolated(job, {**spec, "options": options}, stage=stage, provider=provider,
                             timeout_s=timeout, fields=fields))

    for stage in tqdm(s.stages, desc="stages"):
        rem = left()
        if rem is not None and rem <= 0:
            run.skip(stage, f"budget of {args.budget_s:g} s spent "
                            f"({_monotonic() - t_start:.0f} s elapsed before it would start)")
            continue
        if broken:
            run.skip(stage, broken)
        elif not models_for(stage, models):
            run.skip(stage, f"no selected backend runs this stage (backends: {backends})")
        else:
            try:
                rows = RUNNERS[stage](models_for(stage, models), s)
            except Exception as e:
                rows = [error_row(stage, "*", e)]
            run.add(rows)
            if any("error" in r for r in rows) and (problem := _cuda_problem(device)):
                broken = (f"the CUDA context is unusable after {stage} failed ({problem}); run the "
                          "remaining stages in a new process (--stages)")
        if stage == "decode" and not args.no_compile_baseline:
            isolated("compile_static", "decode", "compile_static", {"compile": True})
        if stage in ("unet", "vae"):
            for kind in s.unet_backends:
                if kind != "eager":
                    isolated("diffusion_backend", stage, kind,
                             {"component": stage, "kind": kind, "autotune": args.autotune,
                              "floor_ms": s.extra.get(f"{stage}_floor_ms")})
    meta["status"] = "complete"
    meta["elapsed_s"] = _monotonic() - t_start
    run.write(chart=True)
    print(table(run.report["rows"]))
    print(f"\nwrote {out}/report.json, report.md, report.png")
    return 1 if broken and not any("ms" in r for r in run.report["rows"]) else 0
