"""The compiled fallback: torch.compile (+ a manual CUDA graph) or torch.export + AOTInductor.

Two selectable modes for the U-Net and the VAE; which is faster is decided on the GPU by
benchmarks/bench_unet.py, and the default is torch.compile:

- "torch_compile": `torch.compile(mode=<Inductor mode>, fullgraph=True, dynamic=False)` wrapped in
  `CUDAGraphWrapper`. Our own graph (not Inductor's cudagraph trees) because its outputs are
  cloned as they leave the graph, so callers may keep eps across steps without
  `cudagraph_mark_step_begin`; the warm-up calls (compile, any autotuning) run before capture
  (a capture must not record trial launches). An Inductor mode with its own graphs
  ("reduce-overhead", "max-autotune") skips ours.
- "aoti": `torch.export.export` at the call's exact shapes -> `aoti_compile_and_package` ->
  `aoti_load_package`, one package per input signature, cached on disk (no recompilation in a new
  process), also replayed through `CUDAGraphWrapper`.

No autotuning unless asked (`autotune=True`, or an explicit max-autotune `compile_mode`): on the
H100 (2026-11-23) max-autotune of the SD-2.1 U-Net took most of a 7-minute bench run and pushed
a 512x512 compile test past 45 s (AOTI) and to 37.6 s (torch.compile). Inductor's default mode
compiles in a fraction of that; whether autotuning pays is the bench's question (`--autotune`).

Both need CUDA: Inductor's CPU path needs a C++ toolchain and is not a target of this engine.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .cache import ArtifactKey, module_fingerprint, write_manifest

log = logging.getLogger(__name__)

COMPILE_MODES = ("torch_compile", "aoti")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPHING_MODES = ("reduce-overhead", "max-autotune")  # Inductor captures CUDA graphs itself


def inductor_settings(mode: str = "torch_compile", compile_mode: Optional[str] = None,
                      autotune: bool = False, cuda_graph: bool = True) -> dict:
    """What the compiler is asked for: {compile_mode, autotune, own_graph, inductor_graphs,
    aoti_configs}. compile_mode None = "default", or "max-autotune-no-cudagraphs" with autotune."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    if compile_mode is None:
        compile_mode = "max-autotune-no-cudagraphs" if autotune else "default"
    if compile_mode not in INDUCTOR_MODES:
        raise ValueError(f"unknown Inductor mode {compile_mode!r}; choose one of {INDUCTOR_MODES}")
    autotune = autotune or compile_mode.startswith("max-autotune")
    inductor_graphs = mode == "torch_compile" and compile_mode in _GRAPHING_MODES
    return {"compile_mode": compile_mode, "autotune": autotune,
            "own_graph": cuda_graph and not inductor_graphs, "inductor_graphs": inductor_graphs,
            "aoti_configs": {"max_autotune": autotune}}


class CUDAGraphWrapper:
    """Capture `fn(*inputs)` once per input signature (shapes, dtypes) and replay it.

    Inputs are copied into static buffers; outputs are cloned when they leave the graph. All
    graphs share one memory pool. Two warm-up runs on a side stream precede each capture (the
    first triggers compilation/autotuning, the second runs the steady-state code path).
    """

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def _capture(self, args):
        static = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA-graph capture failed ({e}). Remedies: make_*_backend(..., "
                "cuda_graph=False), or compile_mode='max-autotune' (Inductor's own graphs)") from e
        if self.pool is None:
            self.pool = graph.pool()
        return graph, static, out

    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out.clone()


def _signature(args) -> list:
    return [[list(a.shape), str(a.dtype)] for a in args]


class AOTIRunner:
    """One AOTInductor package per input signature, compiled on first use, cached on disk."""

    def __init__(self, module: nn.Module, component: str, cache_dir, precision: str,
                 inductor_configs: Optional[dict] = None):
        self.module = module
        self.inductor_configs = dict(inductor_configs or {})
        self.component = component
        self.cache_dir = cache_dir
        self.precision = precision
        self.fingerprint = module_fingerprint(module)
        self.runners: dict[tuple, Callable] = {}

    def package_path(self, args) -> Path:
        from .tensorrt import gpu_name

        key = ArtifactKey(component=self.component, kind="aoti", precision=self.precision,
                          shapes=_signature(args),
                          extra=dict(weights=self.fingerprint, torch=torch.__version__,
                                     gpu=gpu_name(), inductor=self.inductor_configs))
        d = key.dir(self.cache_dir)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "manifest.json").exists():
            write_manifest(d, key)
        return d / "model.pt2"

    def __call__(self, *args):
        sig = tuple((tuple(a.shape), a.dtype) for a in args)
        if sig not in self.runners:
            path = self.package_path(args)
            if not path.exists():
                with torch.no_grad():
                    ep = torch.export.export(self.module, tuple(args), strict=False)
                    torch._inductor.aoti_compile_and_package(
                        ep, package_path=str(path),
                        inductor_configs=self.inductor_configs)
                log.info("AOTInductor package written: %s", path)
            self.runners[sig] = torch._inductor.aoti_load_package(str(path))
        return self.runners[sig](*args)


def compile_module(module: nn.Module, *, component: str, mode: str = "torch_compile",
                   compile_mode: Optional[str] = None, autotune: bool = False,
                   cuda_graph: bool = True, cache_dir=None, precision: str = "fp16") -> Callable:
    """A callable with `module`'s positional signature (module = an export wrapper from
    components.py), compiled per `mode` and `inductor_settings`. Raises RuntimeError when CUDA is
    unavailable."""
    st = inductor_settings(mode, compile_mode, autotune, cuda_graph)
    if not torch.cuda.is_available():
        raise RuntimeError("the compiled backend needs a CUDA GPU (Inductor's CPU path is not a "
                           "target here)")
    module = module.eval()
    if mode == "torch_compile":
        fn: Callable = torch.compile(module, mode=st["compile_mode"], fullgraph=True, dynamic=False)
    else:
        fn = AOTIRunner(module, component, cache_dir, precision, inductor_configs=st["aoti_configs"])
    if st["own_graph"]:
        return CUDAGraphWrapper(fn)
    if st["inductor_graphs"]:
        return _InductorGraphs(fn)
    return fn


class _InductorGraphs:
    """Inductor cudagraph trees reuse output memory on the next replay: mark steps, clone out."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return self.fn(*args).clone()


def maybe_compile_reason(device: Optional[torch.device]) -> Optional[str]:
    """Why the compiled backend cannot run for a module on `device`, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if device is not None and torch.device(device).type != "cuda":
        return f"the module is on {device}, not on a CUDA device"
    return None
