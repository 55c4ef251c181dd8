"""Timing forwards on the local device: the profile grid, the runtime's per-step overhead
and the device's attainable ceilings (nanoGPT bench.py style: burn-in, then timed runs
with a synchronize around each; CUDA events on GPUs, perf_counter on CPUs).

Shape of the measurement: each point (B, C, L) is one step of the decode engine
(:meth:`treeopt.engine.Engine.timed_step`): B sequences whose contexts hold C tokens in
the engine's KV store, plans of L inputs loaded, the step (decoder + LM head on all L rows,
verification; a CUDA graph replay on a GPU), the one read-back, the contexts put back —
repeated until the median is stable (or the point's budget is spent). The grid is swept
in rounds, so drift shifts every point alike.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import numpy as np
import torch

from . import prompts
from .artefact import stamp
from .batch import BatchDecoder
from .device import cpu_facts, device_slug, gpu_clocks, gpu_facts
from .errors import BadInput, is_oom
from .hostwork import per_step
from .latency import FITTED, HOST_FIELDS, SCHEMA, calibrate, kernels_of
from .models import dtype_name
from .progress import progress
from .engine import Engine
from .runtime import Decoder
from .tree import Tree

class Timer:
    """perf_counter on CPU; CUDA events + synchronize on GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
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


def measure_points(dec: Decoder, sizes: list[int], contexts: list[int], repeats: int, budget: float,
                   done: dict | None = None, quiet: bool = False, rounds: int = 1,
                   batch_sizes: tuple[int, ...] = (1,),
                   max_rows: int | None = None) -> tuple[list[dict], dict]:
    """Time one engine step per (batch, context, size): B sequences, each with its own
    C-token context and L new tokens, exactly as the decode loop runs a step (plan rows
    loaded, the step — one CUDA graph replay on a GPU —, the one read-back), so the
    search's cost model is the runtime's. Returns points and {context: largest size that fit} for contexts
    where a size ran out of memory. `max_rows` skips points with B·L above it (the fit
    extrapolates them with its last slope).

    With rounds > 1 the grid is swept that many times, each point getting its share of
    `repeats` and `budget` per sweep, and a point's median is over all its sweeps: a
    machine whose speed drifts while profiling then shifts every point alike instead of
    bending the curve t(L)."""
    done = done or {}
    timer = Timer(dec.device)
    samples: dict[tuple[int, int, int], list[float]] = {}
    sweeps: dict[tuple[int, int, int], list[float]] = {}  # per-sweep medians: drift seen
    max_fit: dict[tuple[int, int], int] = {}
    modes: dict[tuple[int, int, int], str] = {}
    todo = [(r, b, c, s) for r in range(rounds) for b in batch_sizes for c in contexts
            for s in sizes if (b, c, s) not in done and not (max_rows and b * s > max_rows)]
    share, share_budget = max(1, math.ceil(repeats / rounds)), budget / rounds
    bar = progress(todo, "profile", quiet=quiet)
    # the engine's own step (a graph replay on CUDA) with room for the longest input
    new_engine = functools.partial(Engine, dec.lm, None, {1: None},
                                   **{**dec.engine_options, "room": max(sizes)})
    engine = new_engine()
    for r, b, c, s in bar:
        if (b, c) in max_fit and s > max_fit[(b, c)]:
            continue
        try:
            step = engine.timed_step(b, s, c)
            got = stable_samples(timer, step, share, share_budget, burn_in=5 if r == 0 else 2,
                                 min_runs=min(10, share))
            samples.setdefault((b, c, s), []).extend(got)
            sweeps.setdefault((b, c, s), []).append(float(np.median(got)))
            modes[(b, c, s)] = engine.graphs.mode()  # graphed, or eager and why
        except Exception as e:  # noqa: BLE001 - OOM → record and stop this context
            if not is_oom(e):
                raise
            engine = new_engine()
            torch.cuda.empty_cache()
            max_fit[(b, c)] = max((x for (bb, cc, x) in samples if (bb, cc) == (b, c)
                                   and x < s), default=0)
            continue
        ms = 1000 * float(np.median(samples[(b, c, s)]))
        bar.set_postfix(round=r + 1, B=b, C=c, L=s, ms=f"{ms:.1f}")
    points = []
    for key in [(b, c, s) for b in batch_sizes for c in contexts for s in sizes]:
        b, c, s = key
        if key in done:
            points.append(done[key])
        elif key in samples and not ((b, c) in max_fit and s > max_fit[(b, c)]):
            extra = {"rounds": rounds, "round_medians_s": sweeps[key]} if rounds > 1 else {}
            points.append({"batch": b, "context": c, "size": s, **summarize(samples[key]),
                           "graphs": modes[key], **extra})
    return points, {(c if b == 1 else (b, c)): s for (b, c), s in max_fit.items()}


