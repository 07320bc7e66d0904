"""The interface the pipeline uses: one U-Net backend and one VAE backend, each with a fallback.

    unet = make_unet_backend(unet_module, "tensorrt", precision="fp16", cache_dir=...)
    eps = unet(sample, timestep, encoder_hidden_states)  # [2B,4,h,w], same device/dtype as sample
    vae = make_vae_backend(vae_module, "compiled", precision="fp16")
    image = vae(latents / scaling_factor)                 # [B,3,8h,8w] in [-1, 1]

Kinds: "eager" (the diffusers module), "compiled" (compiled.py), "onnxruntime" (ONNX export in a
keyed cache dir, CPU or CUDA execution provider; the CPU-verifiable path), "tensorrt"
(tensorrt.py), "graphs" (graphs_backend.py: fp16 channels-last modules with the fused GroupNorm,
captured in the engine's graph runner; on the CPU its stand-in re-runs each capture; the U-Net
backend's `.step_runner` captures the whole denoising step). When a kind cannot run here (TensorRT missing, no CUDA for "compiled",
onnxruntime missing, a failed build) the factory logs a warning naming the reason and returns an
eager backend; `.name` is the kind actually used and `.fallback_reason` says why. Pass
`strict=True` to raise instead. The eager module stays reachable as `.eager` for stage-by-stage
parity checks (a torch fallback per component).

Options (**opts): cfg (a DreamLLMConfig: shapes and default resolution), resolution (export
sample / profile pixels), num_queries (U-Net profile Q when no cfg; default 64), images
((min, opt, max) images of the TensorRT profile; default (1, 1, 2)), provider ("cpu" | "cuda" for
onnxruntime), opset, dynamo, compile ("torch_compile" | "aoti"), compile_mode (an Inductor
mode; default "default"), autotune (Inductor max-autotune; default False: it cost minutes per
shape at SD-2.1 size on the H100), cuda_graph, strongly_typed, optimization_level, strict;
"graphs" only: max_images (largest captured image batch; default 8), graph_backend (an engine
graph backend; default CudaGraphs on CUDA, StandInGraphs elsewhere), fuse_norms (default True).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch
from torch import nn

from .cache import ArtifactKey, DEFAULT_CACHE_DIR, module_fingerprint, write_manifest
from .components import (ComponentSpec, default_resolutions, get_spec, unet_spec_from_module,
                         vae_spec_from_module)

log = logging.getLogger(__name__)

BACKEND_KINDS = ("eager", "compiled", "onnxruntime", "tensorrt", "graphs")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (raised only with strict=True)."""


def _precision(precision, module: nn.Module) -> str:
    from dreamllm_fast.config import Precision

    if precision is None:
        p = next(iter(module.parameters()), None)
        return Precision.parse(p.dtype if p is not None else torch.float32).value
    return Precision.parse(precision).value


def _as_dtype(precision: str) -> torch.dtype:
    from dreamllm_fast.config import Precision

    return Precision.parse(precision).dtype


class _Backend:
    """A runner (positional tensors in, one tensor out) plus its contract and provenance."""

    def __init__(self, name: str, runner: Callable, spec: ComponentSpec, *, dtype: torch.dtype,
                 device: torch.device, module: nn.Module, requested: str,
                 fallback_reason: Optional[str] = None):
        self.name = name
        self.runner = runner
        self.spec = spec
        self.dtype = dtype  # compute dtype of the runner's floating inputs
        self.device = device  # where the runner wants its inputs
        self.module = module  # the caller's diffusers module, for a torch-fallback twin
        self.requested = requested
        self.fallback_reason = fallback_reason
        # kind "graphs" (U-Net): the whole captured denoising step (graphs_backend.GraphDenoiser)
        self.step_runner = getattr(runner, "denoiser", None) if name == "graphs" else None

    @property
    def max_rows(self) -> Optional[int]:
        """Most batch rows one runner call takes (a TensorRT engine's profile), or None."""
        return getattr(self.runner, "max_rows", None)

    def _run(self, *args: torch.Tensor) -> torch.Tensor:
        """Rows past `max_rows` (several images drawn together by the server) run in pieces;
        rows are independent in both the U-Net and the VAE."""
        cap, n = self.max_rows, args[0].shape[0]
        with torch.no_grad():
            if cap is None or n <= cap:
                return self.runner(*args)
            return torch.cat([self.runner(*(a[i:i + cap] for a in args)) for i in range(0, n, cap)])

    def __repr__(self):
        extra = f", fell back from {self.requested!r}: {self.fallback_reason}" \
            if self.fallback_reason else ""
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype}{extra})"


