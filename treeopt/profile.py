"""Forward latency vs tree size (and context length) on the local device → profile.json.

Shape of the measurement (nanoGPT bench.py style): for each context length C a KV cache
holding C tokens is built once; for each input length L one forward of L tokens with a
tree-shaped 4-D mask and depth positions runs exactly as the runtime calls the model
(decoder + LM head on all L rows), the cache is cropped back to C, and so on: burn-in
first, then timed repeats until the median is stable (or the point's budget is spent).
CUDA timings use CUDA events and synchronize; CPU timings use perf_counter.

The fit (:class:`Latency`) is a monotone model t(L, C): isotonic regression over L per
context, linear interpolation between measured points (in L and in C), linear
extrapolation beyond them with the last segment's slope (never decreasing). `knee` is the
largest L with t(L) ≤ 1.1·t(1). `--simulate GPU` predicts a profile from the model's
shape with a roofline (see :func:`roofline`).
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

from .artefact import check_schema, read_json, write_json
from .cliutil import add_model_args, progress, say
from .errors import BadInput

HELP = "measure forward latency vs tree size on this GPU or CPU (or simulate a GPU)"
SCHEMA = "treeopt.profile/1"
CPU_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
GPU_SIZES = CPU_SIZES + [192, 256]
CONTEXTS = [128, 512, 2048]
CPU_CONTEXTS = [64, 128, 512, 2048]  # short chats matter on a CPU: t(1) at 64 is ~6 % below 128

# GPU table for the roofline: dense bf16/fp16 peak TFLOP/s (no sparsity) and HBM/GDDR
# bandwidth in GB/s, from the vendors' data sheets.
GPUS = {
    "a100-40gb": {"name": "NVIDIA A100 40GB", "tflops": 312, "bandwidth_gbs": 1555},
    "a100-80gb": {"name": "NVIDIA A100 80GB SXM", "tflops": 312, "bandwidth_gbs": 2039},
    "h100-sxm": {"name": "NVIDIA H100 SXM", "tflops": 989, "bandwidth_gbs": 3350},
    "h100-pcie": {"name": "NVIDIA H100 PCIe", "tflops": 756, "bandwidth_gbs": 2000},
    "h200": {"name": "NVIDIA H200", "tflops": 989, "bandwidth_gbs": 4800},
    "l40s": {"name": "NVIDIA L40S", "tflops": 362, "bandwidth_gbs": 864},
    "a10g": {"name": "NVIDIA A10G", "tflops": 70, "bandwidth_gbs": 600},
    "rtx-4090": {"name": "NVIDIA GeForce RTX 4090", "tflops": 165, "bandwidth_gbs": 1008},
    "rtx-3090": {"name": "NVIDIA GeForce RTX 3090", "tflops": 71, "bandwidth_gbs": 936},
    "v100": {"name": "NVIDIA V100 SXM2", "tflops": 125, "bandwidth_gbs": 900},
    "t4": {"name": "NVIDIA T4", "tflops": 65, "bandwidth_gbs": 320},
}
# Roofline factors (fraction of peak reached; fixed cost per step). Defaults for GPUs
# from published batch-1 decoding measurements (HF/vLLM reach ~70-85 % of HBM bandwidth
# on 7B decoding and ~50-70 % of tensor-core peak on medium GEMMs); `kernel_overhead_s`
# is the per-layer launch cost of an eager PyTorch forward (~10 kernels × ~4 µs); GPUs
# overlap compute with memory traffic (overlap 1 = the classic max()). A measured profile
# fits its own factors (`calibrate`); `--simulate --calibration PROFILE` uses them.
ROOFLINE_DEFAULTS = {"memory_efficiency": 0.75, "compute_efficiency": 0.55,
                     "attention_efficiency": 0.55, "kernel_overhead_s_per_layer": 4.0e-5,
                     "overlap": 1.0}


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="profile the local NVIDIA GPU")
    g.add_argument("--cpu", action="store_true", help="profile the CPU (default without GPU)")
    g.add_argument("--simulate", metavar="GPU",
                   help=f"predict a profile by roofline: {', '.join(GPUS)}")
    p.add_argument("--calibration", metavar="PROFILE",
                   help="with --simulate: use the roofline factors fitted to this measured "
                        "profile (default: the built-in GPU factors)")
    p.add_argument("--peak-tflops", type=float, help="with --simulate: override peak TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=float, help="with --simulate: override GB/s")
    p.add_argument("--sizes", help="comma list of input lengths (default: dense small sizes)")
    p.add_argument("--contexts", help="comma list of context lengths (default "
                   "64,128,512,2048 on a CPU, 128,512,2048 on a GPU)")
    p.add_argument("--repeats", type=int, default=30, help="max timed runs per point")
    p.add_argument("--rounds", type=int, default=3,
                   help="sweeps over the grid; each point's median spans them all, so a "
                   "drifting machine shifts every point alike")
    p.add_argument("--budget-seconds", type=float, default=6.0,
                   help="time budget per point (after burn-in)")
    p.add_argument("--resume", action="store_true", help="reuse points already in --out")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip measuring the runtime's per-step overhead")
    p.add_argument("--out", help="profile path (default profiles/<device>__<model>__<dtype>.json)")


def parse_list(text: str | None, default: list[int], what: str) -> list[int]:
    if text is None:
        return list(default)
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BadInput(f"{what}: {text!r} is not a comma list of integers") from None
    if not vals or vals[0] < 1:
        raise BadInput(f"{what}: values must be integers ≥ 1")
    return vals


# ---- device facts -------------------------------------------------------------------
def cpu_facts(threads: int) -> dict:
    from .models import cpu_has_bf16
    from .shipped import cpu_name

    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    return {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "bf16": cpu_has_bf16(), "avx512": "avx512f" in flags,
            "amx": bool({"amx_bf16", "amx_tile"} & flags), "machine": platform.machine()}


def gpu_check() -> None:
    """Exit-2 reasons when --gpu cannot work here: pynvml or CUDA unavailable."""
    try:
        import pynvml
    except ImportError as e:
        raise BadInput("--gpu: pynvml unavailable (install nvidia-ml-py)") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise BadInput(f"--gpu: pynvml cannot reach an NVIDIA driver ({e})") from e
    import torch

    if not torch.cuda.is_available():
        raise BadInput(f"--gpu: CUDA unavailable in torch {torch.__version__} "
                       f"(CUDA build: {torch.version.cuda or 'none'})")


def gpu_facts() -> dict:
    import pynvml
    import torch

    pynvml.nvmlInit()
    idx = torch.cuda.current_device()
    h = pynvml.nvmlDeviceGetHandleByIndex(idx)

    def safe(f, *a):
        try:
            v = f(*a)
            return v.decode() if isinstance(v, bytes) else v
        except Exception:  # noqa: BLE001 - not every field exists on every GPU
            return None

    mem = safe(pynvml.nvmlDeviceGetMemoryInfo, h)
    return {"kind": "cuda", "name": safe(pynvml.nvmlDeviceGetName, h),
            "memory_bytes": mem.total if mem else None,
            "driver": safe(pynvml.nvmlSystemGetDriverVersion),
            "cuda": torch.version.cuda, "torch": torch.__version__,
            "power_limit_w": (safe(pynvml.nvmlDeviceGetPowerManagementLimit, h) or 0) / 1000,
            **gpu_clocks(h)}


def gpu_clocks(handle=None) -> dict:
    import pynvml

    if handle is None:
        import torch

        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    out = {}
    for key, fn in [("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(
                        handle, pynvml.NVML_CLOCK_SM)),
                    ("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(
                        handle, pynvml.NVML_CLOCK_MEM)),
                    ("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(
                        handle, pynvml.NVML_TEMPERATURE_GPU))]:
        try:
            out[key] = fn()
        except Exception:  # noqa: BLE001
            out[key] = None
    return out


# ---- measurement ----------------------------------------------------------------------
class Timer:
    """perf_counter on CPU; CUDA events + synchronize on GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def stable_samples(timer: Timer, fn, repeats: int, budget: float, burn_in: int = 5,
                   min_runs: int = 10, rel_tol: float = 0.02) -> list[float]:
    """Burn in, then time until the median's standard error is below rel_tol (bootstrap-
    free estimate 1.25·IQR/(1.35·√n)), `repeats` runs, or the time budget."""
    for _ in range(burn_in):
        timer.time(fn)
    samples: list[float] = []
    t0 = time.perf_counter()
    while len(samples) < repeats:
        samples.append(timer.time(fn))
        if len(samples) >= min_runs:
            q = np.percentile(samples, [25, 50, 75])
            se = 1.25 * (q[2] - q[0]) / 1.35 / np.sqrt(len(samples))
            if se <= rel_tol * q[1] or time.perf_counter() - t0 > budget:
                break
    return samples


