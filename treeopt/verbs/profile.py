"""Measure forward latency vs tree size (and context length) on this GPU or CPU, or
simulate a GPU's by roofline → profile.json."""
from __future__ import annotations

import os

from .. import latency, paths
from ..artefact import check_out, write_json
from ..device import device_slug, gpu_check
from ..errors import BadInput
from ..inputs import local_device, resolve_inputs
from .common import (add_batch_arg, add_model_args, bounded_list, finite_float, int_list,
                     positive_int, say, warn)

HELP = "measure forward latency vs tree size on this GPU or CPU (or simulate a GPU)"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="profile the local NVIDIA GPU")
    g.add_argument("--cpu", action="store_true", help="profile the CPU (default without GPU)")
    g.add_argument("--simulate", metavar="GPU",
                   help=f"predict a profile by roofline: {', '.join(latency.GPUS)}")
    p.add_argument("--calibration", metavar="PROFILE",
                   help="with --simulate: use the roofline factors fitted to this measured "
                        "profile (default: the built-in GPU factors)")
    p.add_argument("--peak-tflops", type=finite_float(0, open_lo=True),
                   help="with --simulate: override peak TFLOP/s")
    p.add_argument("--bandwidth-gbs", type=finite_float(0, open_lo=True),
                   help="with --simulate: override GB/s")
    p.add_argument("--sizes", type=int_list, help="comma list of input lengths "
                   "(default: dense small sizes)")
    p.add_argument("--contexts", type=bounded_list("context"), help="comma list of context lengths (default "
                   "64,128,512,2048 on a CPU, 128,512,2048 on a GPU)")
    add_batch_arg(p, "batch sizes: B sequences × L new tokens over per-sequence caches "
                  "(default 1; with --batch: sizes up to 48 with B·L ≤ 256, contexts "
                  "64,192,512, one round: 1,2,4,8,16 takes about 5 minutes on a CPU)")
    p.add_argument("--repeats", type=positive_int,
                   help="max timed runs per point (default 30; 12 with --batch)")
    p.add_argument("--rounds", type=positive_int,
                   help="sweeps over the grid (default 3; 1 with --batch); each point's "
                   "median spans them all, so a drifting machine shifts every point alike")
    p.add_argument("--budget-seconds", type=finite_float(0, open_lo=True),
                   help="time budget per point after burn-in (default 6; 2 with --batch)")
    p.add_argument("--resume", action="store_true", help="reuse points already in --out")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip measuring the runtime's per-step overhead")
    p.add_argument("--out", help="profile path (default: $TREEOPT_HOME/profiles/"
                   "<device>__<model>__<dtype>.json)")


def main(args) -> dict:
    if args.calibration and not args.simulate:
        raise BadInput("--calibration goes with --simulate")
    batched = args.batch is not None and args.batch != [1]
    args.repeats = args.repeats or (12 if batched else 30)
    args.rounds = args.rounds or (1 if batched else 3)
    args.budget_seconds = args.budget_seconds or (2.0 if batched else 6.0)
    if args.simulate:
        return _simulate(args)
    if args.gpu:
        gpu_check()
    device = "cuda" if args.gpu else "cpu" if args.cpu else args.device
    # torch loads only for a measured profile (--simulate needs no weights)
    from ..measure import measure_profile
    from ..runtime import open_decoder

    inp = resolve_inputs(args.model, prompt_tokens=args.prompt_tokens, device=device,
                         dtype=args.dtype)
    dev_type, dt = local_device(device, args.dtype)
    out = check_out(args.out or paths.user_profiles() / paths.profile_name(
        device_slug(dev_type), inp.model_id, dt))
    dec, info = open_decoder(inp, args.model, args.dtype, device, args.threads, shape_only=True)
    gpu = dec.device.type == "cuda"
    sizes = args.sizes or (latency.BATCH_SIZES if batched else
                           latency.GPU_SIZES if gpu else latency.CPU_SIZES)
    contexts = args.contexts or (latency.BATCH_CONTEXTS if batched else
                                 latency.CONTEXTS if gpu else latency.CPU_CONTEXTS)
    capped = [c for c in contexts if c + max(sizes) <= dec.lm.max_context]
    if not capped:
        raise BadInput(f"--contexts: every context + the largest size exceeds the model's "
                       f"context ({dec.lm.max_context})")
    reuse = latency.load(out) if args.resume and os.path.isfile(out) else None
    human = not args.json
    if human:
        say(f"profiling {info['model']} ({info['dtype']}"
            + (", random weights: shape only" if info.get("weights") == "random" else "")
            + f") on {dec.device}, {dec.engine(plain=True).kernels.name} kernels: "
            f"{len(sizes)} sizes × {len(capped)} contexts × {len({1, *(args.batch or [])})} "
            "batch sizes")
    prof = measure_profile(dec, sizes, capped, args.repeats, args.budget_seconds, args.rounds,
                           reuse, not args.no_overhead, quiet=not human,
                           batch_sizes=tuple(sorted({1, *(args.batch or [])})),
                           max_rows=latency.BATCH_MAX_ROWS if batched and not args.sizes
                           else None)
    write_json(out, prof)
    missing = sorted({1, *(args.batch or [])} - set(latency.batches(prof)))
    if missing:
        warn(f"warning: no point could be measured at batch size "
             f"{', '.join(map(str, missing))} (out of memory); the profile has none there")
    return _report(prof, out, human)


