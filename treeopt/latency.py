"""Latency: forward time vs tree size and context length — measurement, the profile
artefact, the monotone fit t(L, C), the roofline model and its calibration.

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

import pathlib

import numpy as np
from scipy.optimize import isotonic_regression, least_squares

from .artefact import check_fields, check_schema, finite, read_json, stamp
from .errors import BadInput
from .models import KNOWN_MODELS, known_model

SCHEMA = "treeopt.profile/1"
CPU_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
GPU_SIZES = CPU_SIZES + [192, 256]
CONTEXTS = [128, 512, 2048]
CPU_CONTEXTS = [64, 128, 512, 2048]  # short chats matter on a CPU: t(1) at 64 is ~6 % below 128
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]  # per sequence; B·L grows fast
BATCH_CONTEXTS = [64, 192, 512]
# a step's host work as a profile keeps it (overhead.host_work; treeopt.hostwork counts it)
HOST_FIELDS = ("outside_ops_per_step", "forward_ops_per_step", "syncs_per_step")
BATCH_MAX_ROWS = 256  # default batch grid: B·L above this is extrapolated, not measured

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


# ---- fit ------------------------------------------------------------------------------
def batches(profile: dict) -> list[int]:
    """The batch sizes a profile measured (points without `batch` are B = 1)."""
    return sorted({int(p.get("batch", 1)) for p in profile["points"]})


def require_batches(profile: dict, sizes) -> None:
    """BadInput naming the batch sizes a profile has no points for (never a silent guess)."""
    missing = sorted(set(sizes) - set(batches(profile)))
    if missing:
        miss = ", ".join(map(str, missing))
        raise BadInput(f"the profile has no points at batch size {miss} (measured: "
                       f"{', '.join(map(str, batches(profile)))}); measure them with "
                       f"`treeopt profile --batch {miss.replace(' ', '')}` or simulate them")


class Latency:
    """Monotone t(L, C) at one batch size B from a profile's points (+ the per-step
    overhead if asked); L is each sequence's input length, the forward runs B·L tokens."""

    def __init__(self, profile: dict, with_overhead: bool = True, batch: int = 1):
        by_ctx: dict[int, list[tuple[int, float]]] = {}
        for p in profile["points"]:
            if int(p.get("batch", 1)) == batch:
                by_ctx.setdefault(int(p["context"]), []).append((int(p["size"]),
                                                                p["median_s"]))
        if not by_ctx:
            require_batches(profile, [batch])
            raise BadInput("profile has no points")
        self.batch = batch
        self.contexts = sorted(by_ctx)
        self.curves = {}
        for c in self.contexts:
            pts = sorted(by_ctx[c])
            xs = np.array([x for x, _ in pts], dtype=float)
            ys = isotonic_regression(np.array([y for _, y in pts])).x
            self.curves[c] = (xs, ys)
        over = profile.get("overhead") or {}
        # per step: the runtime's own overhead (B = 1), or per live sequence (batched)
        per_seq = (over.get("batched") or {}).get("per_sequence_s") or {}
        self.overhead = float(over.get("per_step_s", 0.0)) if batch == 1 else \
            batch * float(per_seq.get("tree", 0.0))
        self.overhead_plain = self.overhead if batch == 1 else \
            batch * float(per_seq.get("plain", 0.0))
        if not with_overhead:
            self.overhead = self.overhead_plain = 0.0

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
        return t + np.where(sizes <= 1, self.overhead_plain, self.overhead)

    def knee(self, context: int | None = None, factor: float = 1.1, max_size: int = 4096) -> int:
        """Largest L with t(L) ≤ factor·t(1)."""
        sizes = np.arange(1, max_size + 1)
        t = self(sizes, context) - np.where(sizes <= 1, self.overhead_plain, self.overhead)
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
    check_fields(obj, {"model": "str", "dtype": "str", "device": "obj", "?device_id": "str",
                       "?kernels": "str"}, where)
    if not isinstance(obj["points"], list) or not obj["points"]:
        raise BadInput(f"{where}: field 'points' must be a non-empty list")
    for i, p in enumerate(obj["points"]):
        for f in ("context", "size", "median_s"):
            if not isinstance(p, dict) or not finite(p.get(f)):
                raise BadInput(f"{where}: points[{i}].{f} missing or not a finite number")
        if p["median_s"] <= 0 or p["size"] < 1 or p["context"] < 0:
            raise BadInput(f"{where}: points[{i}] has a non-positive size or time")
        b = p.get("batch", 1)
        if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
            raise BadInput(f"{where}: points[{i}].batch must be an integer ≥ 1")
    over = obj.get("overhead")
    if over is not None and not (isinstance(over, dict) and finite(over.get("per_step_s", 0.0))
                                 and over.get("per_step_s", 0.0) >= 0):
        raise BadInput(f"{where}: overhead.per_step_s must be a finite number ≥ 0")
    per_seq = ((over or {}).get("batched") or {}).get("per_sequence_s", {})
    if not isinstance(per_seq, dict) or not all(finite(v) and v >= 0 for v in per_seq.values()):
        raise BadInput(f"{where}: overhead.batched.per_sequence_s must map to finite "
                       "numbers ≥ 0")
    host = (over or {}).get("host_work", {})
    if not (isinstance(host, dict) and all(
            isinstance(h, dict) and all(finite(h.get(f)) and h[f] >= 0 for f in HOST_FIELDS)
            for h in host.values())):
        raise BadInput(f"{where}: overhead.host_work must map to objects of finite numbers "
                       f"≥ 0 ({', '.join(HOST_FIELDS)})")
    if not isinstance(obj["device"], dict):
        raise BadInput(f"{where}: field 'device' must be an object")