def summarize(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"median_s": float(np.median(a)), "p10_s": float(np.percentile(a, 10)),
            "p90_s": float(np.percentile(a, 90)), "n": int(a.size)}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_points(dec, sizes: list[int], contexts: list[int], repeats: int, budget: float,
                   done: dict | None = None, quiet: bool = False,
                   rounds: int = 1) -> tuple[list[dict], dict]:
    """Time one tree forward per (context, size). Returns points and {context: largest
    size that fit} for contexts where a size ran out of memory.

    With rounds > 1 the grid is swept that many times, each point getting its share of
    `repeats` and `budget` per sweep, and a point's median is over all its sweeps: a
    machine whose speed drifts while profiling then shifts every point alike instead of
    bending the curve t(L)."""
    import math

    import torch

    from .tree import build_buffers

    done = done or {}
    timer = Timer(dec.device)
    samples: dict[tuple[int, int], list[float]] = {}
    sweeps: dict[tuple[int, int], list[float]] = {}  # per-sweep medians: the drift seen
    max_fit: dict[int, int] = {}
    todo = [(r, c, s) for r in range(rounds) for c in contexts for s in sizes
            if (c, s) not in done]
    share, share_budget = max(1, math.ceil(repeats / rounds)), budget / rounds
    bar = progress(todo, "profile", quiet=quiet)
    cache, cache_ctx = None, None
    gen = torch.Generator().manual_seed(0)
    vocab = dec.embed.weight.shape[0]
    for r, c, s in bar:
        if c in max_fit and s > max_fit[c]:
            continue
        try:
            if cache_ctx != c:
                cache = None
                ids = torch.randint(0, vocab, (c,), generator=gen).to(dec.device)
                cache = dec.new_cache()
                with torch.inference_mode():
                    dec.forward(dec.embed(ids), cache, torch.arange(c, device=dec.device))
                cache_ctx = c
            # a tree of exactly s inputs (the root and s − 1 prompt tokens: a causal block),
            # masked by the runtime's own builder; the dense masked forward costs the same
            # for any tree of that size
            tok = torch.randint(0, vocab, (s,), generator=gen).to(dec.device)
            pos = c + torch.arange(s, device=dec.device)
            mask = dec.tree_mask(c, build_buffers((), s - 1, 1, 1, dec.device)) \
                if s > 1 else None

            def step():
                with torch.inference_mode():
                    dec.logits(dec.forward(dec.embed(tok), cache, pos, mask))
                dec.keep_kv(cache, c, None, c)

            got = stable_samples(timer, step, share, share_budget, burn_in=5 if r == 0 else 2,
                                 min_runs=min(10, share))
            samples.setdefault((c, s), []).extend(got)
            sweeps.setdefault((c, s), []).append(float(np.median(got)))
        except Exception as e:  # noqa: BLE001 - OOM → record and stop this context
            if not is_oom(e):
                raise
            torch.cuda.empty_cache()
            max_fit[c] = max((x for (cc, x) in samples if cc == c and x < s), default=0)
            cache, cache_ctx = None, None
            continue
        ms = 1000 * float(np.median(samples[(c, s)]))
        bar.set_postfix(round=r + 1, C=c, L=s, ms=f"{ms:.1f}")
    points = []
    for c in contexts:
        for s in sizes:
            if (c, s) in done:
                points.append(done[(c, s)])
            elif (c, s) in samples and not (c in max_fit and s > max_fit[c]):
                extra = {"rounds": rounds, "round_medians_s": sweeps[(c, s)]} \
                    if rounds > 1 else {}
                points.append({"context": c, "size": s, **summarize(samples[(c, s)]),
                               **extra})
    return points, max_fit


