"""Train the prompt tokens by self-distillation (see treeopt/training.py for the loss)."""
from __future__ import annotations

import pathlib
import time

from .. import distill, prompts
from ..artefact import mask_secrets, stamp
from ..errors import BadInput
from ..models import dtype_name, load
from ..prompt_tokens import PromptTokens
from ..training import Settings, heldout_accuracy, split_heldout, train
from .common import add_model_args, finite_float, positive_int, say, seed_int

HELP = "train the prompt tokens by self-distillation"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    p.add_argument("--prompts", action="append", required=True, metavar="NAME|FILE.jsonl",
                   help="training prompts: a shipped set or a JSONL file (repeatable)")
    p.add_argument("--limit-per-file", type=positive_int, help="first N prompts of each file")
    p.add_argument("--eval-prompts", help="held-out prompts for the final accuracy table "
                   "(default: 10%% of the training prompts, held out)")
    p.add_argument("--eval-limit", type=positive_int, default=40)
    p.add_argument("--num-prompt-tokens", type=positive_int, default=3)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, help="optimizer steps (default 300)")
    g.add_argument("--minutes", type=finite_float(0, open_lo=True),
                   help="wall-clock budget for the training loop")
    p.add_argument("--lr", type=finite_float(0, open_lo=True), default=1e-2)
    p.add_argument("--batch", type=positive_int, default=4, help="sequences per step")
    p.add_argument("--groups", type=positive_int, default=48,
                   help="insertion points per sequence per step")
    p.add_argument("--ce-weight", type=finite_float(0), default=0.0,
                   help="weight of cross-entropy on the teacher's argmax beside the KL")
    p.add_argument("--max-new-tokens", type=positive_int, default=160,
                   help="length of the self-distilled responses")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, help="output folder for the prompt tokens")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")


def main(args) -> dict:
    settings = Settings(args.num_prompt_tokens, args.steps, args.minutes, args.lr, args.batch,
                        args.groups, args.ce_weight, args.seed)
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: exists and is not a folder")
    texts = []
    for f in args.prompts:
        texts += prompts.load(f, args.limit_per_file)
    if args.eval_prompts:
        seen = set(texts)  # never evaluate on a training prompt
        eval_texts = [t for t in prompts.load(args.eval_prompts) if t not in seen]
        eval_texts = eval_texts[: args.eval_limit]
        if not eval_texts:
            raise BadInput("--eval-prompts: every prompt is also a training prompt")
        train_texts = texts
    else:
        train_texts, eval_texts = split_heldout(texts)
        eval_texts = eval_texts[: args.eval_limit]
    human = not args.json
    t0 = time.perf_counter()
    lm = load(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    samples = distill.load_samples(lm, train_texts, args.max_new_tokens, quiet=not human,
                                   tag="train data")
    eval_samples = distill.load_samples(lm, eval_texts, args.max_new_tokens, quiet=not human,
                                        tag="eval data")
    samples = [s for s in samples if s.response_len >= 3]
    if not samples:
        raise BadInput("no training sequence has a response of 3 tokens or more")
    t_data = time.perf_counter() - t0
    res = train(lm, samples, settings, out, args.fresh, quiet=not human)
    if human and res["resumed_at"] is not None:
        say(f"resumed from {out}/checkpoint.pt at step {res['resumed_at']}")
    rows, positions = heldout_accuracy(lm, eval_samples, res["table"], quiet=not human)
    seconds = res["seconds"]
    rate = round(res["rows"] / max(seconds, 1e-9), 1)
    pt = PromptTokens(res["table"].float().cpu(), {
        "model": lm.model_id, "hidden_size": int(res["table"].shape[1]),
        "trained_dtype": dtype_name(lm.dtype),
        "training": {"command": stamp()["command"],
                     "prompt_files": [mask_secrets(f) for f in args.prompts],
                     "train_sequences": len(samples), "steps": res["steps"], "lr": args.lr,
                     "batch": args.batch, "groups": args.groups, "ce_weight": args.ce_weight,
                     "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                     "loop_seconds": round(seconds, 1), "data_seconds": round(t_data, 1),
                     "prompt_token_rows_per_second": rate},
        "eval": {"prompts": args.eval_prompts or "10% of the training prompts, held out",
                 "sequences": len(eval_samples), "positions": positions, "accuracy": rows},
    })
    pt.save(out)
    result = {"out": str(out), "steps": res["steps"], "loop_seconds": round(seconds, 1),
              "data_seconds": round(t_data, 1),
              "total_seconds": round(time.perf_counter() - t0, 1),
              "prompt_token_rows_per_second": rate, "accuracy": rows,
              "eval_positions": positions}
    if human:
        say(f"trained {res['steps']} steps in {seconds:.0f} s (+{t_data:.0f} s data), "
            f"{rate:.0f} prompt-token rows/s")
        say(f"held-out accuracy over {positions} positions:")
        say("depth  top-1   top-5   top-10")
        for r in rows:
            say(f"{r['depth']:>5}  {r['top1']:.3f}   {r['top5']:.3f}   {r['top10']:.3f}")
        say(f"wrote {out}")
    return result