# ---- roofline -------------------------------------------------------------------------
def model_shape(model: str | None) -> tuple[str, dict]:
    """(name, shape) from a config.json folder or the known-model table."""
    if model and pathlib.Path(model).is_dir():
        cfg_path = pathlib.Path(model) / "config.json"
        if not cfg_path.is_file():
            raise BadInput(f"--model {model}: no config.json")
        cfg = read_json(cfg_path, "model config")
        cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        need = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "vocab_size")
        bad = [k for k in need if not (finite(cfg.get(k)) and cfg[k] >= 1)]
        if bad:
            raise BadInput(f"--model {model}: config.json lacks {', '.join(bad)}")
        return pathlib.Path(model).resolve().name, cfg
    canon = known_model(model or "default")
    if canon is None:
        raise BadInput(f"--model {model}: unknown model (known: {', '.join(KNOWN_MODELS)}) "
                       "and not a folder with config.json")
    return canon, KNOWN_MODELS[canon]["config"]


def roofline(shape: dict, size: int, context: int, bytes_per_param: float, tflops: float,
             bandwidth_gbs: float, memory_efficiency: float, compute_efficiency: float,
             kernel_overhead_s_per_layer: float, attention_efficiency: float | None = None,
             overlap: float = 1.0, batch: int = 1) -> dict:
    """Predicted seconds for one forward of `batch` sequences × `size` tokens, each on its
    own `context`-token KV cache (weights are read once per forward, KV traffic ∝ B·C,
    FLOPs ∝ B·L).

    t = layers·launch + max(t_c, t_m) + (1 − overlap)·min(t_c, t_m), with
    t_c = 2·(non-embedding params + LM head)·B·L / (peak·eff_c)
        + 4·layers·heads·head_dim·B·L·(C + L) / (peak·eff_attn)   (attention scores, values)
    t_m = (weights + B KV caches of C + L tokens) bytes / (bandwidth·eff_m), read once.
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
    dense = 2 * params * size * batch
    attn = 4 * n_l * heads * hd * size * (context + size) * batch
    kv_bytes = 2 * n_l * kv * hd * (context + size) * bytes_per_param * batch
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
             factors: dict | None = None, batch_sizes: list[int] | None = None) -> dict:
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
    for b in batch_sizes or [1]:
        for c in [c for c in contexts if c < max_ctx] or [min(contexts[0], max_ctx - 1)]:
            for s in sizes:
                r = roofline(shape, s, c, bpp, spec["tflops"], spec["bandwidth_gbs"], **f,
                             batch=b)
                points.append({"batch": b, "context": c, "size": s, "median_s": r["seconds"],
                               "p10_s": r["seconds"], "p90_s": r["seconds"], "n": 0,
                               "bound": r["bound"]})
    return {
        "schema": SCHEMA, "model": name, "dtype": dt, "simulated": True,
        "device": {"kind": "simulated-gpu", "name": spec["name"], "id": key,
                   "peak_tflops": spec["tflops"], "bandwidth_gbs": spec["bandwidth_gbs"]},
        "device_id": f"sim-{key}", **stamp(),
        "points": points, "overhead": {"per_step_s": 0.0, "fraction": 0.0},
        "assumptions": {
            "model": "t = layers·launch + max(t_c, t_m) + (1 − overlap)·min(t_c, t_m); "
                     "t_c = dense FLOPs/(peak·eff_c) + attention FLOPs/(peak·eff_attn), "
                     "t_m = bytes/(bandwidth·eff_m)",
            "flops": "dense 2·params·B·L, attention 4·layers·heads·head_dim·B·L·(C+L)",
            "bytes": "all weights (incl. LM head) + B KV caches of C+L tokens, once per "
                     "forward",
            "bytes_per_param": bpp, "shape": shape, **f, "factors_source": source,
            "not_modelled": "kernel fusion, tensor-parallelism, quantization, the runtime's "
                            "per-step overhead (set to 0)"},
    }


# ---- roofline calibration ---------------------------------------------------------------
FITTED = ("memory_efficiency", "compute_efficiency", "attention_efficiency",
          "kernel_overhead_s_per_layer", "overlap")


def calibrate(points: list[dict], shape: dict, bytes_per_param: float, tflops: float,
              bandwidth_gbs: float) -> dict:
    """Fit the roofline's factors (memory, compute and attention efficiency, launch cost
    per layer, compute/memory overlap) to measured points by least squares on log time
    (scipy); returns the factors and the fit's relative error."""
    pts = [(int(p["size"]), int(p["context"]), float(p["median_s"]), int(p.get("batch", 1)))
           for p in points]
    if len(pts) < len(FITTED):
        raise BadInput(f"calibration needs at least {len(FITTED)} measured points")
    meas = np.array([p[2] for p in pts])

    def predict(x):
        f = dict(zip(FITTED, (float(v) for v in x)))
        return np.array([roofline(shape, s, c, bytes_per_param, tflops, bandwidth_gbs,
                                  **f, batch=b)["seconds"] for s, c, _, b in pts]), f

    x0 = [ROOFLINE_DEFAULTS[f] for f in FITTED[:3]] + [1e-5, 0.5]  # launch, overlap: mid-range
    fit = least_squares(lambda x: np.log(predict(x)[0] / meas), x0,
                        bounds=([1e-3, 1e-3, 1e-4, 0.0, 0.0], [4.0, 4.0, 4.0, 1e-2, 1.0]),
                        x_scale=[0.1, 0.1, 0.1, 1e-5, 0.1], loss="soft_l1", f_scale=0.1)
    pred, factors = predict(fit.x)
    rel = np.abs(pred / meas - 1)
    return {"factors": factors, "peak_tflops": tflops, "bandwidth_gbs": bandwidth_gbs,
            "bytes_per_param": bytes_per_param, "points": len(pts),
            "median_rel_error": float(np.median(rel)), "max_rel_error": float(rel.max())}


