"""The `graphs` U-Net/VAE backend: the engine's own graph runner over prepared diffusers modules.

    unet = make_unet_backend(unet_module, "graphs", precision="fp16")
    eps = unet(sample, t, context)        # one replay of the captured U-Net at a padded bucket
    unet.step_runner.step(jobs)           # one replay of the WHOLE denoising step (see below)
    vae = make_vae_backend(vae_module, "graphs", precision="fp16")

Preparation (`prepare_module`): a copy of the module in the requested precision, channels-last,
attention through torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, which picks
the flash kernel for fp16 on a GPU), and every GroupNorm(+SiLU) pair swapped for the fused Triton
kernel (export/fused_norm.py).

Graphs go through the engine's graph backends (dreamllm_fast/engine/graphs.py): `CudaGraphs` on
CUDA (one memory pool for every graph of the backend), `StandInGraphs` elsewhere, which re-runs the
captured function at each replay so the capture/replay bookkeeping runs on the CPU and on fake
CUDA tensors. Buckets: batch rows are padded up to the next capture size (powers of two up to
`max_images` images), padding rows hold zeros; outputs are cloned out of graph memory.

`GraphDenoiser` captures the whole classifier-free-guided DDPM step per image-batch bucket: the
U-Net on [uncond; cond], the guidance combine, the DDPMScheduler update from a per-image
coefficient table on the device (each image has its own timesteps, step index and guidance scale,
so the server's images at different steps share one replay) and the variance noise drawn on the
device from each image's own generator (one graph-registered generator per slot, loaded with the
request generator's state when the image enters the slot and written back when it leaves). A
50-step image is 50 replays; between replays the host only counts. What it does not take (another
sampler, no guidance, several images in one job, a generator on another device, a timestep 0)
goes through `UNetBackend`'s captured U-Net call and the eager scheduler step instead (`reason`).
"""
from __future__ import annotations

import bisect
import copy
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .fused_norm import swap_group_norms


def default_graph_backend(device: torch.device):
    from dreamllm_fast.engine.graphs import CudaGraphs, StandInGraphs

    return CudaGraphs(device) if device.type == "cuda" and torch.cuda.is_available() else StandInGraphs()


