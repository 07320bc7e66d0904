"""Tools to run the engine on FAKE CUDA tensors (no GPU, no driver) and check its captured steps.

Under `FakeTensorMode`, torch's CUDA build runs every op on "cuda" tensors for shapes, dtypes and
devices only: no data, no kernels. `devtools/check7b.py` builds the released 7B engine that way; the
pieces it uses live here:

- `NoHostSync`: a dispatch mode (plus patched sync entry points) that fails inside a captured step
  on a host sync, a CPU tensor or a data-dependent op (`HostSyncError`);
- `LiveBytes`: live CUDA storage bytes and their peak, fake tensors included;
- `NoLaunch`: a stand-in for `torch.library.wrap_triton` that counts Triton launches and skips them;
  `OpCount` / `count_launches`: kernel launches of one step;
- `fake_checkpoint`: a `Checkpoint` of uninitialized CPU tensors at any config's shapes.

Triton must run compiled (TRITON_INTERPRET unset): the interpreter would read the fake data.
"""
from __future__ import annotations

import contextlib
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class HostSyncError(RuntimeError):
    """A captured step did host work: a sync, a read of device data, or a CPU tensor."""


_aten = torch.ops.aten
_SYNC_OPS = {_aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default,
             _aten.equal.default}
_BAD_TAGS = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}
if hasattr(torch.Tag, "cudagraph_unsafe"):
    _BAD_TAGS.add(torch.Tag.cudagraph_unsafe)


class NoHostSync(TorchDispatchMode):
    """Fails on anything inside a captured step that a CUDA graph cannot hold.

    - ops that read device data on the host (`.item()`, `bool(t)`, `torch.equal`) or whose output
      shape depends on data (`nonzero`, `masked_select`, ...): a sync, and a capture error;
    - any tensor argument or result on another device than `device` (a CPU tensor: a host->device
      copy, or a 0-dim CPU scalar whose value a graph would bake in);
    - `torch.cuda.synchronize`, stream/event syncs, and `Tensor.item/tolist/cpu/numpy`, patched for
      the duration (they fail with this error before reaching a fake tensor's own complaint).
    """

    def __init__(self, device, what: str = "the captured step"):
        super().__init__()
        self.device = torch.device(device)
        self.what = what
        self._patches = contextlib.ExitStack()

    def _fail(self, msg: str):
        raise HostSyncError(f"{self.what}: {msg}; a CUDA graph cannot capture it (keep host work out "
                            f"of the step: positions, lengths and ids are device tensors)")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS or _BAD_TAGS.intersection(func.tags):
            self._fail(f"{func} reads device data on the host or has a data-dependent shape")
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self._fail(f"{func} takes a tensor on {t.device} (shape {list(t.shape)})")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self._fail(f"{func} makes a tensor on {t.device}")
        return out

    def __enter__(self):
        def refuse(name):
            def fn(*a, **k):
                self._fail(f"{name}() called")
            return fn

        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                            (torch.cuda.Event, "synchronize"), (torch.Tensor, "item"),
                            (torch.Tensor, "tolist"), (torch.Tensor, "cpu"), (torch.Tensor, "numpy")):
            self._patches.enter_context(patched(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}")))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()


@contextlib.contextmanager
def patched(owner, name, value):
    """Temporarily set `owner.name = value`."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


class NoLaunch:
    """Stand-in for `torch.library.wrap_triton` in a fake run: the launch body's Python (argument
    checks, grid and config choice) runs, the kernel does not; launches are counted.

    Under FakeTensorMode the real wrap_triton only routes to a higher-order op whose fake
    implementation does nothing, at ~3x the cost of the whole fake forward (measured on the CI CPU).
    """

    count = 0

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            NoLaunch.count += 1
        return launch


class OpCount(TorchDispatchMode):
    """Counts the aten ops that launch a kernel: not views, not allocations, not metadata queries
    (the engine's own Triton kernels are counted by `NoLaunch`)."""

    _FREE = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default}

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view and func not in self._FREE:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_launches(step) -> dict:
    """Kernel launches of one run of `step`: Triton kernels + aten compute ops (GEMMs, casts)."""
    n0, ops = NoLaunch.count, OpCount()
    with ops:
        step()
    return {"triton": NoLaunch.count - n0, "aten": ops.ops, "total": NoLaunch.count - n0 + ops.ops}


class LiveBytes(TorchDispatchMode):
    """Live bytes of `device_type` storages made by ops under this mode (fake tensors included).

    Each new storage is counted once when an op first returns it and released by a weakref callback
    when it dies (torch keeps one Python object per live storage). `peak` since `reset_peak()`.
    """

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._seen:
                    self._seen[key] = n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key)
        return out


def fake_checkpoint(config, dtype=torch.bfloat16):
    """A `Checkpoint` of uninitialized CPU tensors with the released layout's names and shapes
    (under FakeTensorMode: fake tensors, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModel

    from ..checkpoint import Checkpoint, _meta_shapes, llm_expected_shapes

    def e(shape):
        return torch.empty(shape, dtype=dtype)

    H, C, Hc = config.llm.hidden_size, config.diffusion.cross_attention_dim, config.vision.hidden_size
    return Checkpoint(
        path=Path("<fake>"), config=config,
        llm={k: e(s) for k, s in llm_expected_shapes(config.llm).items()},
        clip={k: e(s) for k, s in _meta_shapes(lambda: CLIPVisionModel(config.vision.to_hf())).items()
              if not k.endswith("position_ids")},
        clip_proj_weight=e((H, Hc)), clip_proj_bias=e((H,)),
        dream_queries=e((config.num_dream_queries, H)), cond_proj_weight=e((C, H)),
        unet={k: e(s) for k, s in _meta_shapes(lambda: UNet2DConditionModel.from_config(config.diffusion.unet)).items()},
        vae={k: e(s) for k, s in _meta_shapes(lambda: AutoencoderKL.from_config(config.diffusion.vae)).items()},
    )


def released_special_tokens():
    """The released 7B tokenizer's ids (its added_tokens.json); the fake run has no tokenizer files."""
    from ..config import SpecialTokens

    return SpecialTokens(bos=1, eos=2, unk=0, pad=32000, im_start=32001, im_end=32005, im_patch=32004,
                         dream_start=32003, dream_end=32002, image=32006, dream=32007)
