"""Compile every kernel for sm_90 and sm_80 at the engine's 7B call sites, without a GPU.

    python -m dreamllm_fast.kernels.targets [--arch 90 80] [--dtype bf16 fp16] [--jobs N]
                                            [--typing triton inductor] [--extra FILE.py] [--json OUT]

1. Record: the engine's own code (``LlamaRunner`` prefill and decode, ``dream_projection``,
   the decode loop's ``exponential_sample``; prefill and decode again in the first dtype with int8
   weights, and fp8 on sm_90, through ``quant_linear``) runs
   once per call site on meta tensors at the released 7B shapes with every kernel's ``run``
   replaced by a recorder, so constexprs, dtypes, strides, grids, warps and stages are exactly
   what the launchers choose (plans use the target's SM count: 132 for sm_90, 108 for sm_80).
   Decode attention runs with its default config in every dtype, and with every candidate in
   ``CONFIGS`` in bf16 on sm_90 (the fleet's GPU, where a GPU session may switch the default).
2. Compile: each distinct launch goes through Triton's own ``JITFunction.run(..., warmup=True)``
   under a stand-in driver that reports the target and launches nothing, then ``ptxas -v`` from
   the Triton wheel reads registers and spills; shared memory is Triton's launch-time figure.
3. Check: a compile error, any spill, or shared memory over the per-block limit
   (232448 B sm_90, 166912 B sm_80) fails the run (exit status 1) with a table per kernel/arch.

The ``inductor`` typing pass retypes float scalars fp64 and integer scalars i64 the way Inductor
does for user-defined Triton kernels (torch 2.11-2.14 ``signature_of``: Python floats are fp64 on
devices with fp64), the typing that broke decode attention under torch.compile on the 2026-11-23
H100 run. Needs ``TRITON_INTERPRET`` unset. Triton's cache (~/.triton) and a ptxas-stats cache make
a second run fast; a cold run is ~67 compiles (about 85 s of CPU on the 2-core CI machine).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = {90: dict(smem=232448, sms=132, name="sm_90a"), 80: dict(smem=166912, sms=108, name="sm_80")}
DECODE_BATCHES = (1, 2, 4, 8, 16)
PREFILL_CHUNKS = (1, 7, 64, 258, 512, 770, 1024)
MAX_SEQ = 2048
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
QUANT_WEIGHTS = {90: ("int8", "fp8"), 80: ("int8",)}  # fp8 needs sm_89+: the engine refuses it on sm_80


@dataclass
class Launch:
    site: str
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    key: tuple = field(default=())


def _arg_key(a):
    """Coarse copy of Triton's specialization: what makes two launches compile differently."""
    import torch

    if isinstance(a, torch.Tensor):
        return ("t", str(a.dtype), a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None or isinstance(a, str):
        return a
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31)
    if isinstance(a, float):
        return "f"
    return repr(a)


def _jit_functions(module):
    from triton.runtime.jit import JITFunction

    return [v for v in vars(module).values() if isinstance(v, JITFunction)]


@contextlib.contextmanager
def recording(modules):
    """Replace ``run`` of every JITFunction in ``modules`` by a recorder; yields the record list."""
    records, patched = [], []
    site = {"name": "?"}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            records.append(Launch(site["name"], kernel, args, kwargs))
        return run

    for m in modules:
        for k in _jit_functions(m):
            if all(k is not p for p in patched):  # helpers (cast_rne, ...) are imported by several files
                k.run = recorder(k)
                patched.append(k)
    try:
        yield records, site
    finally:
        for k in patched:
            del k.run


