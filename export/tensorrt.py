"""TensorRT 10 engines from the ONNX graphs: build, cache, bind torch CUDA tensors, CUDA graphs.

Written against the TensorRT 10 Python API (imported lazily; nothing here runs without it):
`trt.Builder` -> `create_network(STRONGLY_TYPED)` -> `OnnxParser.parse_from_file` -> one
optimization profile -> `IBuilderConfig.set_timing_cache` -> `build_serialized_network`;
`Runtime.deserialize_cuda_engine` -> `create_execution_context` -> `set_input_shape` /
`set_tensor_address` -> `execute_async_v3(stream)`.

Precision: fp16 engines are built from an fp16 ONNX graph as a STRONGLY_TYPED network (types
come from the graph, as PyTorch ran them; the weak-typing `BuilderFlag.FP16` is deprecated since
TensorRT 10.12). `strongly_typed=False` builds the old way (fp32/fp16 graph + FP16 flag, TensorRT
picks per-layer precision) for comparison on the GPU. fp32 engines set no flag (TF32 allowed).

The enqueue can be captured in a torch CUDA graph: TensorRT supports capturing
`execute_async_v3` once shapes are set and one un-captured run has finished (lazy init).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from .cache import ArtifactKey, onnx_graph_sha256, write_manifest
from .components import Profile

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'dreamllm-fast[tensorrt]' (tensorrt>=10; its wheels download from "
                "NVIDIA's index, pypi.nvidia.com) on a machine with an NVIDIA GPU, or pick another "
                "backend: --format onnx / aoti, kind='compiled' or 'onnxruntime'")


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU) is missing; the message says how to get it or what to use instead."""


class EngineBuildError(RuntimeError):
    """Parsing, building or deserialising an engine failed; the message lists the remedies."""