def prepare_module(module: nn.Module, dtype: torch.dtype, fuse_norms: bool = True) -> nn.Module:
    """A copy of a diffusers U-Net / VAE for graph capture (see the module docstring)."""
    m = copy.deepcopy(module).eval()
    _convert(m, dtype)
    if hasattr(m, "set_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        m.set_attn_processor(AttnProcessor2_0())
    if fuse_norms:
        swap_group_norms(m)
    return m


def _convert(module: nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype).to(memory_format=channels_last)` by assignment: floating parameters and
    buffers in `dtype`, 4-D ones channels-last. (`Module.to` cannot swap the parameters of a
    module on fake CUDA tensors, export/check_graphs.py; assignment can.)"""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is None:
                    continue
                new = t.to(dtype) if t.is_floating_point() else t
                if new.dim() == 4:
                    new = new.contiguous(memory_format=torch.channels_last)
                if new is not t:
                    table[name] = nn.Parameter(new, requires_grad=False) if table is m._parameters else new


def bucket_sizes(max_rows: int) -> list[int]:
    out, n = [], 1
    while n < max_rows:
        out.append(n)
        n *= 2
    return out + [max_rows]


class StaticGraphs:
    """`fn(*static_inputs)` captured per padded row count and input shape; calls copy into the
    static inputs, replay, and return a clone of the output's valid rows."""

    def __init__(self, fn: Callable, backend, max_rows: int, pad_values: Sequence[float] = ()):
        self.fn, self.backend, self.max_rows = fn, backend, max_rows
        self.sizes = bucket_sizes(max_rows)
        self.pad_values = tuple(pad_values)
        self.graphs: dict = {}  # (rows, shapes) -> (graph, static inputs, output)

    def _key(self, rows: int, args) -> tuple:
        return (rows,) + tuple((tuple(a.shape[1:]), a.dtype, a.device) for a in args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        n = args[0].shape[0]
        if n > self.max_rows:  # _Backend._run splits by max_rows first; a direct call may not
            raise ValueError(f"{n} rows over the captured maximum of {self.max_rows}")
        rows = self.sizes[bisect.bisect_left(self.sizes, n)]
        key = self._key(rows, args)
        entry = self.graphs.get(key)
        if entry is None:
            static = [torch.zeros((rows,) + tuple(a.shape[1:]), dtype=a.dtype, device=a.device)
                      for a in args]
            for s, a in zip(static, args):
                s[:n].copy_(a)

            def step(static=static):
                return self.fn(*static)

            self.backend.warmup(step)
            graph, out = self.backend.capture(step)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for i, (s, a) in enumerate(zip(static, args)):
            s[:n].copy_(a)
            if rows > n:
                s[n:].fill_(self.pad_values[i] if i < len(self.pad_values) else 0)
        self.backend.replay(graph)
        return out[:n].clone()

    @property
    def max_rows_per_call(self) -> int:
        return self.max_rows


class GraphUNetRunner:
    """The UNetBackend runner of kind "graphs": (sample [R,4,h,w], t [R], ctx [R,Q,C]) -> eps."""

    def __init__(self, module: nn.Module, *, dtype, device, max_images: int = 8, backend=None,
                 fuse_norms: bool = True):
        self.module = prepare_module(module, dtype, fuse_norms)
        self.backend = backend or default_graph_backend(device)
        self.max_rows = 2 * max_images

        def unet(sample, t, ctx):
            x = sample.contiguous(memory_format=torch.channels_last)
            return self.module(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

        self.graphs = StaticGraphs(unet, self.backend, self.max_rows)
        self.denoiser = GraphDenoiser(self.module, self.backend, dtype=dtype, device=device,
                                      max_images=max_images)

    def __call__(self, sample, t, ctx):
        return self.graphs(sample, t, ctx)


class GraphVAERunner:
    """The VAEBackend runner of kind "graphs": latent [B,4,h,w] -> image [B,3,8h,8w]."""

    def __init__(self, module: nn.Module, *, dtype, device, max_images: int = 8, backend=None,
                 fuse_norms: bool = True):
        self.module = prepare_module(module, dtype, fuse_norms)
        self.backend = backend or default_graph_backend(device)
        self.max_rows = max_images

        def decode(z):
            z = z.contiguous(memory_format=torch.channels_last)
            return self.module.decode(z, return_dict=False)[0]

        self.graphs = StaticGraphs(decode, self.backend, self.max_rows)

    def __call__(self, z):
        return self.graphs(z)


# ---------------------------------------------------------------------------- the whole step

_COLS = 6  # t, sqrt(1 - abar_t), sqrt(abar_t), coefficient of x0, coefficient of x_t, noise std


def ddpm_table(scheduler) -> torch.Tensor:
    """[steps, 6] fp32: per step of `scheduler` (DDPMScheduler after set_timesteps) the timestep
    and the coefficients of its `step` (epsilon prediction, fixed_small variance), computed from
    the scheduler's own alphas_cumprod and previous_timestep as DDPMScheduler.step does."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # host arithmetic on the scheduler's CPU tables, fake run or not
        return _ddpm_rows(scheduler)


def _ddpm_rows(scheduler) -> torch.Tensor:
    rows = []
    for t in [int(x) for x in scheduler.timesteps.tolist()]:
        prev_t = int(scheduler.previous_timestep(t))
        a_t = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0 else float(scheduler.one)
        beta_t, beta_prev = 1.0 - a_t, 1.0 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        c0 = a_prev ** 0.5 * cur_beta / beta_t
        ct = cur_alpha ** 0.5 * beta_prev / beta_t
        var = max(beta_prev / beta_t * cur_beta, 1e-20)
        rows.append((float(t), beta_t ** 0.5, a_t ** 0.5, c0, ct, var ** 0.5 if t > 0 else 0.0))
    return torch.tensor(rows, dtype=torch.float64).float()


class _StepSet:
    """Static buffers of the whole step for one latent and context shape, `cap` image slots."""

    def __init__(self, cap: int, latent_shape, ctx_shape, steps_max: int, dtype, device,
                 make_generator: Callable):
        d = dict(device=device)
        self.lat = torch.zeros((cap,) + tuple(latent_shape), dtype=dtype, **d)
        self.ctx_u = torch.zeros((cap,) + tuple(ctx_shape), dtype=dtype, **d)
        self.ctx_c = torch.zeros((cap,) + tuple(ctx_shape), dtype=dtype, **d)
        self.gs = torch.zeros(cap, dtype=torch.float32, **d)
        self.idx = torch.zeros(cap, dtype=torch.int64, **d)
        self.table = torch.zeros(cap, steps_max, _COLS, dtype=torch.float32, **d)
        self.table[:, :, 2] = 1.0  # padding slots: sqrt(abar) = 1, every other coefficient 0
        self.arange = torch.arange(cap, **d)
        self.gens = [make_generator(device) for _ in range(cap)]
        self.graphs: dict = {}  # bucket -> (graph, output)


class GraphDenoiser:
    """The whole CFG + DDPM step captured per image-batch bucket (see the module docstring).

    `reason(jobs)` is None when `step(jobs)` can take them, else why not; `step(jobs)` advances
    each job one step exactly like `diffusion.denoise_step` (each image's own noise stream).
    """

    def __init__(self, unet: nn.Module, backend, *, dtype, device, max_images: int = 8,
                 make_generator: Optional[Callable] = None):
        """make_generator(device) -> a slot's generator (default torch.Generator(device)); the
        fake-CUDA check passes one returning None (no driver, no CUDA generator): the slots then
        draw from the global RNG and no state is copied."""
        self.unet, self.backend = unet, backend
        self.make_generator = make_generator or (lambda d: torch.Generator(device=d))
        self.dtype, self.device = dtype, torch.device(device)
        self.sizes = bucket_sizes(max_images)
        self.max_images = max_images
        self.sets: dict = {}
        self._resident: Optional[tuple] = None  # (set key, jobs in slot order, their latents views)
        self._tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.replays = 0

    def reason(self, jobs) -> Optional[str]:
        if not jobs or len(jobs) > self.max_images:
            return f"{len(jobs)} images (the captured buckets hold 1 to {self.max_images})"
        shapes = {(tuple(j.latents.shape), tuple(j.context.shape[1:])) for j in jobs}
        if len(shapes) != 1:
            return "images of different sizes"
        for j in jobs:
            s, cfg = j.scheduler, j.scheduler.config
            if j.sampler != "ddpm":
                return f"sampler {j.sampler!r} (the whole-step graph is DDPM's)"
            if not j.do_cfg:
                return "no classifier-free guidance"
            if j.latents.shape[0] != 1:
                return "several images in one job"
            if j.generator is not None and torch.device(j.generator.device).type != self.device.type:
                return f"a generator on {j.generator.device} for latents on {self.device}"
            if j.latents.device.type != self.device.type:
                return f"latents on {j.latents.device}, the graphs on {self.device}"
            if (cfg.prediction_type, cfg.variance_type, cfg.clip_sample, cfg.thresholding) != \
                    ("epsilon", "fixed_small", False, False):
                return "a DDPM configuration other than SD's (epsilon, fixed_small, no clipping)"
            if 0 in j.host_timesteps:
                return "a schedule reaching timestep 0 (DDPM draws no noise there)"
            if len(j.host_timesteps) > s.config.num_train_timesteps:
                return "more steps than training timesteps"
        return None

    def _table(self, job) -> torch.Tensor:
        t = self._tables.get(job)
        if t is None:
            t = self._tables[job] = ddpm_table(job.scheduler).to(self.device)
        return t

    def _set(self, job) -> tuple:
        key = (tuple(job.latents.shape[1:]), tuple(job.context.shape[1:]))
        if key not in self.sets:
            self.sets[key] = _StepSet(self.sizes[-1], key[0], key[1],
                                      job.scheduler.config.num_train_timesteps, self.dtype, self.device,
                                      self.make_generator)
        return key, self.sets[key]

    def _step_fn(self, S: _StepSet, b: int):
        c, h, w = S.lat.shape[1:]

        def step():
            x = S.lat[:b]
            # [b, 6]: each image at its own step (index_select: advanced indexing is flagged
            # data-dependent by the fake-CUDA check, export/check_graphs.py)
            coef = S.table.view(-1, _COLS).index_select(0, S.arange[:b] * S.table.shape[1] + S.idx[:b])
            t = coef[:, 0]
            sample = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)
            ctx = torch.cat([S.ctx_u[:b], S.ctx_c[:b]])
            eps = self.unet(sample, torch.cat([t, t]), encoder_hidden_states=ctx, return_dict=False)[0]
            eps_u, eps_c = eps.float().chunk(2)
            k = [coef[:, i].view(b, 1, 1, 1) for i in range(1, _COLS)]
            eps = eps_u + S.gs[:b].view(b, 1, 1, 1) * (eps_c - eps_u)
            xf = x.float()
            x0 = (xf - k[0] * eps) / k[1]
            prev = k[2] * x0 + k[3] * xf
            noise = torch.cat([torch.randn((1, c, h, w), generator=S.gens[r], device=x.device,
                                           dtype=x.dtype) for r in range(b)])
            S.lat[:b].copy_(prev + k[4] * noise.float())
            S.idx[:b].add_(1)
            return S.lat[:b]

        return step

    def _capture(self, S: _StepSet, b: int) -> None:
        """Warm-up and capture leave the slots as they found them (latents, indices, generators)."""
        saved = (S.lat.clone(), S.idx.clone(), [g.get_state() for g in S.gens if g is not None])
        fn = self._step_fn(S, b)
        self.backend.warmup(fn)
        S.lat.copy_(saved[0])
        S.idx.copy_(saved[1])
        for g, st in zip([g for g in S.gens if g is not None], saved[2]):
            g.set_state(st)
        S.graphs[b] = self.backend.capture(fn, generators=[g for g in S.gens[:b] if g is not None])
        S.lat.copy_(saved[0])
        S.idx.copy_(saved[1])
        for g, st in zip([g for g in S.gens if g is not None], saved[2]):
            g.set_state(st)

    def _flush(self) -> None:
        """Hand the resident jobs their latents and generator states back."""
        if self._resident is None:
            return
        key, jobs, views = self._resident
        S = self.sets[key]
        for r, (j, v) in enumerate(zip(jobs, views)):
            if j.latents is not v:  # stepped elsewhere since: its own state is newer
                continue
            j.latents = S.lat[r:r + 1].clone()
            if j.generator is not None and S.gens[r] is not None:
                j.generator.set_state(S.gens[r].get_state())
        self._resident = None

    def _load(self, key, S: _StepSet, jobs, b: int) -> None:
        self._flush()
        for r, j in enumerate(jobs):
            S.lat[r].copy_(j.latents[0])
            S.ctx_u[r].copy_(j.context[0])
            S.ctx_c[r].copy_(j.context[1])
            S.gs[r].fill_(float(j.guidance_scale))
            table = self._table(j)
            S.table[r, :table.shape[0]].copy_(table)
            S.idx[r].fill_(j.index)
            gen = j.generator
            if S.gens[r] is None:
                continue
            if gen is None:  # eager draws from the global RNG: seed the slot from it
                gen = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, ())))
            S.gens[r].set_state(gen.get_state())
        for r in range(len(jobs), b):  # padding: zero latents, step 0 of a harmless table
            S.lat[r].zero_()
            S.idx[r].zero_()
            S.gs[r].zero_()
        self._resident = (key, list(jobs), [j.latents for j in jobs])

    @torch.no_grad()
    def step(self, jobs) -> None:
        why = self.reason(jobs)
        if why is not None:
            raise ValueError(f"the whole-step graph cannot take these images: {why}")
        key, S = self._set(jobs[0])
        b = self.sizes[bisect.bisect_left(self.sizes, len(jobs))]
        res = self._resident
        if res is None or res[0] != key or len(res[1]) != len(jobs) or any(
                a is not j or j.latents is not v for a, j, v in zip(res[1], jobs, res[2])):
            self._load(key, S, jobs, b)
        if b not in S.graphs:
            self._capture(S, b)
        graph, _ = S.graphs[b]
        self.backend.replay(graph)
        self.replays += 1
        for r, j in enumerate(jobs):
            j.index += 1
            j.latents = S.lat[r:r + 1]  # a view: current until this slot's next replay
        self._resident = (key, list(jobs), [j.latents for j in jobs])
        if any(j.done for j in jobs):
            self._flush()  # finished images leave with their own copies

    def release(self) -> None:
        """Give every resident job its state back (before another path steps them)."""
        self._flush()