def _engine_sites(site, dtype, configs, weights="bf16"):
    """The engine's kernel calls at the released 7B shapes, on meta tensors (one layer: every layer
    makes the same calls). weights "int8"/"fp8": the quantized engine (its linears and LM head
    through quant_linear; site names get the format as a prefix)."""
    import torch

    from .. import kernels as K
    from ..config import DreamLLMConfig
    from ..engine.llm import KVCache, LlamaRunner, LlamaWeights
    from ._utils import clear_plans

    cfg = DreamLLMConfig.from_name("dreamllm-7b")
    lc = cfg.llm
    lc.num_hidden_layers = 1
    H, F, V, D = lc.hidden_size, lc.intermediate_size, lc.vocab_size, lc.head_dim
    nq, nkv = lc.num_attention_heads * D, lc.num_key_value_heads * D

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    state = {"model.embed_tokens.weight": meta(V, H), "model.norm.weight": meta(H), "lm_head.weight": meta(V, H)}
    for name, shape in (("input_layernorm", (H,)), ("self_attn.q_proj", (nq, H)), ("self_attn.k_proj", (nkv, H)),
                        ("self_attn.v_proj", (nkv, H)), ("self_attn.o_proj", (H, nq)),
                        ("post_attention_layernorm", (H,)), ("mlp.gate_proj", (F, H)), ("mlp.up_proj", (F, H)),
                        ("mlp.down_proj", (H, F))):
        state[f"model.layers.0.{name}.weight"] = meta(*shape)
    fmt, weights = weights, LlamaWeights(state, lc, "meta", dtype, weights=weights)
    tag = "" if fmt == "bf16" else f"{fmt} "
    cache = KVCache(lc, max(DECODE_BATCHES), MAX_SEQ, "meta", dtype)
    runner = LlamaRunner(lc, weights, cache, "meta")
    i32 = torch.int32

    def lens(n):
        return meta(n, dt=i32)

    for T in PREFILL_CHUNKS:
        site["name"] = f"{tag}prefill T={T}"
        runner.prefill(meta(T, H), lens(2), lens(1), lens(1), T)
    site["name"] = f"{tag}condition pair 2x66"
    runner.prefill(meta(132, H), lens(3), lens(2), lens(2), 66)
    dmod = sys.modules[f"{__package__}.decode_attention"]  # the package attribute is the dispatcher
    default = dmod.DEFAULT_CONFIG
    try:
        for c in configs:
            dmod.DEFAULT_CONFIG = c  # the engine calls with the default; record every candidate
            clear_plans()
            for B in DECODE_BATCHES:
                site["name"] = f"{tag}decode B={B} {c.variant}/{c.block_n}/w{c.num_warps}/s{c.num_stages}"
                runner.decode_step(meta(B, H), lens(B), lens(B))
    finally:
        dmod.DEFAULT_CONFIG = default
    if fmt != "bf16":  # the rest does not depend on the weights
        return
    for B in DECODE_BATCHES:  # the decode loop's sampling step (fp32 probabilities over the vocabulary)
        site["name"] = f"sample B={B}"
        K.exponential_sample(meta(B, V, dt=torch.float32), meta(B, dt=torch.int64), lens(B))
    C, Q = cfg.diffusion.cross_attention_dim, cfg.num_dream_queries
    for T, N in ((Q + 2, Q), (2 * (Q + 2), 2 * Q), (770 + Q + 2, Q)):
        site["name"] = f"dream_projection T={T} N={N}"
        K.dream_projection(meta(T, H), meta(N, dt=torch.int64), meta(H), meta(C, H), lc.rms_norm_eps)


# GroupNorm(+SiLU) of the SD-2.1 U-Net (batch 2 and 8) and VAE at 512x512: (N, C, side, silu);
# one per distinct channels-per-group tile (C/32 -> 16, 32, 64, 128 in the U-Net, 4, 8, 16 in the
# VAE), with and without the SiLU, plus the server's batch 8 (more groups: fewer splits).
GROUP_NORM_SITES = ((2, 320, 64, True), (2, 320, 64, False), (2, 640, 32, True), (2, 1280, 16, True),
                    (2, 2560, 8, True), (8, 320, 64, True), (1, 512, 64, False), (1, 256, 256, True),
                    (1, 128, 512, True))


def _diffusion_sites(site, dtype):
    """The graphs backend's fused GroupNorm(+SiLU) calls (channels-last: that backend's layout)."""
    import torch

    from .. import kernels as K

    for n, c, side, silu in GROUP_NORM_SITES:
        site["name"] = f"group_norm {n}x{c}x{side}x{side}{' silu' if silu else ''}"
        x = torch.empty(n, c, side, side, dtype=dtype, device="meta").to(memory_format=torch.channels_last)
        K.group_norm(x, torch.empty(c, dtype=dtype, device="meta"), torch.empty(c, dtype=dtype, device="meta"),
                     32, 1e-5, silu=silu)