def measure_overhead(dec, sizes=(4, 16, 32), new_tokens: int = 48, quiet: bool = False) -> dict:
    """Runtime per-step overhead: full PPD step time minus its forward time (trees of a few
    sizes, one real prompt)."""
    from . import prompts
    from .tree import Tree

    ids = prompts.encode(dec.lm.tokenizer, prompts.BUILTIN[0]) if dec.lm.tokenizer else [1] * 16
    saved = (dec.tree, dec.prompt_tokens)
    rows = []
    k = dec.prompt_tokens.num
    for s in progress(sizes, "overhead", quiet=quiet):
        width = max(1, (s - 1 - k) // (1 + k))  # a static star of depth-1 nodes
        tree = Tree.static([[r] for r in range(width)], k, topk=max(10, width))
        dec.set_tree(tree, dec.prompt_tokens)
        dec.ppd(ids, 8)
        res = dec.ppd(ids, new_tokens)
        over = [a - b for a, b in zip(res.step_seconds, res.forward_seconds)]
        rows.append({"input_length": tree.input_length(k),
                     "overhead_s": float(statistics.median(over)),
                     "forward_s": float(statistics.median(res.forward_seconds))})
    dec.set_tree(*saved)
    return {"per_step_s": float(statistics.median(r["overhead_s"] for r in rows)),
            "fraction": float(statistics.median(r["overhead_s"] / r["forward_s"] for r in rows)),
            "by_size": rows}


# ---- fit ------------------------------------------------------------------------------
class Latency:
    """Monotone t(L, C) from a profile's points (+ the per-step overhead if asked)."""

    def __init__(self, profile: dict, with_overhead: bool = True):
        from scipy.optimize import isotonic_regression

        by_ctx: dict[int, list[tuple[int, float]]] = {}
        for p in profile["points"]:
            by_ctx.setdefault(int(p["context"]), []).append((int(p["size"]), p["median_s"]))
        if not by_ctx:
            raise BadInput("profile has no points")
        self.contexts = sorted(by_ctx)
        self.curves = {}
        for c in self.contexts:
            pts = sorted(by_ctx[c])
            xs = np.array([x for x, _ in pts], dtype=float)
            ys = isotonic_regression(np.array([y for _, y in pts])).x
            self.curves[c] = (xs, ys)
        self.overhead = float((profile.get("overhead") or {}).get("per_step_s", 0.0)) \
            if with_overhead else 0.0

    def _curve(self, c: int, sizes: np.ndarray) -> np.ndarray:
        xs, ys = self.curves[c]
        out = np.interp(sizes, xs, ys)
        if xs.size >= 2:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
            hi = sizes > xs[-1]
            out[hi] = ys[-1] + slope * (sizes[hi] - xs[-1])
        return out

    def __call__(self, sizes, context: int | None = None) -> np.ndarray:
        """Seconds per step for input length(s) L at context C (default: the smallest
        measured context), overhead included."""
        sizes = np.atleast_1d(np.asarray(sizes, dtype=float))
        cs = self.contexts
        c = cs[0] if context is None else context
        if c <= cs[0] or len(cs) == 1:
            t = self._curve(cs[0] if c <= cs[0] else cs[-1], sizes)
        elif c >= cs[-1]:  # linear in C beyond the last context, never decreasing
            a, b = self._curve(cs[-2], sizes), self._curve(cs[-1], sizes)
            t = b + np.maximum(b - a, 0) * (c - cs[-1]) / (cs[-1] - cs[-2])
        else:
            i = int(np.searchsorted(cs, c))
            a, b = self._curve(cs[i - 1], sizes), self._curve(cs[i], sizes)
            w = (c - cs[i - 1]) / (cs[i] - cs[i - 1])
            t = a + w * (b - a)
        order = np.argsort(sizes, kind="stable")  # never decreasing in L
        t[order] = np.maximum.accumulate(t[order])
        return t + self.overhead

    def knee(self, context: int | None = None, factor: float = 1.1, max_size: int = 4096) -> int:
        """Largest L with t(L) ≤ factor·t(1)."""
        sizes = np.arange(1, max_size + 1)
        t = self(sizes, context) - self.overhead
        ok = np.nonzero(t <= factor * t[0])[0]
        return int(sizes[ok[-1]]) if ok.size else 1


def load(path) -> dict:
    obj = read_json(path, "profile")
    validate(obj, f"profile {path}")
    return obj


def validate(obj: dict, where: str = "profile") -> None:
    check_schema(obj, SCHEMA, where)
    for field in ("model", "dtype", "device", "points"):
        if field not in obj:
            raise BadInput(f"{where}: missing field {field!r}")
    if not isinstance(obj["points"], list) or not obj["points"]:
        raise BadInput(f"{where}: field 'points' must be a non-empty list")
    for i, p in enumerate(obj["points"]):
        for f in ("context", "size", "median_s"):
            if not isinstance(p, dict) or not isinstance(p.get(f), (int, float)):
                raise BadInput(f"{where}: points[{i}].{f} missing or not a number")
        if p["median_s"] <= 0 or p["size"] < 1:
            raise BadInput(f"{where}: points[{i}] has a non-positive size or time")


# ---- roofline -------------------------------------------------------------------------
def model_shape(model: str | None) -> tuple[str, dict]:
    """(name, shape) from a config.json folder or the known-model table."""
    import json
    import pathlib

    from .models import KNOWN_MODELS, known_model

    if model and pathlib.Path(model).is_dir():
        cfg_path = pathlib.Path(model) / "config.json"
        if not cfg_path.is_file():
            raise BadInput(f"--model {model}: no config.json")
        cfg = json.loads(cfg_path.read_text())
        return pathlib.Path(model).resolve().name, cfg
    canon = known_model(model or "default")
    if canon is None:
        raise BadInput(f"--model {model}: unknown model (known: {', '.join(KNOWN_MODELS)}) "
                       "and not a folder with config.json")
    return canon, KNOWN_MODELS[canon]["config"]


def roofline(shape: dict, size: int, context: int, bytes_per_param: float, tflops: float,
             bandwidth_gbs: float, memory_efficiency: float, compute_efficiency: float,
             kernel_overhead_s_per_layer: float, attention_efficiency: float | None = None,
             overlap: float = 1.0) -> dict:
    """Predicted seconds for one forward of `size` tokens on a `context`-token KV cache.

    t = layers·launch + max(t_c, t_m) + (1 − overlap)·min(t_c, t_m), with
    t_c = 2·(non-embedding params + LM head)·L / (peak·eff_c)
        + 4·layers·heads·head_dim·L·(C + L) / (peak·eff_attn)   (attention scores, values)
    t_m = (weights + KV cache of C + L tokens) bytes / (bandwidth·eff_m), read once.
    overlap = 1 is the classic roofline (compute hides memory traffic, as on GPUs); a CPU
    fits lower. eff_attn defaults to eff_c.
    """
    h, n_l = shape["hidden_size"], shape["num_hidden_layers"]
    heads = shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads", heads)
    hd = shape.get("head_dim") or h // heads
    inter, vocab = shape["intermediate_size"], shape["vocab_size"]
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    params = n_l * per_layer + vocab * h  # + LM head (read even when tied)
    dense = 2 * params * size
    attn = 4 * n_l * heads * hd * size * (context + size)
    kv_bytes = 2 * n_l * kv * hd * (context + size) * bytes_per_param
    weight_bytes = params * bytes_per_param
    t_c = dense / (tflops * 1e12 * compute_efficiency) + \
        attn / (tflops * 1e12 * (attention_efficiency or compute_efficiency))
    t_m = (weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9 * memory_efficiency)
    t = n_l * kernel_overhead_s_per_layer + max(t_c, t_m) + (1 - overlap) * min(t_c, t_m)
    return {"seconds": t, "bound": "compute" if t_c > t_m else "memory",
            "flops": dense + attn, "bytes": weight_bytes + kv_bytes,
            "weight_bytes": weight_bytes}


def simulate(gpu: str, model: str | None, dtype: str, sizes: list[int], contexts: list[int],
             tflops: float | None = None, bandwidth: float | None = None,
             factors: dict | None = None) -> dict:
    key = gpu.lower()
    if key not in GPUS and (tflops is None or bandwidth is None):
        raise BadInput(f"--simulate {gpu}: unknown GPU (known: {', '.join(GPUS)}); or give "
                       "--peak-tflops and --bandwidth-gbs")
    spec = dict(GPUS.get(key, {"name": gpu}))
    if tflops:
        spec["tflops"] = tflops
    if bandwidth:
        spec["bandwidth_gbs"] = bandwidth
    name, shape = model_shape(model)
    dt = "float16" if dtype == "auto" else dtype
    bpp = 4.0 if dt == "float32" else 2.0
    factors = dict(factors or {})
    source = factors.pop("source", "built-in GPU defaults (published batch-1 decoding "
                                   "efficiencies), not fitted to a measured GPU")
    f = {**ROOFLINE_DEFAULTS, **factors}
    max_ctx = shape.get("max_position_embeddings", 4096)
    points = []
    for c in [c for c in contexts if c < max_ctx] or [min(contexts[0], max_ctx - 1)]:
        for s in sizes:
            r = roofline(shape, s, c, bpp, spec["tflops"], spec["bandwidth_gbs"], **f)
            points.append({"context": c, "size": s, "median_s": r["seconds"],
                           "p10_s": r["seconds"], "p90_s": r["seconds"], "n": 0,
                           "bound": r["bound"]})
    return {
        "schema": SCHEMA, "model": name, "dtype": dt, "simulated": True,
        "device": {"kind": "simulated-gpu", "name": spec["name"], "id": key,
                   "peak_tflops": spec["tflops"], "bandwidth_gbs": spec["bandwidth_gbs"]},
        "device_id": f"sim-{key}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "points": points, "overhead": {"per_step_s": 0.0, "fraction": 0.0},
        "assumptions": {
            "model": "t = layers·launch + max(t_c, t_m) + (1 − overlap)·min(t_c, t_m); "
                     "t_c = dense FLOPs/(peak·eff_c) + attention FLOPs/(peak·eff_attn), "
                     "t_m = bytes/(bandwidth·eff_m)",
            "flops": "dense 2·params·L, attention 4·layers·heads·head_dim·L·(C+L)",
            "bytes": "all weights (incl. LM head) + KV cache of C+L tokens, once per forward",
            "bytes_per_param": bpp, "shape": shape, **f, "factors_source": source,
            "not_modelled": "kernel fusion, tensor-parallelism, quantization, the runtime's "
                            "per-step overhead (set to 0)"},
    }


# ---- roofline calibration ---------------------------------------------------------------
def measure_ceilings(device, dtype, seconds: float = 1.0) -> dict:
    """This device's attainable ceilings, measured (not from a data sheet): dense matmul
    TFLOP/s in `dtype` (n×n GEMMs, best of several) and memory GB/s (a 256 MiB copy,
    bytes read + written, best of several). The roofline's efficiencies fitted against a
    measured profile are fractions of these."""
    import torch

    timer = Timer(device)
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)

    def best(fn):
        fn()  # burn-in
        out, t0 = [], time.perf_counter()
        while len(out) < 3 or (time.perf_counter() - t0 < seconds and len(out) < 50):
            out.append(timer.time(fn))
        return min(out)

    with torch.inference_mode():
        t_mm = best(lambda: torch.mm(a, b))
        t_cp = best(lambda: dst.copy_(src))
    return {"peak_tflops": 2 * n**3 / t_mm / 1e12,
            "bandwidth_gbs": 2 * src.numel() * src.element_size() / t_cp / 1e9,
            "how": f"best of timed {n}x{n} {str(dtype).removeprefix('torch.')} matmuls and "
                   "256 MiB copies"}


