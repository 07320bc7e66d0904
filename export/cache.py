"""Artifact cache keys shared by ONNX exports and TensorRT engines.

An artifact lives in `<cache_dir>/<component>-<key>/` where `key` is the first 16 hex digits of
the sha256 of a canonical JSON of everything that changes the bytes of the artifact:

- ONNX graphs: component, weights fingerprint, precision, opset, exporter, torch version and the
  export sample shape.
- TensorRT engines: sha256 of the ONNX graph (proto and external data), TensorRT version, GPU
  name, precision and the optimization profile shapes (an engine is only valid for those).

The weights fingerprint (`module_fingerprint`) hashes the class and config, every parameter's
name/shape/dtype and a strided sample of up to 256 values per tensor instead of all 866 M U-Net
weights: hashing the whole fp16 U-Net (1.7 GB) through the host costs seconds on every pipeline
start, while a different checkpoint differs in every sampled tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

DEFAULT_CACHE_DIR = Path(os.environ.get("DREAMLLM_FAST_CACHE",
                                        Path.home() / ".cache" / "dreamllm_fast" / "export"))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ArtifactKey:
    """Frozen description of one artifact; `digest` names its folder."""

    component: str
    kind: str  # "onnx" | "tensorrt" | "aoti"
    precision: str
    shapes: Any  # export sample shapes or the optimization profile
    extra: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return hash_json(asdict(self))[:16]

    def dir(self, cache_dir: Optional[os.PathLike] = None) -> Path:
        return Path(cache_dir or DEFAULT_CACHE_DIR) / f"{self.component}-{self.kind}-{self.digest}"


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module, samples_per_tensor: int = 256) -> str:
    """Cheap, deterministic identity of a module's weights (see the module docstring)."""
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
        h.update(hash_json(cfg).encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // samples_per_tensor)
        h.update(flat[::step][:samples_per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_graph_sha256(onnx_path: os.PathLike) -> str:
    """sha256 of an ONNX graph and its external-data files, memoised in `<path>.sha256`.

    The sidecar is trusted while the files' sizes and mtimes are unchanged, so a 3.4 GB fp32 U-Net
    is hashed once, not on every engine lookup.
    """
    onnx_path = Path(onnx_path)
    files = [onnx_path] + sorted(p for p in onnx_path.parent.glob(onnx_path.name + ".data*"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    sidecar = onnx_path.with_name(onnx_path.name + ".sha256")
    if sidecar.exists():
        try:
            rec = json.loads(sidecar.read_text())
            if rec.get("stamp") == [list(s) for s in stamp]:
                return rec["sha256"]
        except (ValueError, KeyError):
            pass
    h = hashlib.sha256()
    for p in files:
        h.update(file_sha256(p).encode())
    digest = h.hexdigest()
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # read-only cache: hash again next time
    return digest


def write_manifest(directory: Path, key: ArtifactKey, **info) -> None:
    """`manifest.json` next to an artifact: the full key, for humans and for debugging cache misses."""
    (directory / "manifest.json").write_text(
        json.dumps(_canonical({"key": asdict(key), "digest": key.digest, **info}), indent=2))