def record(arch: int, dtypes=("bf16", "fp16"), extra=(), sweep="all"):
    """Distinct launches of the engine's call sites (plus ``launches()`` of each extra module).

    Decode attention runs with the default config in every dtype; ``sweep="all"`` adds every
    candidate in ``CONFIGS`` for the first dtype on sm_90 (the fleet's GPU; CI time),
    ``"variants"`` one config per variant.
    """
    import importlib

    import torch

    from . import _utils
    from .. import kernels as K

    assert not _utils.is_interpret(), "compile checks need TRITON_INTERPRET unset (they compile real PTX)"
    mods = [importlib.import_module(f"{__package__}.{m}")
            for m in ("rmsnorm", "swiglu", "append_attention", "decode_attention", "dream_projection",
                      "sampling", "quant_linear", "group_norm")]
    extra_mods = [_load_file(p) for p in extra]
    _utils.set_standin_sm_count(ARCHS[arch]["sms"])
    prev = K.backend()
    K.set_backend("triton")
    try:
        with recording(mods + extra_mods) as (records, site):
            dmod = sys.modules[f"{__package__}.decode_attention"]
            variants = {c.variant: c for c in reversed(dmod.CONFIGS)}
            extra_configs = {"all": dmod.CONFIGS if arch == 90 else (),
                             "variants": tuple(variants.values())}.get(sweep, ())
            for i, name in enumerate(dtypes):
                configs = (dmod.DEFAULT_CONFIG,) + tuple(c for c in extra_configs
                                                         if i == 0 and c != dmod.DEFAULT_CONFIG)
                _engine_sites(site, getattr(torch, _DTYPES[name]), configs)
                for fmt in QUANT_WEIGHTS[arch] if i == 0 else ():  # the weight-only engines, first
                    _engine_sites(site, getattr(torch, _DTYPES[name]), configs[:1], weights=fmt)  # dtype (CI time)
                _diffusion_sites(site, getattr(torch, _DTYPES[name]))
            for m in extra_mods:
                site["name"] = f"extra {Path(m.__file__).name}"
                m.launches()
    finally:
        K.set_backend(prev)
        _utils.set_standin_sm_count(4)
    seen, out = set(), []
    for r in records:
        dns = [p.do_not_specialize for p in r.kernel.params]
        r.key = (r.kernel.fn.__qualname__,
                 tuple(("i", -2 ** 31 <= a < 2 ** 31) if d and isinstance(a, int) else _arg_key(a)
                       for a, d in zip(r.args, dns)),
                 tuple(sorted((k, repr(v)) for k, v in r.kwargs.items())))  # constexprs: exact values
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


