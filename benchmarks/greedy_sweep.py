"""Measured tokens/s of the searched tree vs a sweep of greedy static trees (top-N by
product, all counts K) on the embedded model, one process, interleaved per prompt.

    python benchmarks/greedy_sweep.py [--sizes 4,8,12,16,24,32,48,64] [--limit 10]
        [--prompts ../shared/data/mt_bench_questions.jsonl] [--max-new-tokens 96]

Prints each tree's tokens/s and tokens/step, the searched tree's fraction of the best
greedy tree, and the searched tree's predicted vs measured tokens/s.
"""
import argparse
import json
import statistics

from treeopt import accept, prompts, search, shipped
from treeopt.runtime import open_decoder
from treeopt.tree import Tree


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4,8,12,16,24,32,48,64")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--prompts", default="../shared/data/mt_bench_questions.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    dec, info = open_decoder()
    model = info["model"]
    acc_obj = accept.load(shipped.PROFILES / f"{model}.acceptance.json")
    acc, _ = accept.search_inputs(acc_obj, conditional=False)
    trees = {"searched": Tree.load(shipped.tree_path(model, dec.device.type))}
    for L in [int(x) for x in args.sizes.split(",")]:
        g = search.greedy_tree(acc, L)
        if g is not None:
            trees[f"greedy L={g.input_length(g.num_prompt_tokens)}"] = g
    texts = prompts.load(args.prompts, args.limit)
    enc = [prompts.encode(dec.lm.tokenizer, t) for t in texts]
    tok = {name: 0 for name in trees}
    sec = {name: 0.0 for name in trees}
    steps = {name: 0 for name in trees}
    dec.set_tree(trees["searched"], dec.prompt_tokens)
    dec.ppd(enc[0], 8)  # burn-in
    for ids in enc:
        for name, tree in trees.items():
            dec.set_tree(tree, dec.prompt_tokens)
            r = dec.ppd(ids, args.max_new_tokens)
            tok[name] += r.new_tokens
            sec[name] += r.seconds
            steps[name] += r.steps
    rows = {n: {"tokens_per_second": round(tok[n] / sec[n], 3),
                "tokens_per_step": round(tok[n] / steps[n], 4)} for n in trees}
    best_greedy = max(v["tokens_per_second"] for n, v in rows.items() if n != "searched")
    frac = rows["searched"]["tokens_per_second"] / best_greedy
    pred = trees["searched"].meta.get("predicted", {})
    for n, v in rows.items():
        print(f"{n:>16}: {v['tokens_per_second']:.2f} tok/s, {v['tokens_per_step']:.3f} tok/step")
    print(f"searched / best greedy = {frac:.3f}; predicted {pred.get('tokens_per_second')} "
          f"tok/s vs measured {rows['searched']['tokens_per_second']}")
    print(json.dumps({"rows": rows, "searched_over_best_greedy": round(frac, 4),
                      "predicted": pred, "median_prompt_tokens":
                          statistics.median(len(e) for e in enc)}))


if __name__ == "__main__":
    main()
