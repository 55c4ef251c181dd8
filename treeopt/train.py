"""Train the K prompt tokens by self-distillation (only K × hidden parameters learn).

Prompt token i (1..K) inserted after position t learns the teacher's next-token
distribution at position t+i (i.e. for token t+1+i): KL(teacher_topk ‖ student), the
teacher being the frozen base model on its own greedy response (top-k renormalised),
optionally mixed with cross-entropy on the teacher's argmax. Many insertion points per
sequence train in one forward (distill.group_logits) on top of the sequence's cached KV,
so the backward pass only runs through the prompt-token rows.
"""
from __future__ import annotations

import math
import pathlib
import random
import shlex
import sys
import time

import torch

from . import distill
from .cliutil import add_model_args, positive_int, say
from .errors import BadInput
from .prompt_tokens import PromptTokens

HELP = "train the prompt tokens by self-distillation"
CHECKPOINT = "checkpoint.pt"


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    p.add_argument("--prompts", action="append", required=True, metavar="FILE.jsonl",
                   help="training prompt file (repeatable)")
    p.add_argument("--limit-per-file", type=positive_int, help="first N prompts of each file")
    p.add_argument("--eval-prompts", help="held-out prompt file for the final accuracy table "
                   "(default: 10%% of the training prompts, held out)")
    p.add_argument("--eval-limit", type=positive_int, default=40)
    p.add_argument("--num-prompt-tokens", type=positive_int, default=3)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, help="optimizer steps (default 300)")
    g.add_argument("--minutes", type=float, help="wall-clock budget for the training loop")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=positive_int, default=4, help="sequences per step")
    p.add_argument("--groups", type=positive_int, default=48,
                   help="insertion points per sequence per step")
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of cross-entropy on the teacher's argmax beside the KL")
    p.add_argument("--max-new-tokens", type=positive_int, default=160,
                   help="length of the self-distilled responses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for the prompt tokens")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")


def distill_loss(logits: torch.Tensor, sample: distill.Sample, insert_at: torch.Tensor,
                 ce_weight: float = 0.0, decay: float = 0.8) -> tuple[torch.Tensor, dict]:
    """Loss of prompt logits [G, K, V] against the teacher's top-k at t_g + i."""
    g, k, _ = logits.shape
    s = len(sample.ids)
    pos = insert_at[:, None].cpu() + torch.arange(1, k + 1)[None]  # teacher position t+i
    valid = pos <= s - 2  # the target token t+1+i exists
    pos = pos.clamp(max=s - 2)
    idx = sample.top_idx[pos].long().to(logits.device)  # [G, K, k_t]
    p = torch.softmax(sample.top_lp[pos].float(), -1).to(logits.device)
    logq = torch.log_softmax(logits, -1)
    lq = torch.gather(logq, -1, idx)
    kl = (p * (torch.log(p + 1e-12) - lq)).sum(-1)  # [G, K]
    ce = -lq[..., 0]
    w = (decay ** torch.arange(k, dtype=torch.float32, device=logits.device))[None]
    valid = valid.to(logits.device)
    per = (kl + ce_weight * ce) * w * valid
    loss = per.sum() / valid.sum().clamp(min=1)
    with torch.no_grad():
        top1 = (logits.argmax(-1) == idx[..., 0]) & valid
        stats = {"kl": float((kl * valid).sum() / valid.sum().clamp(min=1)),
                 "top1": (top1.sum(0) / valid.sum(0).clamp(min=1)).tolist()}
    return loss, stats


