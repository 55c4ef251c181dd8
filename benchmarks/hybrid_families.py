"""Hybrid trees (prompt tokens + prompt lookup) per prompt family, on the embedded model.

For each family (chat: MT-Bench; math: GSM8K train questions past the ones the shipped
prompt tokens trained on; input-grounded: rewrite / summarise / extract / code-edit) it
runs the pipeline a user would: measure acceptance (prompt tokens and lookup) on half of
the family's prompts, search the hybrid tree for that family on this device's profile,
then decode the other half with four decoders interleaved per prompt — the hybrid tree,
the same tree without lookup (PPD alone), HF `generate` and HF
`generate(prompt_lookup_num_tokens=K)` — and prints tokens/step, tokens/s, speedups,
identical-output rates and predicted (replayed) vs measured tokens/step.

It writes the families run (`treeopt.run/1`, kind bench-families, one tree per family) and
each family's acceptance file into --out-dir, for `treeopt report --run
DIR/families.run.json --acceptance DIR/chat.acceptance.json ...`.

    PYTHONPATH=. .venv/bin/python benchmarks/hybrid_families.py [--per-family 9]
        [--max-new-tokens 96] [--dtype auto] [--lookup-k 8] [--out-dir DIR]
"""
import argparse
import json
import pathlib
import shlex
import sys

from treeopt import paths, prompts
from treeopt.acceptance import SCHEMA, unpack_records
from treeopt.artefact import stamp, write_json
from treeopt.distill import measure_acceptance
from treeopt.evaluation import predicted_vs_measured, run_bench, speed_vs_profile
from treeopt.inputs import resolve_inputs
from treeopt.latency import Latency
from treeopt.runtime import open_decoder
from treeopt.search import Options, search
from treeopt.search.hybrid import replay_predict, with_lookup

COMMAND = "benchmarks/hybrid_families.py " + shlex.join(sys.argv[1:])
FAMILIES = {"chat": ("mt-bench", 0), "math": ("gsm8k-train", 1000),
            "input-grounded": ("input-grounded", 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-family", type=int, default=9, help="prompts measured and benched")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lookup-k", type=int, default=8)
    ap.add_argument("--out-dir", type=pathlib.Path, default=paths.user_reports() / "families")
    args = ap.parse_args()
    inp = resolve_inputs(dtype=args.dtype, need=("profile",), want=("tree",))
    dec, info = open_decoder(inp, dtype=args.dtype)
    rows = []
    for fam, (name, offset) in FAMILIES.items():
        n = args.per_family
        texts = prompts.load(name, 2 * n, offset)
        measure, bench = texts[1::2], texts[0::2]
        acc = {"schema": SCHEMA, "model": info["model"], "source": "measured",
               "num_prompt_tokens": dec.prompt_tokens.num, "topk": 10, "dtype": info["dtype"],
               "prompt_file": fam, "offset": offset + 1, "stride": 2,
               "max_new_tokens": args.max_new_tokens,
               **measure_acceptance(dec.lm, dec.table, measure, 10, args.max_new_tokens,
                                    quiet=True), **stamp(), "command": COMMAND}
        acc_path = write_json(args.out_dir / f"{fam}.acceptance.json", acc)
        found = search(acc, inp.profile, Options(), f"hybrid-{fam}")
        rec = unpack_records(acc)
        h = with_lookup(found, rec, 512)
        tree = found["solution"].tree
        dec.set_tree(tree, dec.prompt_tokens)
        enc = [prompts.encode(dec.lm.tokenizer, t) for t in bench]
        res, runs = run_bench(dec, enc, args.max_new_tokens, info["dtype"], plain=False,
                              quiet=True, hf_lookup=args.lookup_k)
        row = {"family": fam, "prompt_file": name, **res,
               "predicted": predicted_vs_measured(tree, res, inp.profile, inp.profile_src,
                                                  acc, str(acc_path),
                                                  speed_vs_profile(runs, inp.profile))}
        # the same replay on the benched prompts themselves: what is model, what is sample
        same = {"num_prompt_tokens": dec.prompt_tokens.num,
                **measure_acceptance(dec.lm, dec.table, bench, 10, args.max_new_tokens,
                                     quiet=True)}
        ctx = res["decode"]["context"]
        lat = Latency(inp.profile)
        row["replayed_on_benched_prompts"] = replay_predict(
            tree, unpack_records(same), lambda L: lat(L, ctx))["tokens_per_step"]
        row["replayed_on_measured_half"] = h["hybrid"]["tokens_per_step"]
        row["tree"] = {"input_lengths": h["ppd_part"]["input_lengths"],
                       "lookup": tree.lookup.to_json() if tree.lookup else None}
        rows.append(row)
        p, meas = row["predicted"], res["decode"]["tokens_per_step"]
        print(f"{fam:>15}: hybrid {res['tokens_per_step']:.2f} tok/step (PPD alone "
              f"{res.get('ppd_alone_tokens_per_step', res['tokens_per_step']):.2f}), "
              f"{res['tokens_per_second']:.1f} tok/s = {res['speedup_vs_hf']:.2f}x HF generate, "
              f"{res['speedup_vs_hf_lookup']:.2f}x HF prompt lookup (which is "
              f"{res['hf_lookup_tokens_per_second'] / res['hf_tokens_per_second']:.2f}x HF); "
              f"identical {100 * res['identical_fraction']:.0f}%; decode tokens/step predicted "
              f"{p['tokens_per_step']:.3f} vs measured {meas:.3f} "
              f"({100 * p['error']['tokens_per_step']:+.1f}%; replayed on the benched prompts "
              f"themselves {row['replayed_on_benched_prompts']:.3f}); PPD part inputs "
              f"{h['ppd_part']['input_lengths']}", flush=True)
    run = {"schema": "treeopt.run/1", "kind": "bench-families", **info,
           "tree": "searched per family (acceptance on the other half)",
           "max_new_tokens": args.max_new_tokens, "hf_lookup": args.lookup_k,
           "families": rows, **stamp(), "command": COMMAND}
    path = write_json(args.out_dir / "families.run.json", run)
    print(json.dumps({r["family"]: {k: r.get(k) for k in (
        "tokens_per_step", "ppd_alone_tokens_per_step", "speedup_vs_hf",
        "speedup_vs_hf_lookup", "speedup_vs_ppd_alone", "identical_fraction",
        "unexplained_divergences")} for r in rows}))
    print(f"wrote {path} and the families' acceptance files beside it")


if __name__ == "__main__":
    main()
