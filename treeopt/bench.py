"""PPD vs HF greedy `generate` (and the plain loop), interleaved, over a prompt set.

For every prompt whose PPD output differs from HF greedy, the first differing position and
HF's logit margin there (logit of HF's token minus logit of PPD's token, recomputed with
one plain forward over the shared prefix) are recorded. A divergence is *explained* only
when that margin is below the dtype's tolerance (:data:`MARGIN_TOLERANCE`): a tree forward
and a one-token forward sum in different orders, so a near-tie can flip the argmax.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

from .artefact import write_json
from .cliutil import add_model_args, positive_int, progress, say
from .errors import BadInput

HELP = "benchmark PPD against HF generate over a prompt set"

# Largest logit margin a reduction-order difference can explain, per dtype. Measured by
# `python benchmarks/logit_noise.py --dtype D` (max |tree-forward logit − one-token-forward
# logit| at the same position over 8 prompts × 64 tokens, ~470 rows, SmolLM2-135M on this
# CPU): float32 1.2e-4, bfloat16 1.75, float16 0.21. A margin is the difference of two
# logits, so it can be off by twice that: bfloat16 3.5, float16 0.43. float32 gets no
# tolerance (its outputs must be identical outright).
MARGIN_TOLERANCE = {"float32": 0.0, "bfloat16": 3.5, "float16": 0.43}


def add_arguments(p) -> None:
    add_model_args(p)
    p.add_argument("--prompts", help="JSONL prompt file (default: a small built-in set)")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts")
    p.add_argument("--offset", type=int, default=0, help="skip the first N prompts")
    p.add_argument("--stride", type=positive_int, default=1,
                   help="take every N-th prompt (spreads --limit over a file's categories)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain greedy loop")
    p.add_argument("--profile", help="latency profile for the predicted figures (default: the "
                   "measured profile for this device and dtype)")
    p.add_argument("--acceptance", help="acceptance file for the predicted figures (default: "
                   "the one the tree was searched with, else the shipped one)")
    p.add_argument("--out", help="run JSON path (default: reports/<device>__<model>.run.json)")


@torch.inference_mode()
def logit_margin(dec, ids: list[int], ref: list[int], other: list[int]) -> dict | None:
    """First position where `other` departs from `ref`, and ref's logit margin there."""
    pos = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    if pos is None:
        return None  # one is a prefix of the other (different stopping), no token flip
    seq = torch.tensor(ids + ref[:pos], device=dec.device)
    logits = dec.logits(dec.forward(dec.embed(seq), dec.new_cache(),
                                    torch.arange(len(seq), device=dec.device))[-1])
    margin = float(logits[ref[pos]] - logits[other[pos]])
    return {"position": pos, "hf_token": ref[pos], "ppd_token": other[pos],
            "margin": round(margin, 6)}


def run_bench(dec, encoded: list[list[int]], max_new_tokens: int, dtype: str,
              plain: bool = True, quiet: bool = False) -> dict:
    tol = MARGIN_TOLERANCE.get(dtype, 0.0)
    # burn-in: first calls pay for allocator warm-up and lazy init
    dec.ppd(encoded[0], 8)
    dec.hf_generate(encoded[0], 8)
    per_prompt, ppd_runs, base_runs = [], [], []
    ppd_tok = ppd_sec = hf_tok = hf_sec = base_tok = base_sec = 0.0
    steps = fwd = step = 0.0
    for i, ids in enumerate(progress(encoded, "bench", quiet=quiet)):
        r = dec.ppd(ids, max_new_tokens)  # A
        h = dec.hf_generate(ids, max_new_tokens)  # B
        ppd_runs.append((len(ids), r))
        row = {"prompt": i, "prompt_tokens": len(ids), "new_tokens": r.new_tokens,
               "steps": r.steps, "tokens_per_step": round(r.tokens_per_step, 4),
               "tokens_per_second": round(r.tokens_per_second, 3),
               "hf_new_tokens": h.new_tokens,
               "hf_tokens_per_second": round(h.tokens_per_second, 3),
               "speedup_vs_hf": round(r.tokens_per_second / h.tokens_per_second, 4),
               "identical": r.output_ids == h.output_ids}
        if plain:
            b = dec.baseline(ids, max_new_tokens)  # C
            base_runs.append((len(ids), b))
            row["baseline_tokens_per_second"] = round(b.tokens_per_second, 3)
            row["baseline_identical"] = b.output_ids == h.output_ids
            base_tok += b.new_tokens
            base_sec += b.seconds
        if not row["identical"]:
            div = logit_margin(dec, ids, h.output_ids, r.output_ids)
            if div is not None:
                div["explained"] = div["margin"] <= tol
            row["divergence"] = div
        per_prompt.append(row)
        ppd_tok += r.new_tokens
        ppd_sec += r.seconds
        hf_tok += h.new_tokens
        hf_sec += h.seconds
        steps += r.steps
        fwd += sum(r.forward_seconds)
        step += sum(r.step_seconds)
    unexplained = sum(1 for row in per_prompt
                      if not row["identical"] and not (row.get("divergence") or {}).get("explained"))
    out = {
        "prompts": len(per_prompt),
        "max_new_tokens": max_new_tokens,
        "new_tokens": int(ppd_tok),
        "tokens_per_step": round(ppd_tok / steps, 4),
        "tokens_per_second": round(ppd_tok / ppd_sec, 3),
        "hf_tokens_per_second": round(hf_tok / hf_sec, 3),
        "speedup_vs_hf": round((ppd_tok / ppd_sec) / (hf_tok / hf_sec), 4),
        "median_speedup_vs_hf": round(statistics.median(r["speedup_vs_hf"] for r in per_prompt), 4),
        "identical_fraction": round(sum(r["identical"] for r in per_prompt) / len(per_prompt), 4),
        "unexplained_divergences": unexplained,
        "margin_tolerance": tol,
        "step_overhead_fraction": round((step - fwd) / fwd, 4) if fwd else None,
        "decode": decode_phase(ppd_runs),
        "per_prompt": per_prompt,
    }
    if plain:
        out["baseline_tokens_per_second"] = round(base_tok / base_sec, 3)
        out["baseline_vs_hf"] = round((base_tok / base_sec) / (hf_tok / hf_sec), 4)
        out["baseline_decode"] = decode_phase(base_runs)
    return out


