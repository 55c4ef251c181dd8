"""Measured tokens/s of the searched tree vs a sweep of greedy static trees (top-N by
product, all counts K) on the embedded model, one process, interleaved per prompt, with
the plain greedy loop alongside (it measures how fast the machine runs against the
profile).

    python benchmarks/greedy_sweep.py [--sizes 4,8,12,16,24,32,48,64] [--limit 20]
        [--prompts mt-bench] [--stride 4] [--offset 0]
        [--max-new-tokens 128]

Prints each tree's decode-phase tokens/s and tokens/step (prefill and a last step cut by
--max-new-tokens left out, as in `treeopt bench`), the searched tree's fraction of the
best greedy tree, and its predicted vs measured tokens/s.
"""
import argparse
import json

from treeopt import evaluation, prompts
from treeopt.search import exact
from treeopt.acceptance import search_inputs
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,8,12,16,24,32,48,64")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--prompts", default="mt-bench")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    inp = resolve_inputs(want=("tree", "profile", "acceptance"))
    dec, info = open_decoder(inp)
    acc, _ = search_inputs(inp.acceptance, conditional=False)
    trees = {"searched": inp.tree}
    for L in [int(x) for x in args.sizes.split(",")]:
        g = exact.greedy_tree(acc, L)
        if g is not None:
            trees[f"greedy L={g.input_length(g.num_prompt_tokens)}"] = g
    texts = prompts.load(args.prompts, args.limit, args.offset, args.stride)
    enc = [prompts.encode(dec.lm.tokenizer, t) for t in texts]
    runs = {name: [] for name in trees}
    plain = []
    dec.set_tree(trees["searched"], dec.prompt_tokens)
    dec.ppd(enc[0], 8)  # burn-in
    for ids in enc:
        plain.append((len(ids), dec.baseline(ids, args.max_new_tokens)))
        for name, tree in trees.items():
            dec.set_tree(tree, dec.prompt_tokens)
            runs[name].append((len(ids), dec.ppd(ids, args.max_new_tokens)))
    rows = {n: evaluation.decode_phase(r) for n, r in runs.items()}
    best_greedy = max(v["tokens_per_second"] for n, v in rows.items() if n != "searched")
    frac = rows["searched"]["tokens_per_second"] / best_greedy
    measured = {"decode": rows["searched"], "baseline_decode": evaluation.decode_phase(plain)}
    speed = evaluation.speed_vs_profile(runs["searched"], inp.profile)
    pred = evaluation.predicted_vs_measured(trees["searched"], measured, inp.profile,
                                            inp.profile_src, inp.acceptance, inp.acceptance_src,
                                            speed)
    for n, v in rows.items():
        print(f"{n:>16}: {v['tokens_per_second']:.2f} tok/s, {v['tokens_per_step']:.3f} tok/step")
    print(f"searched / best greedy = {frac:.3f}")
    if pred:
        e = pred["error"]
        print(f"searched: predicted {pred['tokens_per_second']:.1f} tok/s vs measured "
              f"{rows['searched']['tokens_per_second']:.1f} "
              f"({100 * e['tokens_per_second']:+.1f}%); "
              f"tokens/step {100 * e['tokens_per_step']:+.1f}%, step time "
              f"{100 * e['step_seconds']:+.1f}%; steps {pred['speed_vs_profile']:.3f}x the "
              f"profile's time, at that speed {100 * e['tokens_per_second_at_run_speed']:+.1f}%")
    print(json.dumps({"rows": rows, "searched_over_best_greedy": round(frac, 4),
                      "predicted": pred}))


if __name__ == "__main__":
    main()
