"""The whole loop in one command: profile (yours or the shipped one unless --fresh),
acceptance (likewise), search, bench on a few built-in prompts, and an HTML report —
all written under $TREEOPT_HOME/demo/."""
from __future__ import annotations

import time

from .. import latency, paths, prompts, report
from ..artefact import stamp, write_atomic, write_json
from ..device import device_slug
from ..distill import measure_acceptance
from ..errors import BadInput
from ..drift import assess, lines
from ..evaluation import predicted_vs_measured, run_bench, speed_vs_profile
from ..inputs import resolve_inputs
from ..calibrate import short_profile
from ..runtime import open_decoder
from ..acceptance import unpack_records
from ..search import Options, add_sources, plain_if_faster, search
from .common import add_model_args, decode_notes, model_flag, positive_int, say, warn

HELP = "run the whole pipeline on a model (default: the embedded one) and write a report"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    p.add_argument("--profile", help="latency profile to use (default: this device's measured "
                   "profile, yours then shipped; measured on the spot where there is none)")
    p.add_argument("--fresh", action="store_true",
                   help="re-measure the profile and the acceptance instead of reusing them")
    p.add_argument("--limit", type=positive_int, default=4, help="bench prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=96)
    p.add_argument("--out", default=None,
                   help="report path (default: $TREEOPT_HOME/demo/demo.html)")


def main(args) -> dict:
    human = not args.json
    t0 = time.perf_counter()

    def step(i, text):
        if human:
            say(f"{i}/5 {text}")

    if args.fresh and args.profile:
        raise BadInput("--fresh re-measures the profile; drop --profile")
    inp = resolve_inputs(args.model, args.profile, prompt_tokens=args.prompt_tokens,
                         device=args.device, dtype=args.dtype,
                         want=("corpus",) if args.fresh else ("profile", "acceptance",
                                                              "corpus"))
    folder = paths.home() / "demo"
    out = args.out or folder / "demo.html"
    dec, info = open_decoder(inp, args.model, args.dtype, args.device, args.threads,
                             hf_beside=True)  # its bench runs HF generate
    for note in decode_notes(inp, info, args):
        warn(note)
    mid, dev_id = info["model"], device_slug(dec.device.type)
    heads = {}
    if inp.profile is None:  # the first-run calibration's short profile (`treeopt profile`
        step(1, "profile: a short one of this device (under a minute)…")  # for the grid)
        prof = short_profile(dec, quiet=not human)
        prof_path = paths.user_profiles() / paths.profile_name(dev_id, mid, info["dtype"])
        write_json(prof_path, prof)
        heads["profile"] = (f"measured a short one in {prof['short']['seconds']:.0f} s, knee "
                            f"{latency.summary(prof)['knee']}")
    else:
        prof, prof_path = inp.profile, inp.profile_path
        heads["profile"] = f"reused {paths.display_path(prof_path)}"
    step(1, f"profile: {heads['profile']}")
    if inp.acceptance is None:
        step(2, "acceptance: measuring on the built-in prompts…")
        acc = {"schema": "treeopt.acceptance/1", "model": mid, "source": "measured",
               "num_prompt_tokens": dec.prompt_tokens.num, "topk": 10,
               "dtype": info["dtype"], "prompt_file": "built-in", "max_new_tokens": 160,
               **measure_acceptance(dec.lm, dec.table, prompts.load(None), quiet=not human),
               **stamp()}
        acc_path = paths.user_profiles() / paths.acceptance_name(mid)
        write_json(acc_path, acc)
        acc_src = paths.display_path(acc_path)
        heads["acceptance"] = "measured"
    else:
        acc, acc_src = inp.acceptance, inp.acceptance_src
        heads["acceptance"] = f"reused {acc_src}"
    heads["acceptance"] += " (top-1 by depth " + ", ".join(
        f"{row[0]:.2f}" for row in acc["accuracy"]) + ")"
    step(2, f"acceptance: {heads['acceptance']}")
    found = search(acc, prof, Options(), f"demo-{mid}")
    meta = found["meta"]
    rec = unpack_records(acc)
    if rec is not None:  # every chain source the records measured, where it predicts faster
        add_sources(found, rec, ["ppd", "lookup"] + (["cache"] if "cache_match" in rec
                                                     else []), Options().max_input)
    plain = plain_if_faster(found)
    tree = found["solution"].tree
    tree_path = folder / paths.tree_name(dev_id, mid, info["dtype"])
    report_path = paths.search_report_path(tree_path)
    tree.meta = {"model": mid, "profile": paths.display_path(prof_path),
                 "acceptance": acc_src, "device": prof["device"]["name"],
                 "device_id": prof.get("device_id"), "dtype": prof["dtype"],
                 "simulated": False, **meta, **stamp(), "search_report": report_path.name}
    write_json(report_path, {"schema": "treeopt.search/1", "tree": tree_path.name,
                             "model": mid, **found["report"]})
    tree.save(tree_path)
    pred = meta["predicted"]
    heads["search"] = (f"{pred['tokens_per_step']:.2f} tokens/step, "
                       f"{pred['tokens_per_second']:.1f} tokens/s predicted "
                       f"({pred['speedup_vs_t1']:.2f}x plain), input lengths "
                       f"{pred['input_lengths']}")
    if tree.has_chains:
        r = meta["replayed"]["hybrid"]
        used = [{"lookup": "prompt lookup", "cache": "the cache"}[x]
                for x, on in (("lookup", tree.lookup), ("cache", tree.cache)) if on]
        heads["search"] += (f"; with {' and '.join(used)} "
                            f"{r['tokens_per_step']:.2f} tokens/step, "
                            f"{r['tokens_per_second']:.1f} tokens/s (replayed)")
    if plain:
        heads["search"] += (f"; no tree pays here: plain decoding "
                            f"({plain['plain_tokens_per_second']:.1f} tokens/s)")
    step(3, f"search: {heads['search']}")
    dec.use_tree(tree)
    encoded = [prompts.encode(dec.lm.tokenizer, t) for t in prompts.load(None, args.limit)]
    res, runs = run_bench(dec, encoded, args.max_new_tokens, info["dtype"], plain=False,
                          quiet=not human)
    run = {"schema": "treeopt.run/1", "kind": "bench", **info,
           "tree": paths.display_path(tree_path), "prompt_file": "built-in", **res,
           **({"plain": True} if dec.plain else {})}
    speed = speed_vs_profile(runs, prof)
    p = predicted_vs_measured(tree, res, prof, paths.display_path(prof_path), acc, acc_src,
                              speed)
    block, d = assess(tree, dec.prompt_tokens.num, mid, encoded, [r for _, r in runs],
                      res["decode"], p, prof, speed, dec.cache_settings, run="demo",
                      prompt_file="built-in", tree_file=run["tree"])
    run.update({k: v for k, v in (("predicted", p), ("acceptance", block), ("drift", d)) if v})
    run_path = folder / "demo.run.json"
    write_json(run_path, run)
    heads["bench"] = (f"{res['tokens_per_second']:.1f} tokens/s vs HF generate "
                      f"{res['hf_tokens_per_second']:.1f}: {res['speedup_vs_hf']:.2f}x, "
                      f"{res['tokens_per_step']:.2f} tokens/step, identical "
                      f"{100 * res['identical_fraction']:.0f}%")
    step(4, f"bench: {heads['bench']}")
    for line in lines(d, run_path, acc_src, paths.display_path(prof_path),
                      model_flag(args.model)):
        warn(line)
    html = report.build([(str(prof_path), prof)], acc, tree.to_json(), run,
                        f"treeopt demo — {mid}", search_report=found["report"])
    write_atomic(out, html)
    step(5, f"report: {out} ({time.perf_counter() - t0:.0f} s in all)")
    return {"report": str(out), "headlines": heads}
