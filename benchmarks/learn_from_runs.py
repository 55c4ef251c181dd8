"""Searches that learn from runs, per prompt family, on the embedded model.

For each family (chat: MT-Bench; math: GSM8K train questions past the ones the shipped
prompt tokens trained on; input-grounded) it runs what a user would:

1. `treeopt bench --prompts FAMILY` on the "learn" half of the family's prompts with the
   default tree: the run JSON keeps the records of its steps and reports the drifts
   (text, model, speed);
2. `treeopt search --acceptance <that run> --sources ppd,lookup`: the tree learned from it;
3. on the other, held-out half, three trees decode each prompt interleaved (order rotated
   per prompt): the default tree, the tree searched from the shipped acceptance file on
   this profile (control: same profile, MT-Bench text) and the learned tree.

It prints, per family, the learn run's drifts, and on the held-out prompts each tree's
tokens/step and tokens/s (ratios to the default tree, one interleaved run) and the learned
tree's prediction error. The learn and held-out halves never share a prompt; MT-Bench
prompts are taken from the even indices, the shipped acceptance file measured odd ones.
`--profile` is the latency profile of every bench and search (default: this device's).

    PYTHONPATH=. .venv/bin/python benchmarks/learn_from_runs.py [--per-family 8]
        [--max-new-tokens 64] [--rounds 2] [--profile P] [--out-dir DIR]
"""
import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys

from treeopt import paths, prompts
from treeopt.artefact import stamp, write_json
from treeopt.evaluation import decode_phase
from treeopt.export import load_tree
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder

COMMAND = "benchmarks/learn_from_runs.py " + shlex.join(sys.argv[1:])
# family: (prompt set, first learn prompt, stride); the held-out prompts sit half a stride
# after each learn prompt. MT-Bench's odd prompts are the shipped acceptance file's.
FAMILIES = {"chat": ("mt-bench", 0, 4), "math": ("gsm8k-train", 1000, 2),
            "input-grounded": ("input-grounded", 0, 2)}
CLI = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "cli.py")]


def treeopt(*args) -> dict:
    p = subprocess.run([*CLI, *map(str, args), "--json"], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if p.returncode:
        sys.exit(f"treeopt {' '.join(map(str, args))}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def predicted_tokens_per_step(tree) -> float:
    meta = tree.meta or {}
    rep = meta.get("replayed") or {}
    if tree.lookup is not None and rep.get("hybrid"):
        return rep["hybrid"]["tokens_per_step"]
    return meta["predicted"]["tokens_per_step"]


def held_out(dec, trees: dict, encoded: list, max_new: int, rounds: int) -> dict:
    """Each tree decodes every prompt, interleaved per prompt (order rotated)."""
    runs = {name: [] for name in trees}
    names = list(trees)
    for r in range(rounds):
        for i, ids in enumerate(encoded):
            k = (i + r) % len(names)
            for name in names[k:] + names[:k]:
                dec.set_tree(trees[name], dec.prompt_tokens)
                runs[name].append((len(ids), dec.ppd(ids, max_new)))
    out = {}
    for name, rs in runs.items():
        tok = sum(x.new_tokens for _, x in rs)
        out[name] = {"tokens_per_step": decode_phase(rs)["tokens_per_step"],
                     "tokens_per_second": round(tok / sum(x.seconds for _, x in rs), 3),
                     "identical_to_first": all(
                         x.output_ids == y.output_ids
                         for (_, x), (_, y) in zip(rs, runs[names[0]]))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-family", type=int, default=8,
                    help="prompts learned from, and as many held out")
    ap.add_argument("--profile", help="latency profile (default: this device's)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out-dir", type=pathlib.Path, default=paths.user_reports() / "learn")
    args = ap.parse_args()
    d, n, t = args.out_dir, args.per_family, args.max_new_tokens
    d.mkdir(parents=True, exist_ok=True)
    prof = ["--profile", args.profile] if args.profile else []
    control = treeopt("search", "--sources", "ppd,lookup", *prof, "--out",
                      d / "control.tree.json")
    inp = resolve_inputs(profile=args.profile, want=("tree", "profile"))
    dec, info = open_decoder(inp)
    rows = []
    for fam, (name, offset, stride) in FAMILIES.items():
        learn = treeopt("bench", "--prompts", name, "--offset", offset, "--stride", stride,
                        "--limit", n, "--max-new-tokens", t, "--no-baseline", *prof,
                        "--out", d / f"{fam}.learn.run.json")
        treeopt("search", "--acceptance", d / f"{fam}.learn.run.json", "--sources",
                "ppd,lookup", *prof, "--out", d / f"{fam}.tree.json")
        trees = {"default": inp.tree, "control": load_tree(control["out"]),
                 "learned": load_tree(d / f"{fam}.tree.json")}
        texts = prompts.load(name, n, offset + stride // 2, stride)
        res = held_out(dec, trees, dec.encode_prompts(texts, t), t, args.rounds)
        base = res["default"]
        for r in res.values():
            r["speedup_vs_default"] = round(r["tokens_per_second"] / base["tokens_per_second"], 4)
        pred = predicted_tokens_per_step(trees["learned"])
        rows.append({"family": fam, "prompt_file": name, "learn_offset": offset,
                     "held_out_offset": offset + stride // 2, "stride": stride,
                     "prompts": n,
                     "learn_drift": learn.get("drift"), "held_out": res,
                     "learned_predicted_tokens_per_step": pred,
                     "learned_prediction_error": round(
                         pred / res["learned"]["tokens_per_step"] - 1, 4)})
    out = {"command": COMMAND, "model": info["model"], "dtype": info["dtype"],
           "default_tree": info["tree"], "profile": inp.profile_src,
           "max_new_tokens": t, "rounds": args.rounds, "families": rows, **stamp()}
    write_json(d / "learn.json", out)
    print(f"{'family':>15} {'text drift':>10} {'model err':>9} {'speed':>6} | held out: "
          f"{'default':>14} {'control':>14} {'learned':>14} {'learned pred':>14}")
    for r in rows:
        dr, h = r["learn_drift"] or {}, r["held_out"]
        cell = {k: f"{v['tokens_per_step']:.2f} {v['speedup_vs_default']:.2f}x"
                for k, v in h.items()}
        print(f"{r['family']:>15} {100 * dr.get('text', 0):>+9.1f}% "
              f"{100 * dr['model']['tokens_per_step']:>+8.1f}% "
              f"{1 + dr.get('speed', 0):>5.2f}x | {cell['default']:>22} {cell['control']:>14} "
              f"{cell['learned']:>14} {r['learned_predicted_tokens_per_step']:>7.2f} "
              f"({100 * r['learned_prediction_error']:+.1f}%)")
    print("held out: tokens/step and tokens/s over the default tree, interleaved; learned "
          f"pred: the learned tree's replayed tokens/step vs measured. wrote {d / 'learn.json'}")


if __name__ == "__main__":
    main()