class UNetBackend(_Backend):
    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor):
        """sample [2B,4,h,w], timestep number / 0-d / [2B], encoder_hidden_states [2B,Q,C]."""
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=self.device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {n}")
        eps = self._run(sample.to(self.device, self.dtype), t.contiguous(),
                        encoder_hidden_states.to(self.device, self.dtype))
        return eps.to(sample.device, sample.dtype)


class VAEBackend(_Backend):
    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B,4,h,w] already divided by the scaling factor -> image [B,3,8h,8w] in [-1,1]."""
        image = self._run(latent.to(self.device, self.dtype))
        return image.to(latent.device, latent.dtype)


# ---------------------------------------------------------------------------------- runners


class OnnxRuntimeRunner:
    """Export once into a keyed cache dir (reused on later calls), then run in onnxruntime."""

    def __init__(self, module: nn.Module, spec: ComponentSpec, *, precision: str, cache_dir,
                 resolution: int, provider: Optional[str] = None, opset: int = 17,
                 dynamo: bool = False):
        import onnxruntime as ort

        self.ort = ort
        cuda_ok = (torch.cuda.is_available()
                   and "CUDAExecutionProvider" in ort.get_available_providers())
        provider = provider or ("cuda" if cuda_ok else "cpu")
        if provider == "cuda" and not cuda_ok:
            raise BackendUnavailable("onnxruntime's CUDAExecutionProvider is not available "
                                     f"(providers: {ort.get_available_providers()})")
        if provider == "cpu" and precision == "fp16":
            # ORT's CPU EP has fp16 kernels for few ops (Cast-wrapped, slow): run the fp32 graph.
            log.info("onnxruntime CPU provider: running the fp32 graph for an fp16 request")
            precision = "fp32"
        self.provider, self.precision, self.spec = provider, precision, spec
        self.path, self.reused = export_cached_onnx(module, spec, precision=precision,
                                                    cache_dir=cache_dir, resolution=resolution,
                                                    opset=opset, dynamo=dynamo)
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                     else ["CPUExecutionProvider"])
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        self.input_dtypes = {i.name: _ORT_TO_TORCH[i.type] for i in self.session.get_inputs()}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = {n: a.to(self.input_dtypes[n]) for n, a in zip(self.spec.input_names, args)}
        if self.provider == "cuda" and all(a.is_cuda for a in feed.values()):
            return self._run_cuda(feed)
        np_feed = {n: a.detach().cpu().contiguous().numpy() for n, a in feed.items()}
        out = self.session.run([self.spec.output_names[0]], np_feed)[0]
        return torch.from_numpy(out).to(args[0].device)

    def _run_cuda(self, feed: dict) -> torch.Tensor:
        """IOBinding on torch CUDA memory: no host round trip."""
        binding = self.session.io_binding()
        shapes = {n: tuple(a.shape) for n, a in feed.items()}
        out_name = self.spec.output_names[0]
        first = next(iter(feed.values()))
        out = torch.empty(self.spec.output_shapes(shapes)[out_name],
                          dtype=_as_dtype(self.precision), device=first.device)
        dev = first.device.index or 0
        for n, a in feed.items():
            a = a.contiguous()
            feed[n] = a  # keep alive until run returns
            binding.bind_input(n, "cuda", dev, _TORCH_TO_NP[a.dtype], list(a.shape), a.data_ptr())
        binding.bind_output(out_name, "cuda", dev, _TORCH_TO_NP[out.dtype], list(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream().synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return out


_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


class _NpTypes(dict):
    def __missing__(self, dtype):
        import numpy as np

        table = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                 torch.int32: np.int32}
        self.update(table)
        return table[dtype]


_TORCH_TO_NP = _NpTypes()


def onnx_key(module: nn.Module, spec: ComponentSpec, *, precision: str, resolution: int,
             opset: int = 17, dynamo: bool = False) -> ArtifactKey:
    """Key of an ONNX export: weights fingerprint, precision, sample shapes, opset, exporter."""
    return ArtifactKey(component=spec.name, kind="onnx", precision=precision,
                       shapes=spec.input_shapes(spec.rows_per_image, resolution),
                       extra=dict(weights=module_fingerprint(module), opset=opset,
                                  exporter="dynamo" if dynamo else "torchscript",
                                  torch=torch.__version__.split("+")[0]))


def export_cached_onnx(module: nn.Module, spec: ComponentSpec, *, precision: str, cache_dir,
                       resolution: int, opset: int = 17, dynamo: bool = False):
    """(path to model.onnx, reused?) for this module/spec/precision, exporting only on a miss."""
    from .onnx_export import export_onnx

    key = onnx_key(module, spec, precision=precision, resolution=resolution, opset=opset,
                   dynamo=dynamo)
    d = key.dir(cache_dir)
    path = d / "model.onnx"
    if (d / "manifest.json").exists() and path.exists():
        log.info("reusing ONNX export %s", path)
        return path, True
    export_onnx(module, spec, path, resolution=resolution, precision=precision, opset=opset,
                dynamo=dynamo)
    write_manifest(d, key)  # written last: its presence marks a complete export
    return path, False


class TensorRTRunner:
    """ONNX (cached) -> engine (cached) -> static buffers re-bound whenever the shapes change."""

    def __init__(self, module: nn.Module, spec: ComponentSpec, *, precision: str, cache_dir,
                 resolution: int, images=(1, 1, 2), strongly_typed: bool = True,
                 optimization_level: int = 3, use_cuda_graph: bool = True, opset: int = 17):
        from .tensorrt import build_or_load_engine, import_tensorrt

        import_tensorrt()  # TensorRTUnavailable before any export work
        if precision == "bf16":
            raise BackendUnavailable("the TensorRT path supports fp16/fp32; use precision='fp16'")
        graph_precision = precision if strongly_typed else "fp32"
        self.onnx_path, _ = export_cached_onnx(module, spec, precision=graph_precision,
                                               cache_dir=cache_dir, resolution=resolution,
                                               opset=opset)
        self.profile = spec.profile(images, default_resolutions(resolution))
        self.max_rows = images[2] * spec.rows_per_image  # the profile's largest batch
        self.engine = build_or_load_engine(spec.name, self.onnx_path, profile=self.profile,
                                           precision=precision, cache_dir=cache_dir,
                                           strongly_typed=strongly_typed,
                                           optimization_level=optimization_level)
        self.spec, self.use_cuda_graph = spec, use_cuda_graph
        self._shapes = None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.spec.input_names, args))
        shapes = {n: tuple(a.shape) for n, a in feed.items()}
        if shapes != self._shapes:
            self.engine.allocate_buffers({**shapes, **self.spec.output_shapes(shapes)})
            self._shapes = shapes
        out = self.engine.infer(feed, use_cuda_graph=self.use_cuda_graph)
        return out[self.spec.output_names[0]].clone()


# -------------------------------------------------------------------------------- factories


def _module_device(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _make(cls, module: nn.Module, spec: ComponentSpec, kind: str, *, precision, cache_dir,
          resolution: int, opts: dict):
    if kind not in BACKEND_KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; choose one of {BACKEND_KINDS}")
    strict = opts.pop("strict", False)
    precision = _precision(precision, module)
    dtype = _as_dtype(precision)
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    device = _module_device(module)
    source = module.eval()  # exporters convert their own copy: weights never pass through fp16 twice

    def torch_module() -> nn.Module:
        # Never change the caller's module: eager/compiled run a converted copy when needed.
        m = source if next(iter(source.parameters())).dtype == dtype else \
            copy.deepcopy(source).to(dtype)
        return spec.wrap(m).eval()

    def eager(reason: Optional[str] = None):
        wrapped = torch_module()
        return cls("eager", wrapped, spec, dtype=dtype, device=device, module=source,
                   requested=kind, fallback_reason=reason)

    if kind == "eager":
        return eager()
    try:
        runner, run_device = _build_runner(kind, source, torch_module, spec, precision=precision,
                                           cache_dir=cache_dir, resolution=resolution,
                                           device=device, opts=opts)
    except Exception as e:  # noqa: BLE001 - every failure falls back, with its reason logged
        from .tensorrt import EngineBuildError, TensorRTUnavailable

        expected = (BackendUnavailable, TensorRTUnavailable, EngineBuildError, ImportError)
        reason = f"{type(e).__name__}: {e}"
        if strict:
            if isinstance(e, expected):
                raise
            raise BackendUnavailable(reason) from e
        log.warning("%s backend %r unavailable for the %s (%s); falling back to eager",
                    cls.__name__, kind, spec.name, reason)
        return eager(reason)
    return cls(kind, runner, spec, dtype=dtype, device=run_device, module=source,
               requested=kind)


def _build_runner(kind, module, torch_module, spec, *, precision, cache_dir, resolution, device,
                  opts):
    if kind == "compiled":
        from .compiled import compile_module, maybe_compile_reason

        reason = maybe_compile_reason(device)
        if reason:
            raise BackendUnavailable(reason)
        return compile_module(torch_module(), component=spec.name,
                              mode=opts.get("compile", "torch_compile"),
                              compile_mode=opts.get("compile_mode"),
                              autotune=opts.get("autotune", False),
                              cuda_graph=opts.get("cuda_graph", True), cache_dir=cache_dir,
                              precision=precision), device
    if kind == "onnxruntime":
        r = OnnxRuntimeRunner(module, spec, precision=precision, cache_dir=cache_dir,
                              resolution=resolution, provider=opts.get("provider"),
                              opset=opts.get("opset", 17), dynamo=opts.get("dynamo", False))
        return r, (torch.device("cuda") if r.provider == "cuda" else torch.device("cpu"))
    if kind == "tensorrt":
        r = TensorRTRunner(module, spec, precision=precision, cache_dir=cache_dir,
                           resolution=resolution, images=opts.get("images", (1, 1, 2)),
                           strongly_typed=opts.get("strongly_typed", True),
                           optimization_level=opts.get("optimization_level", 3),
                           use_cuda_graph=opts.get("cuda_graph", True),
                           opset=opts.get("opset", 17))
        return r, torch.device("cuda")
    if kind == "graphs":
        from .graphs_backend import GraphUNetRunner, GraphVAERunner

        cls = GraphUNetRunner if spec.name == "unet" else GraphVAERunner
        return cls(module, dtype=_as_dtype(precision), device=device,
                   max_images=opts.get("max_images", 8), backend=opts.get("graph_backend"),
                   fuse_norms=opts.get("fuse_norms", True)), device
    raise ValueError(kind)


def make_unet_backend(unet: nn.Module, kind: str = "eager", *, precision=None, cache_dir=None,
                      **opts) -> UNetBackend:
    """`UNetBackend(sample, timestep, encoder_hidden_states) -> eps` of the requested kind.

    precision: "fp32" | "fp16" | "bf16" | torch dtype; None = the module's dtype.
    """
    cfg = opts.pop("cfg", None)
    if cfg is not None:
        spec = get_spec("unet", cfg)
        default_res = cfg.diffusion.default_resolution
    else:
        spec = unet_spec_from_module(unet, num_queries=opts.pop("num_queries", 64))
        default_res = int(unet.config.sample_size) * 8
    return _make(UNetBackend, unet, spec, kind, precision=precision, cache_dir=cache_dir,
                 resolution=opts.pop("resolution", default_res), opts=opts)


def make_vae_backend(vae: nn.Module, kind: str = "eager", *, precision=None, cache_dir=None,
                     **opts) -> VAEBackend:
    """`VAEBackend(latent) -> image` in [-1, 1]; latent already divided by the scaling factor."""
    cfg = opts.pop("cfg", None)
    if cfg is not None:
        spec = get_spec("vae", cfg)
        default_res = cfg.diffusion.default_resolution
    else:
        spec = vae_spec_from_module(vae)
        # SD-2.1's VAE config says 768; the engine's default image is 512 (U-Net sample_size 64 x 8).
        default_res = min(int(vae.config.sample_size), 512)
    return _make(VAEBackend, vae, spec, kind, precision=precision, cache_dir=cache_dir,
                 resolution=opts.pop("resolution", default_res), opts=opts)