def _load_file(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class StandInDriver:
    """Reports a GPU target to Triton's JIT and launches nothing (compile only, no CUDA driver).
    The device id is per (arch, typing) so the JIT's per-device kernel caches never mix them."""

    def __init__(self, arch: int, device_id: int):
        from triton.backends.compiler import GPUTarget

        self.target, self.device_id = GPUTarget("cuda", arch, 32), device_id

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device_id

    def get_current_stream(self, device=None):
        return 0


def _retyping_compile(original):
    """triton.compile with Inductor's scalar typing: fp32 -> fp64, i32 -> i64 (pointers untouched)."""
    def compile_(src, target=None, options=None, **kw):
        src.signature = {k: {"fp32": "fp64", "i32": "i64"}.get(v, v) for k, v in src.signature.items()}
        compile_.calls += 1
        return original(src, target=target, options=options, **kw)
    compile_.calls = 0
    return compile_


def compile_launch(rec: Launch, arch: int, inductor_types: bool = False):
    """(CompiledKernel, ptxas -v log or "", None) or (None, "", error text) for one launch.

    Triton runs ptxas -v itself; with TRITON_DUMP_PTXAS_LOG it prints the log, which is captured
    here so a cold compile runs ptxas once (a Triton cache hit prints nothing: see ptxas_stats).
    """
    import io

    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    dev = arch * 10 + int(inductor_types)
    previous = getattr(driver, "_active", None)  # None: Triton creates its default driver lazily
    driver.set_active(StandInDriver(arch, dev))
    k = rec.kernel
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        kernel_cache = k.device_caches[dev][0]  # builds the binder (and sets k.compile) for this device
        n_compiled = len(kernel_cache)
        original = k.compile
        if inductor_types:
            k.compile = _retyping_compile(original)
        try:
            with contextlib.redirect_stdout(log):
                compiled = JITFunction.run(k, *rec.args, grid=(1,), warmup=True, **rec.kwargs)
        finally:
            retyped, k.compile = getattr(k.compile, "calls", 0), original
        if inductor_types and len(kernel_cache) > n_compiled and not retyped:
            return None, "", "the signature was not retyped (an unknown triton version?)"
        return compiled, log.getvalue(), None
    except Exception as e:  # CompilationError, ptxas failure, ...
        return None, "", f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        driver.set_active(previous)


def _ptxas_path():
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:
        import triton

        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _parse_ptxas(log: str, name: str):
    """Stats of entry ``name`` from a ptxas -v log, or None if the log does not have it."""
    m = re.search(rf"Compiling entry function '{re.escape(name)}'(.*?)(?=Compiling entry function|\Z)", log, re.S)
    if not m:
        return None
    part = m.group(1)

    def num(pattern):
        found = re.search(pattern, part)
        return int(found.group(1)) if found else 0

    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "static_smem": num(r"(\d+) bytes smem"),
            "stack": num(r"(\d+) bytes stack frame")}


def ptxas_stats(ptx: str, name: str, arch: int, cache_dir: Path, log: str = ""):
    """Registers, spill stores/loads and static smem of the PTX's entry ``name`` on ``arch``:
    from Triton's own ptxas log when it compiled just now, else ``ptxas -v`` from the Triton
    wheel; cached by PTX hash either way."""
    ptxas = _ptxas_path()
    key = hashlib.sha256((ptx + ARCHS[arch]["name"] + ptxas).encode()).hexdigest()[:32]
    hit = cache_dir / f"{key}.json"
    if hit.exists():
        return json.loads(hit.read_text())
    stats = _parse_ptxas(log, name)
    if stats is None:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            proc = subprocess.run([ptxas, "-v", f"--gpu-name={ARCHS[arch]['name']}", str(src), "-o",
                                   str(src) + ".o"], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": f"ptxas exit {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}"}
        stats = _parse_ptxas(proc.stdout + proc.stderr, name)
        if stats is None:
            return {"error": f"no ptxas -v record for {name}"}
    cache_dir.mkdir(parents=True, exist_ok=True)
    hit.write_text(json.dumps(stats))
    return stats


def check(rec: Launch, arch: int, inductor_types: bool, cache_dir: Path) -> dict:
    """One result row; ``ok`` False on a compile error, a spill, or smem over the block limit."""
    meta = {k: v for k, v in rec.kwargs.items() if k not in ("num_warps", "num_stages")}
    row = dict(kernel=rec.kernel.fn.__name__, arch=f"sm_{arch}", site=rec.site,
               dtype=next((str(a.dtype).replace("torch.", "") for a in rec.args if hasattr(a, "dtype")), "-"),
               num_warps=rec.kwargs.get("num_warps", 4), num_stages=rec.kwargs.get("num_stages", 3),
               meta=" ".join(f"{k}={v}" for k, v in meta.items() if k != "IS_INTERPRET"),
               typing="inductor" if inductor_types else "triton")
    t0 = time.perf_counter()
    compiled, log, err = compile_launch(rec, arch, inductor_types)
    if compiled is None:
        return dict(row, ok=False, problem=f"compile error: {err[-1500:]}", seconds=time.perf_counter() - t0)
    stats = ptxas_stats(compiled.asm["ptx"], compiled.metadata.name, arch, cache_dir, log)
    row["seconds"] = time.perf_counter() - t0
    if "error" in stats:
        return dict(row, ok=False, problem=stats["error"])
    smem = int(compiled.metadata.shared) + stats["static_smem"]
    row.update(regs=stats["regs"], spill_stores=stats["spill_stores"], spill_loads=stats["spill_loads"],
               smem=smem, smem_limit=ARCHS[arch]["smem"])
    problems = []
    if stats["spill_stores"] or stats["spill_loads"]:
        problems.append(f"spills {stats['spill_stores']} B stores / {stats['spill_loads']} B loads")
    if smem > ARCHS[arch]["smem"]:
        problems.append(f"shared memory {smem} B > {ARCHS[arch]['smem']} B")
    return dict(row, ok=not problems, problem="; ".join(problems))


def passes(archs, dtypes, typings, engine=True):
    """(arch, typing, dtypes, sweep) passes: Triton's typing at every arch and dtype with every
    decode candidate on sm_90; Inductor's typing on sm_90, first dtype, one config per variant."""
    out = []
    for typing in typings:
        if typing == "triton":
            out += [(a, typing, tuple(dtypes), "all") for a in archs]
        else:
            out.append((90 if 90 in archs else archs[0], typing, tuple(dtypes[:1]), "variants"))
    return [(a, t, d if engine else (), sw) for a, t, d, sw in out]


def run_checks(pass_list, extra=(), shard=(0, 1), cache_dir=None):
    """Rows for every distinct launch of every pass (this shard's share of the whole list)."""
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "dreamllm-fast-ptxas")
    work = [(rec, arch, typing) for arch, typing, dtypes, sweep in pass_list
            for rec in record(arch, dtypes, extra, sweep)]
    return [check(rec, arch, typing == "inductor", cache_dir)
            for i, (rec, arch, typing) in enumerate(work) if i % shard[1] == shard[0]]