def decode_phase(runs: list[tuple[int, object]]) -> dict:
    """Steady-state decoding over (prompt length, Result) pairs: what the search's
    objective models. Prefill is left out, and so is each decode's last step (cut short by
    --max-new-tokens or an EOS, it emits fewer tokens than it accepted). `context` is the
    mean KV length the counted steps attended to."""
    tokens = steps = 0
    seconds = ctx_sum = 0.0
    for prompt_len, r in runs:
        full = len(r.accepted) - (r.finish_reason != "context")
        ctx = prompt_len
        for a, sec in zip(r.accepted[:full], r.step_seconds[:full]):
            tokens, steps, seconds, ctx_sum = tokens + a, steps + 1, seconds + sec, ctx_sum + ctx
            ctx += a
    if not steps:
        return {"steps": 0}
    return {"steps": steps, "tokens_per_step": round(tokens / steps, 4),
            "step_seconds": round(seconds / steps, 6),
            "tokens_per_second": round(tokens / seconds, 3), "context": round(ctx_sum / steps)}


def prediction_inputs(tree, model_id: str, device_type: str, dtype: str,
                      profile_path: str | None = None,
                      acceptance_path: str | None = None) -> dict | None:
    """The profile and acceptance file to predict the benched tree with: the ones given,
    else this device's measured profile for the dtype and the acceptance file the tree was
    searched with (else the shipped one). A given file for another model is bad input;
    None when either is missing."""
    from . import accept, shipped
    from . import profile as prof_mod
    from .models import canonical_model

    meta = tree.meta or {}
    if profile_path is None:
        profile_path = shipped.stored_path(
            shipped.profile_path(shipped.device_slug(device_type), model_id, dtype))
    if acceptance_path is None:
        cand = [meta.get("acceptance"), shipped.acceptance_path(model_id)]
        acceptance_path = next(filter(None, map(shipped.stored_path, cand)), None)
    if profile_path is None or acceptance_path is None:
        return None
    prof, acc = prof_mod.load(profile_path), accept.load(acceptance_path)
    for what, obj, path in (("profile", prof, profile_path), ("acceptance", acc, acceptance_path)):
        if canonical_model(obj["model"]) != canonical_model(model_id):
            raise BadInput(f"--{what} {path} is for {obj['model']}, the benched model is "
                           f"{model_id}")
    return {"profile": prof, "profile_path": shipped.display_path(profile_path),
            "acceptance": acc, "acceptance_path": shipped.display_path(acceptance_path)}