def split_heldout(texts: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: every ~1/fraction-th prompt by content hash."""
    import hashlib

    every = max(1, round(1 / fraction))
    held_out = [int(hashlib.md5(t.encode()).hexdigest(), 16) % every == 0 for t in texts]
    return ([t for t, h in zip(texts, held_out) if not h],
            [t for t, h in zip(texts, held_out) if h])


def main(args) -> dict:
    from . import models, prompts

    if args.lr <= 0:
        raise BadInput(f"--lr must be > 0, got {args.lr}")
    if args.minutes is not None and args.minutes <= 0:
        raise BadInput(f"--minutes must be > 0, got {args.minutes}")
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
    out = pathlib.Path(args.out)
    human = not args.json
    quiet = not human
    t0 = time.perf_counter()
    lm = models.load(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    k = args.num_prompt_tokens
    samples = distill.load_samples(lm, train_texts, args.max_new_tokens, quiet=quiet,
                                   tag="train data")
    eval_samples = distill.load_samples(lm, eval_texts, args.max_new_tokens, quiet=quiet,
                                        tag="eval data")
    samples = [s for s in samples if s.response_len >= 3]
    if not samples:
        raise BadInput("no training sequence has a response of 3 tokens or more")
    t_data = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    init = PromptTokens.init_from_text(lm.model, lm.tokenizer, k)
    table = torch.nn.Parameter(init.embeddings.clone().to(lm.device))
    opt = torch.optim.Adam([table], lr=args.lr)
    total = args.steps or (10**9 if args.minutes else 300)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))
        if args.steps or not args.minutes else 1.0)
    step, trained_seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file() and not args.fresh:
        state = torch.load(ckpt, weights_only=False)
        if list(state["table"].shape) != list(table.shape):
            raise BadInput(f"{ckpt}: checkpoint has shape {list(state['table'].shape)}, "
                           f"expected {list(table.shape)} (use --fresh)")
        table.data.copy_(state["table"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, trained_seconds = state["step"], state["seconds"]
        rng.setstate(state["rng"])
        if human:
            say(f"resuming from {ckpt} at step {step}")
    kv_memo: dict[int, list] = {}  # per-sequence KV, computed once (no grad)
    from tqdm import tqdm

    bar = tqdm(total=None if args.minutes else total, initial=step, desc="train",
               file=sys.stderr, disable=quiet, dynamic_ncols=True, leave=False)
    t_loop = time.perf_counter() - trained_seconds
    rows, history = 0, []
    while step < total:
        if args.minutes and time.perf_counter() - t_loop > 60 * args.minutes:
            break
        opt.zero_grad(set_to_none=True)
        agg = {"kl": 0.0, "top1": [0.0] * k}
        for _ in range(args.batch):
            i = rng.randrange(len(samples))
            s = samples[i]
            if i not in kv_memo:
                kv_memo[i] = distill.prefix_pass(lm, s.ids)[0]
            lo, hi = s.prompt_len - 1, len(s.ids) - 3
            at = torch.tensor(sorted(rng.sample(range(lo, hi + 1),
                                                min(args.groups, hi - lo + 1))),
                              device=lm.device)
            logits = distill.group_logits(lm, kv_memo[i], len(s.ids), at, table)
            loss, st = distill_loss(logits, s, at, args.ce_weight)
            (loss / args.batch).backward()
            rows += at.numel() * k
            agg["kl"] += st["kl"] / args.batch
            agg["top1"] = [a + b / args.batch for a, b in zip(agg["top1"], st["top1"])]
        opt.step()
        sched.step()
        step += 1
        history.append(agg)
        recent = history[-10:]
        bar.update(1)
        bar.set_postfix(kl=f"{sum(h['kl'] for h in recent) / len(recent):.3f}",
                        top1="/".join(f"{sum(h['top1'][d] for h in recent) / len(recent):.2f}"
                                      for d in range(k)))
        if step % 25 == 0:
            _checkpoint(ckpt, table, opt, sched, step, time.perf_counter() - t_loop, rng)
    bar.close()
    seconds = time.perf_counter() - t_loop
    _checkpoint(ckpt, table, opt, sched, step, seconds, rng)

    topk = 10
    ranks, _ = distill.measure_ranks(lm, eval_samples, table.detach(), topk, quiet=quiet)
    acc = distill.accuracy_table(ranks, topk)
    table_rows = [{"depth": d + 1, "top1": round(distill.topn(acc[d], 1), 4),
                   "top5": round(distill.topn(acc[d], 5), 4),
                   "top10": round(distill.topn(acc[d], 10), 4)} for d in range(k)]
    pt = PromptTokens(table.detach().float().cpu(), {
        "model": lm.model_id, "hidden_size": int(table.shape[1]),
        "trained_dtype": models.dtype_name(lm.dtype),
        "training": {"command": "treeopt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                     "prompt_files": args.prompts, "train_sequences": len(samples),
                     "steps": step, "lr": args.lr, "batch": args.batch,
                     "groups": args.groups, "ce_weight": args.ce_weight, "seed": args.seed,
                     "max_new_tokens": args.max_new_tokens,
                     "loop_seconds": round(seconds, 1), "data_seconds": round(t_data, 1),
                     "prompt_token_rows_per_second": round(rows / max(seconds, 1e-9), 1)},
        "eval": {"prompts": args.eval_prompts or "10% of the training prompts, held out",
                 "sequences": len(eval_samples), "positions": int(ranks.shape[0]),
                 "accuracy": table_rows},
    })
    pt.save(out)
    result = {"out": str(out), "steps": step, "loop_seconds": round(seconds, 1),
              "data_seconds": round(t_data, 1), "total_seconds": round(time.perf_counter() - t0, 1),
              "prompt_token_rows_per_second": pt.meta["training"]["prompt_token_rows_per_second"],
              "accuracy": table_rows, "eval_positions": int(ranks.shape[0])}
    if human:
        say(f"trained {step} steps in {seconds:.0f} s (+{t_data:.0f} s data), "
            f"{result['prompt_token_rows_per_second']:.0f} prompt-token rows/s")
        say(f"held-out accuracy over {ranks.shape[0]} positions:")
        say("depth  top-1   top-5   top-10")
        for r in table_rows:
            say(f"{r['depth']:>5}  {r['top1']:.3f}   {r['top5']:.3f}   {r['top10']:.3f}")
        say(f"wrote {out}")
    return result


def _checkpoint(path, table, opt, sched, step, seconds, rng) -> None:
    import io

    from .artefact import write_atomic

    buf = io.BytesIO()
    torch.save({"table": table.detach().cpu(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "step": step, "seconds": seconds,
                "rng": rng.getstate()}, buf)
    write_atomic(path, buf.getvalue())