FITTED = ("memory_efficiency", "compute_efficiency", "attention_efficiency",
          "kernel_overhead_s_per_layer", "overlap")


def calibrate(points: list[dict], shape: dict, bytes_per_param: float, tflops: float,
              bandwidth_gbs: float) -> dict:
    """Fit the roofline's factors (memory, compute and attention efficiency, launch cost
    per layer, compute/memory overlap) to measured points by least squares on log time
    (scipy); returns the factors and the fit's relative error."""
    from scipy.optimize import least_squares

    pts = [(int(p["size"]), int(p["context"]), float(p["median_s"])) for p in points]
    if len(pts) < len(FITTED):
        raise BadInput(f"calibration needs at least {len(FITTED)} measured points")
    meas = np.array([t for _, _, t in pts])

    def predict(x):
        f = dict(zip(FITTED, (float(v) for v in x)))
        return np.array([roofline(shape, s, c, bytes_per_param, tflops, bandwidth_gbs,
                                  **f)["seconds"] for s, c, _ in pts]), f

    x0 = [ROOFLINE_DEFAULTS[f] for f in FITTED[:3]] + [1e-5, 0.5]  # launch, overlap: mid-range
    fit = least_squares(lambda x: np.log(predict(x)[0] / meas), x0,
                        bounds=([1e-3, 1e-3, 1e-4, 0.0, 0.0], [4.0, 4.0, 4.0, 1e-2, 1.0]),
                        x_scale=[0.1, 0.1, 0.1, 1e-5, 0.1], loss="soft_l1", f_scale=0.1)
    pred, factors = predict(fit.x)
    rel = np.abs(pred / meas - 1)
    return {"factors": factors, "peak_tflops": tflops, "bandwidth_gbs": bandwidth_gbs,
            "bytes_per_param": bytes_per_param, "points": len(pts),
            "median_rel_error": float(np.median(rel)), "max_rel_error": float(rel.max())}