def _simulate(args) -> dict:
    factors = None
    if args.calibration:
        ref = latency.load(args.calibration)
        if "roofline" not in ref:
            raise BadInput(f"--calibration {args.calibration}: the profile has no fitted "
                           "roofline (measure it with `treeopt profile`)")
        factors = {**ref["roofline"]["factors"], "source": paths.display_path(args.calibration)}
    sizes = args.sizes or latency.GPU_SIZES
    prof = latency.simulate(args.simulate, args.model, args.dtype, sizes,
                            args.contexts or latency.CONTEXTS, args.peak_tflops,
                            args.bandwidth_gbs, factors, sorted({1, *(args.batch or [])}))
    out = args.out or paths.user_profiles() / paths.profile_name(prof["device_id"],
                                                                 prof["model"], prof["dtype"])
    check_out(out, [args.calibration])
    write_json(out, prof)
    return _report(prof, out, not args.json)


def _report(prof: dict, out, human: bool) -> dict:
    summary = {"out": str(out), **latency.summary(prof)}
    if not human:
        return summary
    say(f"wrote {out}")
    say(f"context {min(int(c) for c in summary['knee'])}: " + ", ".join(
        f"L={s}: {ms:.1f} ms" for s, ms in summary["t_ms_first_context"].items()))
    if "roofline" in prof:
        rf = prof["roofline"]
        f = rf["factors"]
        say(f"roofline fit ({rf['peak_tflops']:.2f} TFLOP/s, {rf['bandwidth_gbs']:.1f} GB/s "
            f"measured): memory efficiency {f['memory_efficiency']:.2f}, compute "
            f"{f['compute_efficiency']:.2f}, attention {f['attention_efficiency']:.2f}, "
            f"overlap {f['overlap']:.2f}, launch "
            f"{1e6 * f['kernel_overhead_s_per_layer']:.1f} µs/layer; error median "
            f"{100 * rf['median_rel_error']:.1f} %, max {100 * rf['max_rel_error']:.1f} %")
    spread = summary.get("sweep_spread")
    if spread is not None:
        say(f"drift between sweeps: a point's slowest sweep is {100 * spread:.1f} % above "
            "its fastest (median over points)")
        if spread > latency.DRIFT_WARN:
            warn(f"warning: the device's speed moved by more than {100 * latency.DRIFT_WARN:.0f}"
                " % while profiling (other load, clocks); tokens/s predicted from this "
                "profile carry that error — profile again on a quiet machine")
    say("knee (largest L with t(L) ≤ 1.1·t(1)): " +
        ", ".join(f"C={c}: {k}" for c, k in summary["knee"].items()))
    for what, h in summary.get("host_work", {}).items():
        say(f"host work a step, {what}: {h['outside_ops_per_step']:.0f} ops outside the "
            f"forward, {h['forward_ops_per_step']:.0f} inside, {h['syncs_per_step']:.2f} "
            "device→host syncs")
    for b, t in summary.get("t_ms_by_batch", {}).items():
        say(f"batch {b}: t(L=1) {t['1']:.1f} ms, t(L=8) {t['8']:.1f} ms per step "
            f"(plain decoding: {1000 * int(b) / t['1']:.0f} tokens/s)")
    return summary
