"""The whole loop on the embedded model in one command: profile (the shipped one unless
--fresh), acceptance (the shipped one unless --fresh), search, bench on a few prompts,
report."""
from __future__ import annotations

import argparse
import time

from .cliutil import add_model_args, positive_int, say

HELP = "run the whole pipeline on the embedded model and write a report"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    p.add_argument("--fresh", action="store_true",
                   help="re-measure the profile and the acceptance instead of reusing them")
    p.add_argument("--limit", type=positive_int, default=4, help="bench prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=96)
    p.add_argument("--out", default=None, help="report path (default reports/demo.html)")


def _verb(module, **kw):
    ns = argparse.Namespace(json=True, debug=False, **kw)
    return module.main(ns)


def main(args) -> dict:
    from . import accept, bench, profile, report, search, shipped
    from .models import DEFAULT_MODEL_ID, dtype_name, pick_device, pick_dtype

    human = not args.json
    t0 = time.perf_counter()
    dev = pick_device(args.device)
    dt = dtype_name(pick_dtype(args.dtype, dev))
    model = DEFAULT_MODEL_ID
    dev_id = shipped.device_slug(dev.type)
    prof_path = shipped.profile_path(dev_id, model, dt)
    acc_path = shipped.acceptance_path(model)
    tree_path = shipped.PROFILES / f"{dev_id}__{model}.tree.json"
    run_path = shipped.REPORTS / "demo.run.json"
    out = args.out or str(shipped.REPORTS / "demo.html")
    common = dict(model=args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    heads = {}
    if args.fresh or not prof_path.is_file():
        if human:
            say("1/5 profile: measuring (a few minutes)…")
        r = _verb(profile, **common, gpu=False, cpu=dev.type == "cpu", simulate=None,
                  peak_tflops=None, bandwidth_gbs=None, sizes=None, contexts=None, repeats=30,
                  rounds=3,
                  budget_seconds=6.0, resume=False, no_overhead=False, out=str(prof_path))
        heads["profile"] = f"measured, knee {r['knee']}"
    else:
        heads["profile"] = f"reused {prof_path.name}"
    if human:
        say(f"1/5 profile: {heads['profile']}")
    if args.fresh or not acc_path.is_file():
        if human:
            say("2/5 acceptance: measuring on the built-in prompts…")
        r = _verb(accept, **common, prompt_tokens=None, prompts=None, limit=None, offset=0,
                  stride=1, topk=10, max_new_tokens=160, min_support=40, check_tree=None,
                  check_prompts=None, check_limit=20, check_offset=0, check_stride=1,
                  out=str(acc_path))
        heads["acceptance"] = "measured"
    else:
        heads["acceptance"] = f"reused {acc_path.name}"
    acc_obj = accept.load(acc_path)
    heads["acceptance"] += (" (top-1 by depth " + ", ".join(
        f"{row[0]:.2f}" for row in acc_obj["accuracy"]) + ")")
    if human:
        say(f"2/5 acceptance: {heads['acceptance']}")
    r = _verb(search, model=None, profile=str(prof_path), acceptance=str(acc_path),
              max_input=512, context=None, static=False, product=False, export=None, trials=0,
              storage=None, out=str(tree_path))
    heads["search"] = (f"{r['tokens_per_step']:.2f} tokens/step, {r['tokens_per_second']:.1f} "
                       f"tokens/s predicted ({r['speedup_vs_t1']:.2f}x plain), input lengths "
                       f"{r['input_lengths']}")
    if human:
        say(f"3/5 search: {heads['search']}")
    r = _verb(bench, **common, tree=str(tree_path), prompt_tokens=None, prompts=None,
              limit=args.limit, offset=0, stride=1, profile=None, acceptance=None,
              max_new_tokens=args.max_new_tokens, raw=False, no_baseline=True,
              out=str(run_path))
    heads["bench"] = (f"{r['tokens_per_second']:.1f} tokens/s vs HF generate "
                      f"{r['hf_tokens_per_second']:.1f}: {r['speedup_vs_hf']:.2f}x, "
                      f"{r['tokens_per_step']:.2f} tokens/step, identical "
                      f"{100 * r['identical_fraction']:.0f}%")
    if human:
        say(f"4/5 bench: {heads['bench']}")
    r = _verb(report, profile=[str(prof_path)], acceptance=str(acc_path), tree=str(tree_path),
              run=str(run_path), out=out, title="treeopt demo — SmolLM2-135M-Instruct",
              allow_mixed=False, open=False)
    heads["report"] = r["out"]
    if human:
        say(f"5/5 report: {shipped.display_path(r['out'])} "
            f"({time.perf_counter() - t0:.0f} s in all)")
    return {"report": r["out"], "headlines": heads}
