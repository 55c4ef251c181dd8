"""PPD vs HF greedy `generate` (and the plain loop), interleaved, over a prompt set."""
from __future__ import annotations

from .. import corpus, paths, prompts
from ..artefact import check_out, write_json
from ..device import device_slug, peak_memory
from ..errors import BadInput
from ..drift import assess, lines, speed_line
from ..evaluation import (adapt_line, batch_bench, batch_speed, decode_phase,
                          predicted_vs_measured, run_bench, speed_by_length, speed_vs_profile)
from ..inputs import local_device, resolve_inputs
from ..runtime import open_decoder
from .calibration import (add_calibrate_arg, keep_correction, keep_text, maybe_calibrate,
                          on_recent_text, recent_line)
from .common import (add_acceptance_arg, add_adapt_arg, add_batch_arg, add_cache_args,
                     add_model_args,
                     add_prompt_args, decode_notes, model_flag, nonneg_int, positive_int, say,
                     warn)

HELP = "benchmark PPD against HF generate over a prompt set"


def add_arguments(p) -> None:
    add_model_args(p)
    add_calibrate_arg(p)
    add_prompt_args(p, repeat="repeat it to bench each set as a prompt family (limit, "
                    "offset and stride apply to each)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain greedy loop")
    add_adapt_arg(p)
    p.add_argument("--hf-lookup", type=nonneg_int, default=0, metavar="K",
                   help="also run HF generate(prompt_lookup_num_tokens=K), the prompt-lookup "
                   "decoding users already have (0 = off)")
    add_batch_arg(p, "benchmark batched decoding instead: per batch size, the tree's "
                  "per-batch configuration vs the plain batched loop, HF generate batched and "
                  "one-at-a-time PPD, interleaved")
    p.add_argument("--hf-static", choices=("auto", "on", "off"), default="auto",
                   help="also bench HF generate on its static KV cache, which HF compiles "
                   "on a GPU (auto: on a GPU only)")
    p.add_argument("--profile", help="latency profile for the predicted figures (default: the "
                   "measured profile for this device and dtype)")
    add_acceptance_arg(p, "for the predicted figures (default: yours, else what the tree "
                       "was searched with, else the shipped one)")
    add_cache_args(p)
    p.add_argument("--out", help="run JSON path (default: $TREEOPT_HOME/reports/"
                   "<device>__<model>.run.json)")


def main(args) -> dict:
    sets = args.prompts or [None]
    if len(sets) > 1 and args.batch:
        raise BadInput("--batch benches one prompt set; give --prompts once")
    files = [s and prompts.resolve(s).resolve() for s in sets]
    names = [prompts.family_name(s) for s in sets]
    if len(set(files)) < len(sets) or len(set(names)) < len(sets):
        raise BadInput("--prompts: a prompt set is given twice (or two sets share the name "
                       f"{next(n for n in names if names.count(n) > 1)!r})")
    # every input is read before the model loads, so a bad file fails in seconds
    families = {s: prompts.load(s, args.limit, args.offset, args.stride) for s in sets}
    inp = resolve_inputs(args.model, args.profile, args.acceptance, args.tree,
                         args.prompt_tokens, args.device, args.dtype,
                         want=("tree", "profile", "acceptance", "corpus"), corpus=args.corpus)
    held = corpus.answered(inp.corpus, [t for ts in families.values() for t in ts]) \
        if inp.corpus else 0
    if held:  # the cache would propose the model's own answers to these very prompts
        warn(f"note: the corpus {inp.corpus_src} holds the answers to {held} of the benched "
             "prompts: the cache source's figures are not held out (bench other prompts, "
             "or --corpus none)")
    kind = ".batch" if args.batch else ".families" if len(sets) > 1 else ""
    out_path = check_out(args.out or paths.user_reports() / paths.run_name(
        device_slug(local_device(args.device, args.dtype)[0]), inp.model_id).replace(
        ".run.json", f"{kind}.run.json"), inp.paths())
    dec, info = open_decoder(inp, args.model, args.dtype, args.device, args.threads,
                             cache_tokens=args.cache_tokens, hf_beside=True)
    dec.engine_options = {**dec.engine_options, "adapt": not args.no_adapt}
    if "corpus" in info:
        info["corpus_answers_benched_prompts"] = held
    # every set's prompts encoded and length-checked before any benching
    encoded = {s: dec.encode_prompts(t, args.max_new_tokens, args.raw)
               for s, t in families.items()}
    maybe_calibrate(args, inp, dec, info, not args.json)
    for note in decode_notes(inp, info, args):  # inputs all good
        warn(note)
    human = not args.json
    if args.batch:
        return _batch(args, dec, info, inp, encoded[sets[0]], human, out_path)
    if len(sets) > 1:
        return _families(args, dec, info, inp, encoded, human, out_path)
    if human:
        say(f"bench: {len(encoded[sets[0]])} prompts, {args.max_new_tokens} new tokens, "
            f"model {info['model']} ({info['dtype']}), tree {info['tree']}")
    res, runs = _bench_one(args, dec, info, inp, encoded[sets[0]], human, sets[0])
    recent = on_recent_text(dec.tree, res, inp, res.get("speed_vs_profile"), info["model"])
    out = {"schema": "treeopt.run/1", "kind": "bench", **info,
           "prompt_file": sets[0] or "built-in", "offset": args.offset,
           "stride": args.stride, **res,
           **({"predicted_on_recent_text": recent} if recent else {}),
           "peak_memory": peak_memory(dec.device)}
    write_json(out_path, out)
    keep_text(info["model"], res.get("acceptance"))
    if human:
        _print(out, out_path)
    kept = keep_correction(args, inp, res.get("speed_vs_profile"),
                           res["decode"].get("steps", 0), "bench",
                           inp.profile and speed_by_length(runs, inp.profile))
    drift_lines = lines(out.get("drift"), out_path, inp.acceptance_src, inp.profile_src,
                        model_flag(args.model))
    for line in [x for x in drift_lines if not (kept and x.startswith("speed drift"))] + [
            kept, recent_line(recent), adapt_line(out.get("adapt"))]:
        if line:  # on stderr, with --json too
            warn(line)
    return out