def predicted_vs_measured(tree, res: dict, inputs: dict | None) -> dict | None:
    """The search's prediction for the benched tree at the bench's mean context, beside the
    measured decode phase. `speed_vs_profile` is this run's plain-loop step time over the
    profile's measured one-token forward at that context (1.0 = the machine runs as fast
    as when profiled); the prediction scaled by it separates model error from machine
    drift. None without the inputs (see :func:`prediction_inputs`)."""
    from . import accept, search
    from . import profile as prof_mod

    dec_m = res.get("decode", {})
    if inputs is None or not dec_m.get("steps"):
        return None
    prof = inputs["profile"]
    conditional = ((tree.meta or {}).get("config") or {}).get("conditional", True)
    acc, pp = accept.search_inputs(inputs["acceptance"], conditional=conditional)
    lat = prof_mod.Latency(prof)
    ctx = dec_m["context"]
    pred = search.predict(tree, acc, lambda L: lat(L, ctx), path_prob=pp)
    out = {"profile": inputs["profile_path"], "acceptance": inputs["acceptance_path"],
           "context": ctx, "tokens_per_step": round(pred["tokens_per_step"], 4),
           "step_seconds": round(pred["step_seconds"], 6),
           "tokens_per_second": round(pred["tokens_per_second"], 3),
           "error": {k: round(pred[k] / dec_m[k] - 1, 4)
                     for k in ("tokens_per_step", "step_seconds", "tokens_per_second")}}
    base = res.get("baseline_decode", {})
    ones = sorted((p["context"], p["median_s"]) for p in prof["points"] if p["size"] == 1)
    if base.get("steps") and ones:
        # the measured one-token forward itself (not the monotone fit, which pools it with
        # L = 2.. where a one-query attention happens to run slower than two)
        t1 = float(np.interp(base["context"], *zip(*ones)))
        speed = base["step_seconds"] / t1
        out["speed_vs_profile"] = round(speed, 4)
        out["tokens_per_second_at_run_speed"] = round(pred["tokens_per_second"] / speed, 3)
        out["error"]["tokens_per_second_at_run_speed"] = round(
            pred["tokens_per_second"] / speed / dec_m["tokens_per_second"] - 1, 4)
    return out


def main(args) -> dict:
    from . import prompts, shipped
    from .runtime import open_decoder

    texts = prompts.load(args.prompts, args.limit, args.offset, args.stride)
    dec, info = open_decoder(args.model, args.dtype, args.device, args.tree, args.prompt_tokens,
                             args.threads)
    encoded = [prompts.encode(dec.lm.tokenizer, t, raw=args.raw) for t in texts]
    for i, ids in enumerate(encoded):
        try:
            dec.check_prompt(ids, args.max_new_tokens)
        except BadInput as e:
            raise BadInput(f"prompt {i}: {e}") from e
    # read before the bench, so that a bad file fails in seconds, not after it
    inputs = prediction_inputs(dec.tree, info["model"], dec.device.type, info["dtype"],
                               args.profile, args.acceptance)
    human = not args.json
    if human:
        say(f"bench: {len(encoded)} prompts, {args.max_new_tokens} new tokens, model "
            f"{info['model']} ({info['dtype']}), tree {info['tree']}")
    res = run_bench(dec, encoded, args.max_new_tokens, info["dtype"], not args.no_baseline)
    out = {"schema": "treeopt.run/1", "kind": "bench", **info,
           "prompt_file": args.prompts or "built-in", "offset": args.offset,
           "stride": args.stride, **res}
    pred = predicted_vs_measured(dec.tree, res, inputs)
    if pred:
        out["predicted"] = pred
    path = args.out or \
        shipped.REPORTS / f"{shipped.device_slug(dec.device.type)}__{info['model']}.run.json"
    write_json(path, out)
    if human:
        say(f"PPD {out['tokens_per_second']:.1f} tok/s vs HF generate "
            f"{out['hf_tokens_per_second']:.1f} tok/s: speedup {out['speedup_vs_hf']:.2f}x "
            f"(median per prompt {out['median_speedup_vs_hf']:.2f}x)")
        if "baseline_vs_hf" in out:
            say(f"plain greedy loop {out['baseline_tokens_per_second']:.1f} tok/s "
                f"({out['baseline_vs_hf']:.2f}x HF generate)")
        say(f"tokens/step {out['tokens_per_step']:.2f}; per-step overhead "
            f"{100 * out['step_overhead_fraction']:.1f}% of the forward; identical outputs "
            f"{100 * out['identical_fraction']:.0f}%; unexplained divergences "
            f"{out['unexplained_divergences']}")
        if pred:
            d, e = out["decode"], pred["error"]
            say(f"decode phase: predicted {pred['tokens_per_step']:.3f} tok/step, "
                f"{1000 * pred['step_seconds']:.2f} ms/step, {pred['tokens_per_second']:.1f} "
                f"tok/s vs measured {d['tokens_per_step']:.3f}, {1000 * d['step_seconds']:.2f} "
                f"ms, {d['tokens_per_second']:.1f} (error {100 * e['tokens_per_second']:+.1f}%)")
            if "speed_vs_profile" in pred:
                say(f"this run's plain step is {pred['speed_vs_profile']:.3f}x the profile's "
                    f"t(1); at this speed predicted {pred['tokens_per_second_at_run_speed']:.1f} "
                    f"tok/s (error {100 * e['tokens_per_second_at_run_speed']:+.1f}%)")
        else:
            say("no profile or acceptance file for this device: no predicted figures")
        say(f"wrote {path}")
    return out