def main(args) -> dict:
    import torch

    from . import shipped

    sizes_default = GPU_SIZES if args.gpu or args.simulate else CPU_SIZES
    sizes = parse_list(args.sizes, sizes_default, "--sizes")
    contexts = parse_list(args.contexts, CONTEXTS, "--contexts")
    if args.repeats < 1:
        raise BadInput(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.rounds < 1:
        raise BadInput(f"--rounds must be ≥ 1, got {args.rounds}")
    human = not args.json
    if args.calibration and not args.simulate:
        raise BadInput("--calibration goes with --simulate")
    if args.simulate:
        factors = None
        if args.calibration:
            ref = load(args.calibration)
            if "roofline" not in ref:
                raise BadInput(f"--calibration {args.calibration}: the profile has no fitted "
                               "roofline (measure it with `treeopt profile`)")
            factors = {**ref["roofline"]["factors"], "source": str(args.calibration)}
        prof = simulate(args.simulate, args.model, args.dtype, sizes, contexts,
                        args.peak_tflops, args.bandwidth_gbs, factors)
        prof["command"] = "treeopt " + " ".join(sys.argv[1:])
        out = args.out or shipped.profile_path(prof["device_id"], prof["model"], prof["dtype"])
        write_json(out, prof)
        return _report(prof, out, human)
    if args.gpu:
        gpu_check()
        device = "cuda"
    elif args.cpu:
        device = "cpu"
    else:
        device = args.device
    from .runtime import open_decoder

    dec, info = open_decoder(args.model, args.dtype, device, None, None, args.threads)
    dev_id = shipped.device_slug(dec.device.type)
    out = args.out or shipped.profile_path(dev_id, info["model"], info["dtype"])
    if args.contexts is None and dec.device.type == "cpu":
        contexts = list(CPU_CONTEXTS)
    max_ctx = dec.lm.max_context
    capped = [c for c in contexts if c + max(sizes) <= max_ctx]
    if not capped:
        raise BadInput(f"--contexts: every context + the largest size exceeds the model's "
                       f"context ({max_ctx})")
    done, reuse = {}, {}
    if args.resume and os.path.isfile(out):
        old = load(out)
        if old["model"] != info["model"] or old["dtype"] != info["dtype"]:
            raise BadInput(f"--resume: {out} is for {old['model']}/{old['dtype']}")
        done = {(p["context"], p["size"]): p for p in old["points"]}
        reuse = {k: old[k] for k in ("overhead", "ceilings", "command", "created", "seconds")
                 if k in old}
    facts = gpu_facts() if dec.device.type == "cuda" else cpu_facts(torch.get_num_threads())
    clocks_before = gpu_clocks() if dec.device.type == "cuda" else None
    if human:
        say(f"profiling {info['model']} ({info['dtype']}) on {facts['name']}: "
            f"{len(sizes)} sizes × {len(capped)} contexts")
    t0 = time.perf_counter()
    points, max_fit = measure_points(dec, sizes, capped, args.repeats, args.budget_seconds,
                                     done, quiet=not human, rounds=args.rounds)
    overhead = reuse.get("overhead") or (None if args.no_overhead else
                                         measure_overhead(dec, quiet=not human))
    ceilings = reuse.get("ceilings") or measure_ceilings(dec.device, dec.dtype)
    if clocks_before is not None:
        facts["clocks_before"], facts["clocks_after"] = clocks_before, gpu_clocks()
    prof = {"schema": SCHEMA, "model": info["model"], "dtype": info["dtype"],
            "simulated": False, "device": facts, "device_id": dev_id,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "treeopt " + " ".join(sys.argv[1:]),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "points": points, "overhead": overhead or {"per_step_s": 0.0, "fraction": 0.0}}
    prof["ceilings"] = ceilings
    if len(points) >= len(FITTED):
        prof["roofline"] = calibrate(points, dec.lm.model.config.to_dict(), dec.dtype.itemsize,
                                     ceilings["peak_tflops"], ceilings["bandwidth_gbs"])
    if "command" in reuse:  # keep who measured the reused points; say who updated them
        prof["updated_by"], prof["updated"] = prof["command"], prof["created"]
        prof["command"], prof["created"] = reuse["command"], reuse["created"]
        prof["seconds"] = round(prof["seconds"] + reuse.get("seconds", 0.0), 1)
    if max_fit:
        prof["max_size_fit"] = {str(c): s for c, s in max_fit.items()}
    write_json(out, prof)
    return _report(prof, out, human)


DRIFT_WARN = 0.05  # sweep spread above which `profile` warns


def sweep_spread(points: list[dict]) -> float | None:
    """Median over points of (slowest sweep median / fastest − 1): how much the machine's
    speed moved while it was profiled. None for single-sweep profiles."""
    r = [max(p["round_medians_s"]) / min(p["round_medians_s"]) - 1 for p in points
         if len(p.get("round_medians_s", [])) > 1]
    return round(float(np.median(r)), 4) if r else None


def _report(prof: dict, out, human: bool) -> dict:
    lat = Latency(prof, with_overhead=False)
    summary = {"out": str(out), "model": prof["model"], "dtype": prof["dtype"],
               "device": prof["device"]["name"], "simulated": prof["simulated"],
               "points": len(prof["points"]),
               "knee": {str(c): lat.knee(c) for c in lat.contexts},
               "t1_ms": {str(c): round(1000 * float(lat([1], c)[0]), 3) for c in lat.contexts},
               "overhead_s": prof["overhead"]["per_step_s"]}
    if "roofline" in prof:
        summary["roofline"] = prof["roofline"]
    spread = sweep_spread(prof["points"])
    if spread is not None:
        summary["sweep_spread"] = spread
    if human:
        c0 = lat.contexts[0]
        say(f"wrote {out}")
        say(f"context {c0}: " + ", ".join(f"L={s}: {1000 * float(lat([s], c0)[0]):.1f} ms"
                                          for s in (1, 8, 16, 32, 64, 128)))
        if "roofline" in prof:
            rf = prof["roofline"]
            f = rf["factors"]
            say(f"roofline fit ({rf['peak_tflops']:.2f} TFLOP/s, {rf['bandwidth_gbs']:.1f} GB/s "
                f"measured): memory efficiency {f['memory_efficiency']:.2f}, compute "
                f"{f['compute_efficiency']:.2f}, attention {f['attention_efficiency']:.2f}, "
                f"overlap {f['overlap']:.2f}, launch "
                f"{1e6 * f['kernel_overhead_s_per_layer']:.1f} µs/layer; error median "
                f"{100 * rf['median_rel_error']:.1f} %, max {100 * rf['max_rel_error']:.1f} %")
        if spread is not None:
            say(f"drift between sweeps: a point's slowest sweep is {100 * spread:.1f} % above "
                "its fastest (median over points)")
            if spread > DRIFT_WARN:
                say(f"warning: the device's speed moved by more than {100 * DRIFT_WARN:.0f} % "
                    "while profiling (other load, clocks); tokens/s predicted from this "
                    "profile carry that error — profile again on a quiet machine")
        say("knee (largest L with t(L) ≤ 1.1·t(1)): " +
            ", ".join(f"C={c}: {k}" for c, k in summary["knee"].items()))
    return summary