def _bench_one(args, dec, info, inp, encoded, human, prompt_file) -> tuple[dict, list]:
    """The interleaved bench of one prompt set, with the search's prediction beside it,
    the records of its PPD steps and their drifts (:mod:`treeopt.drift`)."""
    static = args.hf_static == "on" or (args.hf_static == "auto" and dec.device.type == "cuda")
    res, runs = run_bench(dec, encoded, args.max_new_tokens, info["dtype"],
                          not args.no_baseline, quiet=not human, hf_lookup=args.hf_lookup,
                          hf_static=static)
    speed = speed_vs_profile(runs, inp.profile) if inp.profile else None
    pred = predicted_vs_measured(dec.tree, res, inp.profile, inp.profile_src, inp.acceptance,
                                 inp.acceptance_src, speed)
    block, d = assess(dec.tree, dec.prompt_tokens.num, info["model"], encoded,
                      [r for _, r in runs], res["decode"], pred, inp.profile, speed,
                      dec.cache_settings, run="bench", prompt_file=prompt_file or "built-in",
                      offset=args.offset, stride=args.stride, tree_file=info["tree"])
    extra = {"predicted": pred, "acceptance": block, "drift": d, "speed_vs_profile": speed,
             "last_half": _last_half(dec, info, inp, encoded, runs, pred),
             "cache_memory": dec.cache_source.memory() if dec.cache_source else None}
    return {**res, **{k: v for k, v in extra.items() if v}}, runs


def _last_half(dec, info, inp, encoded, runs, pred) -> dict | None:
    """The prediction that follows the run, over its last half of prompts: the tree
    replayed over those prompts' own steps at their own speed against what they measured
    (the drift's model error, read where the run has settled)."""
    half = len(runs) // 2
    if not inp.profile or half < 1:
        return None
    later = runs[half:]
    measured = decode_phase(later)
    speed = speed_vs_profile(later, inp.profile)
    _, d = assess(dec.tree, dec.prompt_tokens.num, info["model"], encoded[half:],
                  [r for _, r in later], measured, pred, inp.profile, speed,
                  dec.cache_settings)
    if d is None:
        return None
    return {"prompts": len(later), "speed_vs_profile": round(speed, 4) if speed else None,
            "replayed": d["replayed"], "measured": measured, "error": d["model"]}