def _probe_prompt(dec) -> list[int]:
    """The one real prompt the overhead measurements decode."""
    return prompts.encode(dec.lm.tokenizer, prompts.BUILTIN[0]) if dec.lm.tokenizer \
        else [1] * 16


def measure_overhead(dec, sizes=(4, 16, 32), new_tokens: int = 48, quiet: bool = False) -> dict:
    """Runtime per-step overhead: full PPD step time minus its forward time (trees of a few
    sizes, one real prompt), and the host work of a plain step and of the largest tree's
    step, counted (`host_work`: on a GPU the ops a graph replay removes)."""
    ids = _probe_prompt(dec)
    saved = (dec.tree, dec.prompt_tokens)
    rows, host = [], {}
    k = dec.prompt_tokens.num
    for s in progress(sizes, "overhead", quiet=quiet):
        width = max(1, (s - 1 - k) // (1 + k))  # a static star of depth-1 nodes
        tree = Tree.static([[r] for r in range(width)], k, topk=max(10, width))
        dec.set_tree(tree, dec.prompt_tokens)
        dec.ppd(ids, 8)
        res = dec.ppd(ids, new_tokens, timed=True)
        over = [a - b for a, b in zip(res.step_seconds, res.forward_seconds)]
        rows.append({"input_length": tree.input_length(k),
                     "overhead_s": float(statistics.median(over)),
                     "forward_s": float(statistics.median(res.forward_seconds))})
        if s == max(sizes):  # the host work of this step, counted (ops, syncs)
            plain, ppd = decode_host_work(dec, ids, 16)
            host = {"plain": _host(plain), f"tree of {tree.input_length(k)}": _host(ppd)}
    dec.set_tree(*saved)
    return {"per_step_s": float(statistics.median(r["overhead_s"] for r in rows)),
            "fraction": float(statistics.median(r["overhead_s"] / r["forward_s"] for r in rows)),
            "by_size": rows, "host_work": host}


def decode_host_work(dec: Decoder, ids: list[int], tokens: int) -> tuple[dict, dict]:
    """Host work per step (:func:`treeopt.hostwork.per_step`) of the decoder's plain loop
    and of its tree, one sequence, `tokens` new tokens."""
    return (per_step(dec.model, lambda n: dec.baseline(ids, n).steps, tokens),
            per_step(dec.model, lambda n: dec.ppd(ids, n, learn=False).steps, tokens))


def _host(counts: dict) -> dict:
    """A step's host work as the profile keeps it: ops dispatched outside the model's
    forward and inside it, device→host syncs (:func:`treeopt.hostwork.per_step`)."""
    return {k: round(counts[k], 2) for k in HOST_FIELDS}


def measure_batch_overhead(dec, batch: int = 8, new_tokens: int = 24,
                           quiet: bool = False) -> dict:
    """The batched runtime's per-step overhead per live sequence (step time minus forward
    time, over the live count), for plain steps and for tree steps: the part of a batched
    step a forward profile does not see, and which grows with B."""
    ids = _probe_prompt(dec)
    k = dec.prompt_tokens.num
    out = {}
    for name, tree in progress([("plain", None), ("tree", Tree.static([[0], [1]], k))],
                               "batch overhead", quiet=quiet):
        bd = BatchDecoder(dec.lm, dec.prompt_tokens, {1: tree})
        bd.generate([ids] * 2, 4)
        res = bd.generate([ids] * batch, new_tokens, timed=True)
        over = [(s - f) / n for s, f, n in zip(res.step_seconds, res.forward_seconds,
                                               res.live)]
        out[name] = float(statistics.median(over))
    return {"per_sequence_s": out, "batch": batch}


def measure_ceilings(device, dtype, seconds: float = 1.0) -> dict:
    """This device's attainable ceilings, measured (not from a data sheet): dense matmul
    TFLOP/s in `dtype` (n×n GEMMs, best of several) and memory GB/s (a 256 MiB copy,
    bytes read + written, best of several). The roofline's efficiencies fitted against a
    measured profile are fractions of these."""
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




def measure_profile(dec: Decoder, sizes: list[int], contexts: list[int], repeats: int = 30,
                    budget: float = 6.0, rounds: int = 3, reuse: dict | None = None,
                    overhead: bool = True, quiet: bool = False,
                    batch_sizes: tuple[int, ...] = (1,), max_rows: int | None = None) -> dict:
    """A measured profile artefact: the grid's points, the per-step overhead, the
    device's ceilings and facts, and the roofline fitted to the points. `reuse` is an
    earlier profile of the same model and dtype whose points are kept (resume)."""
    model_id, dtype = dec.lm.model_id, dtype_name(dec.dtype)
    kernels = dec.engine(plain=True).kernels.name
    done, kept = {}, {}
    if reuse:
        if reuse["model"] != model_id or reuse["dtype"] != dtype:
            raise BadInput(f"resume: the profile is for {reuse['model']}/{reuse['dtype']}, "
                           f"not {model_id}/{dtype}")
        if kernels_of(reuse) != kernels:
            raise BadInput(f"resume: the profile's points were timed with "
                           f"{kernels_of(reuse)} kernels, this engine runs {kernels} "
                           "(profile again without --resume)")
        done = {(p.get("batch", 1), p["context"], p["size"]): p for p in reuse["points"]}
        kept = {k: reuse[k] for k in ("overhead", "ceilings", "command", "created", "seconds")
                if k in reuse}
    cuda = dec.device.type == "cuda"
    facts = gpu_facts() if cuda else cpu_facts(torch.get_num_threads())
    clocks_before = gpu_clocks() if cuda else None
    t0 = time.perf_counter()
    points, max_fit = measure_points(dec, sizes, contexts, repeats, budget, done, quiet, rounds,
                                     tuple(batch_sizes), max_rows)
    over = kept.get("overhead") or (measure_overhead(dec, quiet=quiet) if overhead else None)
    if over is not None and max(batch_sizes) > 1 and "batched" not in over:
        over["batched"] = measure_batch_overhead(dec, quiet=quiet)
    ceilings = kept.get("ceilings") or measure_ceilings(dec.device, dec.dtype)
    if clocks_before is not None:
        facts["clocks_before"], facts["clocks_after"] = clocks_before, gpu_clocks()
    prof = {"schema": SCHEMA, "model": model_id, "dtype": dtype, "kernels": kernels,
            "simulated": False,
            **({"weights": "random"} if dec.lm.weights == "random" else {}),
            "device": facts, "device_id": device_slug(dec.device.type), **stamp(),
            "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "points": points, "overhead": over or {"per_step_s": 0.0, "fraction": 0.0},
            "ceilings": ceilings}
    if len(points) >= len(FITTED):
        prof["roofline"] = calibrate(points, dec.lm.model.config.to_dict(), dec.dtype.itemsize,
                                     ceilings["peak_tflops"], ceilings["bandwidth_gbs"])
    if "command" in kept:  # keep who measured the reused points; say who updated them
        prof["updated_by"], prof["updated"] = prof["command"], prof["created"]
        prof["command"], prof["created"] = kept["command"], kept["created"]
        prof["seconds"] = round(prof["seconds"] + kept.get("seconds", 0.0), 1)
    if max_fit:
        prof["max_size_fit"] = {str(k) if isinstance(k, int) else f"{k[0]}x{k[1]}": s
                                for k, s in max_fit.items()}
    return prof