def _table(rows):
    keys = ("arch", "typing", "kernel", "dtype", "num_warps", "num_stages", "regs", "spill_stores", "smem", "ok",
            "meta", "site")
    lines = [" | ".join(keys)]
    for r in sorted(rows, key=lambda r: (r["typing"], r["arch"], r["kernel"], r["site"])):
        lines.append(" | ".join(str(r.get(k, "-")) for k in keys))
        if not r["ok"]:
            lines.append(f"    FAIL: {r['problem']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(_DTYPES))
    p.add_argument("--typing", nargs="+", default=["triton", "inductor"], choices=("triton", "inductor"),
                   help="scalar argument typing: Triton's own (fp32/i32), Inductor's (fp64/i64)")
    p.add_argument("--extra", nargs="*", default=[], help="python files whose launches() adds kernel launches")
    p.add_argument("--no-engine", action="store_true", help="only the --extra launches")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--shard", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    pass_list = passes(args.arch, args.dtype, args.typing, engine=not args.no_engine)
    t0 = time.perf_counter()
    if args.shard is not None or args.jobs <= 1:
        rows = run_checks(pass_list, args.extra, tuple(args.shard or (0, 1)))
    else:  # shard the distinct launches over worker processes (each records the same list)
        procs, rows = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.jobs):
                cmd = [sys.executable, "-m", f"{__package__}.targets", "--shard", str(i), str(args.jobs),
                       "--json", f"{tmp}/{i}.json", "--arch", *map(str, args.arch), "--dtype", *args.dtype,
                       "--typing", *args.typing, "--extra", *args.extra] + (["--no-engine"] if args.no_engine else [])
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for i, proc in enumerate(procs):
                _, err = proc.communicate()
                path = Path(tmp) / f"{i}.json"
                if not path.exists():
                    print(f"worker {i} failed:\n{err[-3000:]}", file=sys.stderr)
                    return 2
                rows += json.loads(path.read_text())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.shard is not None:
        return 0
    print(_table(rows))
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} launches compiled ({', '.join(f'sm_{a} {t} typing {sw}' for a, t, _, sw in pass_list)}) "
          f"in {time.perf_counter() - t0:.1f} s: {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