def _families(args, dec, info, inp, encoded: dict, human, path) -> dict:
    """One bench per prompt set (each interleaved per prompt), in one run."""
    rows, all_runs = [], []
    for name, ids in encoded.items():
        if human:
            say(f"bench family {prompts.family_name(name)}: {len(ids)} prompts, "
                f"{args.max_new_tokens} new tokens, tree {info['tree']}")
        res, runs = _bench_one(args, dec, info, inp, ids, human, name)
        all_runs += runs
        rows.append({"family": prompts.family_name(name), "prompt_file": name, **res})
    out = {"schema": "treeopt.run/1", "kind": "bench-families", **info,
           "offset": args.offset, "stride": args.stride, "max_new_tokens": args.max_new_tokens,
           "hf_lookup": args.hf_lookup, "families": rows,
           "peak_memory": peak_memory(dec.device)}
    speed = speed_vs_profile(all_runs, inp.profile) if inp.profile else None
    write_json(path, out)
    if human:
        say(f"{'family':>16} {'tok/step':>8} {'alone':>6} {'tok/s':>7} {'HF':>7} "
            f"{'vs HF':>6} {'vs alone':>8} {'vs HF lookup':>12} {'identical':>9} "
            f"{'predicted tok/step':>18} {'own text':>8}")
        for r in rows:
            p = r.get("predicted")
            say(f"{r['family']:>16} {r['tokens_per_step']:>8.2f} "
                f"{r.get('ppd_alone_tokens_per_step', r['tokens_per_step']):>6.2f} "
                f"{r['tokens_per_second']:>7.1f} {r['hf_tokens_per_second']:>7.1f} "
                f"{r['speedup_vs_hf']:>5.2f}x {r.get('speedup_vs_ppd_alone', 1.0):>7.2f}x "
                + (f"{r['speedup_vs_hf_lookup']:>11.2f}x " if "speedup_vs_hf_lookup" in r
                   else f"{'-':>12} ")
                + f"{100 * r['identical_fraction']:>8.0f}% "
                + (f"{p['tokens_per_step']:>10.3f} ({100 * p['error']['tokens_per_step']:+.1f}%)"
                   if p and "tokens_per_step" in p.get("error", {}) else f"{'-':>18}")
                + (f" {r['drift']['replayed']['tokens_per_step']:>8.3f}" if "drift" in r
                   else f" {'-':>8}"))
        say("predicted: from the acceptance data; own text: the tree replayed over the "
            "family's own recorded steps")
        for r in rows:  # the faster loops a user already has, where benched
            more = [f"{name} {r[key]:.2f}x" for key, name in (
                ("speedup_vs_hf_static", "vs HF static cache"),
                ("baseline_vs_hf", "engine plain loop vs HF")) if key in r]
            if more:
                say(f"{r['family']:>16} " + ", ".join(more))
        say(f"wrote {path}")
    for r in rows:  # drift lines on stderr, with --json too
        d = {k: v for k, v in (r.get("drift") or {}).items() if k != "speed"}
        for line in lines(d, path, inp.acceptance_src, inp.profile_src,
                          model_flag(args.model), r["family"]):
            warn(line)
    line = speed_line(speed, inp.profile_src, model_flag(args.model))
    if line:
        warn(line)
    return out


def _batch(args, dec, info, inp, encoded, human, path) -> dict:
    if human:
        say(f"batch bench: {len(encoded)} prompts, {args.max_new_tokens} new tokens, batch "
            f"sizes {', '.join(map(str, args.batch))}, tree {info['tree']}")
    rows = batch_bench(dec.lm, dec.prompt_tokens, dec.tree, encoded, args.batch,
                       args.max_new_tokens, inp.profile, quiet=not human,
                       acceptance=inp.acceptance, cache=dec.cache_source,
                       adapt=not args.no_adapt)
    out = {"schema": "treeopt.run/1", "kind": "batch-bench", **info,
           "prompt_file": (args.prompts or ["built-in"])[0], "prompts": len(encoded),
           "max_new_tokens": args.max_new_tokens, "profile": inp.profile_src, "batch": rows,
           "peak_memory": peak_memory(dec.device)}
    write_json(path, out)
    keep_text(info["model"], next((r["acceptance"] for r in rows if r.get("acceptance")), None))
    if human:
        say(f"{'B':>3} {'chosen':>8} {'plain':>8} {'HF':>8} {'one-by-one':>10} {'vs plain':>8} "
            f"{'vs HF':>6} {'tok/step':>8} {'predicted':>10}  (tokens/s)")
        for r in rows:
            p = r.get("predicted")
            pred = f"{p['tokens_per_second']:.1f} ({100 * p['error']:+.0f}%" + (
                f", {100 * p['error_at_run_speed']:+.0f}% at run speed" if
                "error_at_run_speed" in p else "") + ")" if p else "-"
            say(f"{r['batch']:>3} {r['chosen_tokens_per_second']:>8.1f} "
                f"{r['plain_tokens_per_second']:>8.1f} {r['hf_tokens_per_second']:>8.1f} "
                f"{r['single_tokens_per_second']:>10.1f} {r['speedup_vs_plain']:>7.2f}x "
                f"{r['speedup_vs_hf']:>5.2f}x {r['tokens_per_step']:>8.2f} {pred:>10}")
        say("chosen and plain: continuous batching (at most B live); HF: static groups of B; "
            "interleaved in chunks of 2B prompts. predicted: the search's figure for full "
            "batches at each step's cache length, vs the steps where all B were live")
        say(f"wrote {path}")
    for r in rows:  # on stderr, with --json too
        line = adapt_line(r.get("adapt"), f"B={r['batch']}")
        if line:
            warn(line)
    kept = keep_correction(args, inp, *batch_speed(rows), "bench --batch")
    for r in rows:  # drift lines on stderr, with --json too
        what, flag = f"B = {r['batch']}", model_flag(args.model)
        if r.get("drift"):
            found = lines(r["drift"], path, inp.acceptance_src, inp.profile_src, flag, what)
        else:  # B decodes plainly: its plain steps tell the speed
            line = speed_line((r.get("predicted") or {}).get("speed_vs_profile"),
                              inp.profile_src, flag)
            found = [f"{line} ({what})"] if line else []
        for line in found:
            if not (kept and line.startswith("speed drift")):
                warn(line)
    if kept:
        warn(kept)
    return out



