"""Hybrid trees (prompt tokens + prompt lookup) per prompt family, on the embedded model.

For each family (chat: MT-Bench; math: GSM8K train questions past the ones the shipped
prompt tokens trained on; input-grounded: rewrite / summarise / extract / code-edit) it
runs the pipeline a user would: measure acceptance (prompt tokens and lookup) on half of
the family's prompts, search the hybrid tree for that family on this device's profile,
then decode the other half with four decoders interleaved per prompt — the hybrid tree,
the same tree without lookup (PPD alone), HF `generate` and HF
`generate(prompt_lookup_num_tokens=K)` — and prints tokens/step, tokens/s, speedups,
identical-output rates and predicted (replayed) vs measured tokens/step.

    PYTHONPATH=. .venv/bin/python benchmarks/hybrid_families.py [--per-family 8]
        [--max-new-tokens 96] [--dtype auto] [--lookup-k 8]
"""
import argparse
import json

from treeopt import prompts
from treeopt.acceptance import unpack_records
from treeopt.distill import measure_acceptance
from treeopt.evaluation import decode_phase, run_bench
from treeopt.inputs import resolve_inputs
from treeopt.latency import Latency
from treeopt.runtime import open_decoder
from treeopt.search import Options, replay_predict, search, with_lookup

FAMILIES = {"chat": ("mt-bench", 0), "math": ("gsm8k-train", 1000),
            "input-grounded": ("input-grounded", 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-family", type=int, default=8, help="prompts measured and benched")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lookup-k", type=int, default=8)
    args = ap.parse_args()
    inp = resolve_inputs(dtype=args.dtype, need=("profile",), want=("tree",))
    dec, info = open_decoder(inp, dtype=args.dtype)
    rows = {}
    for fam, (name, offset) in FAMILIES.items():
        n = args.per_family
        texts = prompts.load(name, 2 * n, offset)
        measure, bench = texts[1::2], texts[0::2]
        acc = {"schema": "treeopt.acceptance/1", "model": info["model"], "source": "measured",
               "num_prompt_tokens": dec.prompt_tokens.num, "topk": 10,
               **measure_acceptance(dec.lm, dec.table, measure, 10, args.max_new_tokens,
                                    quiet=True)}
        found = search(acc, inp.profile, Options(), f"hybrid-{fam}")
        tree = found["solution"].tree
        rec = unpack_records(acc)
        h = with_lookup(found, rec, 512)
        dec.set_tree(tree, dec.prompt_tokens)
        enc = [prompts.encode(dec.lm.tokenizer, t) for t in bench]
        res, runs = run_bench(dec, enc, args.max_new_tokens, info["dtype"], plain=False,
                              quiet=True, hf_lookup=args.lookup_k)
        lat = Latency(inp.profile)
        ctx = res["decode"]["context"]
        pred = replay_predict(tree, rec, lambda L: lat(L, ctx))
        meas = res["decode"]["tokens_per_step"]
        # the same replay on the benched prompts themselves: what is model, what is sample
        same = {"num_prompt_tokens": dec.prompt_tokens.num,
                **measure_acceptance(dec.lm, dec.table, bench, 10, args.max_new_tokens,
                                     quiet=True)}
        same_pred = replay_predict(tree, unpack_records(same), lambda L: lat(L, ctx))
        rows[fam] = {
            "policy": tree.lookup.to_json()["policy"] if tree.lookup else {},
            "tokens_per_step": res["tokens_per_step"],
            "ppd_alone_tokens_per_step": res.get("ppd_alone_tokens_per_step"),
            "tokens_per_second": res["tokens_per_second"],
            "hf_tokens_per_second": res["hf_tokens_per_second"],
            "speedup_vs_hf": res["speedup_vs_hf"],
            "speedup_vs_ppd_alone": res.get("speedup_vs_ppd_alone"),
            "speedup_vs_hf_lookup": res.get("speedup_vs_hf_lookup"),
            "hf_lookup_vs_hf": round(res["hf_lookup_tokens_per_second"]
                                     / res["hf_tokens_per_second"], 4),
            "identical_fraction": res["identical_fraction"],
            "unexplained_divergences": res["unexplained_divergences"],
            "decode_tokens_per_step": meas,
            "predicted_tokens_per_step": pred["tokens_per_step"],
            "predicted_error": round(pred["tokens_per_step"] / meas - 1, 4) if meas else None,
            "replayed_on_measured_half": h["hybrid"]["tokens_per_step"],
            "replayed_on_benched_prompts": same_pred["tokens_per_step"],
        }
        r = rows[fam]
        print(f"{fam:>15}: hybrid {r['tokens_per_step']:.2f} tok/step (PPD alone "
              f"{r['ppd_alone_tokens_per_step'] or r['tokens_per_step']:.2f}), "
              f"{r['tokens_per_second']:.1f} tok/s = {r['speedup_vs_hf']:.2f}x HF generate, "
              f"{r['speedup_vs_hf_lookup']:.2f}x HF prompt lookup "
              f"(which is {r['hf_lookup_vs_hf']:.2f}x HF); identical "
              f"{100 * r['identical_fraction']:.0f}%; decode tokens/step predicted "
              f"{r['predicted_tokens_per_step']:.3f} vs measured {meas:.3f} "
              f"({100 * (r['predicted_error'] or 0):+.1f}%; replayed on the benched prompts "
              f"themselves {same_pred['tokens_per_step']:.3f})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