DRIFT_WARN = 0.05  # sweep spread above which `profile` warns


def sweep_spread(points: list[dict]) -> float | None:
    """Median over points of (slowest sweep median / fastest − 1): how much the machine's
    speed moved while it was profiled. None for single-sweep profiles."""
    r = [max(p["round_medians_s"]) / min(p["round_medians_s"]) - 1 for p in points
         if len(p.get("round_medians_s", [])) > 1]
    return round(float(np.median(r)), 4) if r else None




def kernels_of(prof: dict) -> str:
    """The kernels that timed a profile's points (:mod:`treeopt.engine.kernels`); a
    profile made before the engine packed any says none: the stock ones."""
    return prof.get("kernels", "stock")


def summary(prof: dict) -> dict:
    """The headline figures of a profile: knee and t(1) per context, overhead, fit, drift."""
    lat = Latency(prof, with_overhead=False)
    out = {"model": prof["model"], "dtype": prof["dtype"], "device": prof["device"]["name"],
           "kernels": kernels_of(prof), "simulated": prof["simulated"],
           "points": len(prof["points"]),
           "knee": {str(c): lat.knee(c) for c in lat.contexts},
           "t1_ms": {str(c): round(1000 * float(lat([1], c)[0]), 3) for c in lat.contexts},
           "t_ms_first_context": {str(s): round(1000 * float(lat([s], lat.contexts[0])[0]), 3)
                                  for s in (1, 8, 16, 32, 64, 128)},
           "overhead_s": prof["overhead"]["per_step_s"]}
    if "host_work" in prof["overhead"]:
        out["host_work"] = prof["overhead"]["host_work"]
    if "roofline" in prof:
        out["roofline"] = prof["roofline"]
    sizes = batches(prof)
    if sizes != [1]:
        c0 = lat.contexts[0]
        out["batches"] = sizes
        out["t_ms_by_batch"] = {  # context c0: t(B, L) for L = 1, 8
            str(b): {str(s): round(1000 * float(Latency(prof, False, b)([s], c0)[0]), 3)
                     for s in (1, 8)} for b in sizes}
    spread = sweep_spread(prof["points"])
    if spread is not None:
        out["sweep_spread"] = spread
    return out