def _print(out: dict, path) -> None:
    say(f"PPD {out['tokens_per_second']:.1f} tok/s vs HF generate "
        f"{out['hf_tokens_per_second']:.1f} tok/s: speedup {out['speedup_vs_hf']:.2f}x "
        f"(median per prompt {out['median_speedup_vs_hf']:.2f}x)")
    if "ppd_alone_tokens_per_second" in out:
        what = "without the cache (PPD + lookup)" if out.get("ppd_alone_is") == "ppd+lookup" \
            else "without prompt lookup (PPD alone)"
        say(f"the same tree {what}: "
            f"{out['ppd_alone_tokens_per_second']:.1f} tok/s, "
            f"{out['ppd_alone_tokens_per_step']:.2f} tokens/step (hybrid "
            f"{out['speedup_vs_ppd_alone']:.2f}x)")
    if "hf_static_tokens_per_second" in out:
        say(f"HF generate, static cache{' compiled' if out['hf_static_compiled'] else ''}: "
            f"{out['hf_static_tokens_per_second']:.1f} tok/s "
            f"(PPD {out['speedup_vs_hf_static']:.2f}x)")
    if "hf_lookup_tokens_per_second" in out:
        say(f"HF prompt-lookup generate: {out['hf_lookup_tokens_per_second']:.1f} tok/s "
            f"(PPD {out['speedup_vs_hf_lookup']:.2f}x)")
    if "baseline_vs_hf" in out:
        say(f"plain greedy loop {out['baseline_tokens_per_second']:.1f} tok/s "
            f"({out['baseline_vs_hf']:.2f}x HF generate)")
    if out.get("cache_memory"):
        m = out["cache_memory"]
        say(f"cache: {m['tokens']} tokens in {m['documents']} documents, ~{m['bytes'] / 2**20:.1f}"
            f" MiB ({m['bytes_per_token']:.0f} bytes/token); asking the chain sources took "
            f"{100 * out['propose_fraction']:.2f}% of the steps' time")
    say(f"tokens/step {out['tokens_per_step']:.2f}; per-step overhead "
        f"{100 * (out['step_overhead_fraction'] or 0):.1f}% of the forward; identical outputs "
        f"{100 * out['identical_fraction']:.0f}%; unexplained divergences "
        f"{out['unexplained_divergences']}")
    pred = out.get("predicted")
    if pred:
        d, e = out["decode"], pred["error"]
        say(f"decode phase: predicted {pred['tokens_per_step']:.3f} tok/step, "
            f"{1000 * pred['step_seconds']:.2f} ms/step, {pred['tokens_per_second']:.1f} "
            f"tok/s vs measured {d['tokens_per_step']:.3f}, {1000 * d['step_seconds']:.2f} "
            f"ms, {d['tokens_per_second']:.1f} (error {100 * e['tokens_per_second']:+.1f}%)")
        if "speed_vs_profile" in pred:
            say(f"this run's steps took {pred['speed_vs_profile']:.3f}x the profile's time; "
                f"at this speed predicted {pred['tokens_per_second_at_run_speed']:.1f} "
                f"tok/s (error {100 * e['tokens_per_second_at_run_speed']:+.1f}%)")
    else:
        say("no profile or acceptance file for this device: no predicted figures")
    half = out.get("last_half")
    if half and "tokens_per_second_at_run_speed" in half["error"]:
        say(f"last {half['prompts']} prompts: the tree replayed over their own steps at their "
            f"own speed is off their measured tokens/s by "
            f"{100 * half['error']['tokens_per_second_at_run_speed']:+.1f}% "
            f"(tokens/step {100 * half['error']['tokens_per_step']:+.1f}%)")
    say(f"wrote {path}")