def import_tensorrt():
    """`import tensorrt`, or TensorRTUnavailable with the remedy."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not importable ({e}); {INSTALL_HINT}") from e
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} found, need >= 10; {INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and torch sees none")
    return trt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8,
             trt.bfloat16: torch.bfloat16}
    if dt not in table:
        raise EngineBuildError(f"engine tensor dtype {dt} has no torch equivalent here")
    return table[dt]


class Engine:
    """One serialized TensorRT engine on disk and its execution context (TRT demo `Engine`)."""

    def __init__(self, engine_path):
        self.engine_path = Path(engine_path)
        self.engine = None
        self.context = None
        self.tensors: dict[str, torch.Tensor] = {}
        self._shapes: Optional[dict] = None
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._logger = None

    def _trt_logger(self, trt):
        if self._logger is None:
            self._logger = trt.Logger(trt.Logger.WARNING)
        return self._logger

    def build(self, onnx_path, *, profile: Profile, precision: str = "fp16",
              strongly_typed: bool = True, timing_cache: Optional[Path] = None,
              workspace_bytes: Optional[int] = None, optimization_level: int = 3) -> None:
        """Parse `onnx_path`, build one optimization profile, write the plan to `engine_path`."""
        trt = import_tensorrt()
        logger = self._trt_logger(trt)
        builder = trt.Builder(logger)
        flags = 0
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        # parse_from_file resolves external data (<graph>.onnx.data) next to the graph.
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(
                f"TensorRT could not parse {onnx_path}: {errors}. Remedies: re-export with "
                "`dreamllm-fast export --format onnx` (opset >= 17), check the graph with "
                "onnx.checker, or use kind='compiled'/'onnxruntime'")
        config = builder.create_builder_config()
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if not strongly_typed and precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        config.builder_optimization_level = optimization_level
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile.items():
            prof.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(prof)
        cache = None
        if timing_cache is not None:
            blob = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, False)  # ignore_mismatch=False
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log "
                "above). Remedies: raise workspace_bytes, try strongly_typed=False, lower "
                "optimization_level, or fall back to kind='compiled'")
        log.info("built TensorRT engine in %.1f s: %s", time.perf_counter() - t0, self.engine_path)
        self.engine_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.engine_path.with_suffix(".tmp")
        tmp.write_bytes(plan)  # IHostMemory exposes the buffer protocol
        tmp.replace(self.engine_path)  # atomic: a crash never leaves a half-written plan
        if cache is not None:
            Path(timing_cache).write_bytes(config.get_timing_cache().serialize())

    def load(self) -> None:
        trt = import_tensorrt()
        runtime = trt.Runtime(self._trt_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(
                f"could not deserialize {self.engine_path}: it was built by another TensorRT "
                f"version or GPU (running {trt.__version__}); delete it to rebuild")

    def activate(self, shared_device_memory: Optional[torch.Tensor] = None) -> None:
        """Create the execution context; with `shared_device_memory` (a uint8 CUDA tensor of at
        least `device_memory_size` bytes) several engines reuse one activation buffer."""
        trt = import_tensorrt()
        if shared_device_memory is None:
            self.context = self.engine.create_execution_context()
        else:
            self.context = self.engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            size = self.device_memory_size
            if shared_device_memory.numel() < size:
                raise ValueError(f"shared device memory has {shared_device_memory.numel()} bytes,"
                                 f" engine needs {size}")
            if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
                self.context.set_device_memory(shared_device_memory.data_ptr(), size)
            else:
                self.context.device_memory = shared_device_memory.data_ptr()
        if self.context is None:
            raise EngineBuildError("create_execution_context returned None (out of GPU memory?)")

    @property
    def device_memory_size(self) -> int:
        e = self.engine
        return int(getattr(e, "device_memory_size_v2", None) or e.device_memory_size)

    def io_names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def allocate_buffers(self, shape_dict: dict, device="cuda") -> None:
        """Static buffers for every I/O tensor at `shape_dict` shapes, bound to the context."""
        trt = import_tensorrt()
        self.tensors = {}
        for name in self.io_names():
            shape = tuple(shape_dict[name])
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if not self.context.set_input_shape(name, shape):
                    raise ValueError(f"{name} shape {shape} is outside the engine's optimization "
                                     f"profile {self.engine.get_tensor_profile_shape(name, 0)}; "
                                     "rebuild with a wider profile")
            buf = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, buf.data_ptr())
            self.tensors[name] = buf
        self._shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        self._graph = None  # addresses changed: any captured graph is stale

    def infer(self, feed: dict, stream: Optional[int] = None,
              use_cuda_graph: bool = False) -> dict[str, torch.Tensor]:
        """Copy `feed` into the static inputs, run, return the static output buffers (views that the
        next call overwrites: clone what you keep). `stream` is a raw cudaStream_t handle; default
        the current torch stream."""
        for name, value in feed.items():
            buf = self.tensors[name]
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{name}: got {tuple(value.shape)}, buffers are {tuple(buf.shape)};"
                                 " call allocate_buffers with the new shapes first")
            buf.copy_(value, non_blocking=True)
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        if not use_cuda_graph:
            if not self.context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            return self.tensors
        if self._graph is None:
            # One plain run first: TensorRT finishes lazy initialisation outside the capture.
            if not self.context.execute_async_v3(stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            capture_stream = torch.cuda.Stream()
            capture_stream.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=capture_stream):
                    self.context.execute_async_v3(capture_stream.cuda_stream)
            except RuntimeError as e:
                raise RuntimeError(f"capturing the TensorRT enqueue in a CUDA graph failed ({e});"
                                   " run with use_cuda_graph=False") from e
            torch.cuda.current_stream().wait_stream(capture_stream)
            self._graph = graph
        self._graph.replay()
        return self.tensors


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} sm{p.major}{p.minor}"


def engine_key(component: str, onnx_path, *, precision: str, profile: Profile,
               strongly_typed: bool, optimization_level: int) -> ArtifactKey:
    """Cache key: sha256 of the ONNX graph, TensorRT version, GPU name, precision, profile shapes."""
    trt = import_tensorrt()
    return ArtifactKey(component=component, kind="tensorrt", precision=precision,
                       shapes={k: list(map(list, v)) for k, v in profile.items()},
                       extra=dict(onnx_sha256=onnx_graph_sha256(onnx_path),
                                  tensorrt=trt.__version__, gpu=gpu_name(),
                                  strongly_typed=strongly_typed, opt_level=optimization_level))


def build_or_load_engine(component: str, onnx_path, *, profile: Profile, precision: str,
                         cache_dir, strongly_typed: bool = True, optimization_level: int = 3,
                         workspace_bytes: Optional[int] = None) -> Engine:
    """The cached engine for this graph/profile/precision on this GPU and TensorRT, built if absent.

    The timing cache is shared by all engines on one GPU + TensorRT version (it only holds tactic
    timings), so a rebuild after a profile change reuses the measured tactics.
    """
    trt = import_tensorrt()
    key = engine_key(component, onnx_path, precision=precision, profile=profile,
                     strongly_typed=strongly_typed, optimization_level=optimization_level)
    d = key.dir(cache_dir)
    engine = Engine(d / "engine.plan")
    if not engine.engine_path.exists():
        d.mkdir(parents=True, exist_ok=True)
        timing = Path(cache_dir) / f"timing-{gpu_name().replace(' ', '_')}-trt{trt.__version__}.cache"
        engine.build(onnx_path, profile=profile, precision=precision,
                     strongly_typed=strongly_typed, timing_cache=timing,
                     workspace_bytes=workspace_bytes, optimization_level=optimization_level)
        write_manifest(d, key, onnx=str(onnx_path))
    else:
        log.info("reusing TensorRT engine %s", engine.engine_path)
    engine.load()
    engine.activate()
    return engine
