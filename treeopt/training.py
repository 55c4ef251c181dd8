"""Train the K prompt tokens by self-distillation (only K × hidden parameters learn).

Prompt token i (1..K) inserted after position t learns the teacher's next-token
distribution at position t+i (i.e. for token t+1+i): KL(teacher_topk ‖ student), the
teacher being the frozen base model on its own greedy response (top-k renormalised),
optionally mixed with cross-entropy on the teacher's argmax. Many insertion points per
sequence train in one forward (distill.group_logits) on top of the sequence's cached KV,
so the backward pass only runs through the prompt-token rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import pathlib
import random
import time

import torch

from . import distill
from .acceptance import marginal
from .artefact import write_atomic
from .errors import BadInput
from .models import Loaded
from .progress import progress
from .prompt_tokens import PromptTokens

CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass
class Settings:
    num_prompt_tokens: int = 3
    steps: int | None = None
    minutes: float | None = None
    lr: float = 1e-2
    batch: int = 4
    groups: int = 48
    ce_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise BadInput(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise BadInput(f"minutes must be a finite number > 0, got {self.minutes}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise BadInput(f"cross-entropy weight must be a finite number ≥ 0, got "
                           f"{self.ce_weight}")

    @property
    def total_steps(self) -> int:
        return self.steps or (10**9 if self.minutes else 300)


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
    every = max(1, round(1 / fraction))
    held_out = [int(hashlib.md5(t.encode()).hexdigest(), 16) % every == 0 for t in texts]
    return ([t for t, h in zip(texts, held_out) if not h],
            [t for t, h in zip(texts, held_out) if h])


def save_checkpoint(path, table, opt, sched, step, seconds, rng) -> None:
    buf = io.BytesIO()
    torch.save({"table": table.detach().cpu(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "step": step, "seconds": seconds,
                "rng": list(rng.getstate()[1]), "rng_version": rng.getstate()[0]}, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: pathlib.Path, shape) -> dict:
    """A checkpoint's state, loaded with weights_only=True (no code runs from the file)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle refusals, truncation, not a torch file
        raise BadInput(f"{path}: not a treeopt checkpoint ({e.__class__.__name__}); "
                       "use --fresh to ignore it") from e
    if not isinstance(state, dict) or not isinstance(state.get("table"), torch.Tensor):
        raise BadInput(f"{path}: not a treeopt checkpoint; use --fresh to ignore it")
    if list(state["table"].shape) != list(shape):
        raise BadInput(f"{path}: checkpoint has shape {list(state['table'].shape)}, "
                       f"expected {list(shape)} (use --fresh)")
    if not torch.isfinite(state["table"]).all():
        raise BadInput(f"{path}: checkpoint holds non-finite values; use --fresh")
    return state


def train(lm: Loaded, samples: list[distill.Sample], settings: Settings, out: pathlib.Path,
          fresh: bool = False, quiet: bool = False) -> dict:
    """The training loop (resumable from `out`/checkpoint.pt); returns the table and its
    statistics."""
    st = settings
    k = st.num_prompt_tokens
    torch.manual_seed(st.seed)
    rng = random.Random(st.seed)
    init = PromptTokens.init_from_text(lm.model, lm.tokenizer, k)
    table = torch.nn.Parameter(init.embeddings.clone().to(lm.device))
    opt = torch.optim.Adam([table], lr=st.lr)
    total = st.total_steps
    cosine = bool(st.steps or not st.minutes)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))) if cosine else 1.0)
    step, trained_seconds, resumed = 0, 0.0, None
    ckpt = out / CHECKPOINT
    if ckpt.is_file() and not fresh:
        state = load_checkpoint(ckpt, table.shape)
        table.data.copy_(state["table"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, trained_seconds = int(state["step"]), float(state["seconds"])
        rng.setstate((state["rng_version"], tuple(state["rng"]), None))
        resumed = step
    kv_memo: dict[int, list] = {}  # per-sequence KV, computed once (no grad)
    bar = progress(None, "train", None if st.minutes else total, quiet, initial=step)
    t_loop = time.perf_counter() - trained_seconds
    rows, history = 0, []
    while step < total:
        if st.minutes and time.perf_counter() - t_loop > 60 * st.minutes:
            break
        opt.zero_grad(set_to_none=True)
        agg = {"kl": 0.0, "top1": [0.0] * k}
        for _ in range(st.batch):
            i = rng.randrange(len(samples))
            s = samples[i]
            if i not in kv_memo:
                kv_memo[i] = distill.prefix_pass(lm, s.ids)[0]
            lo, hi = s.prompt_len - 1, len(s.ids) - 3
            at = torch.tensor(sorted(rng.sample(range(lo, hi + 1), min(st.groups, hi - lo + 1))),
                              device=lm.device)
            logits = distill.group_logits(lm, kv_memo[i], len(s.ids), at, table)
            loss, stats = distill_loss(logits, s, at, st.ce_weight)
            (loss / st.batch).backward()
            rows += at.numel() * k
            agg["kl"] += stats["kl"] / st.batch
            agg["top1"] = [a + b / st.batch for a, b in zip(agg["top1"], stats["top1"])]
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
            save_checkpoint(ckpt, table, opt, sched, step, time.perf_counter() - t_loop, rng)
    bar.close()
    seconds = time.perf_counter() - t_loop
    save_checkpoint(ckpt, table, opt, sched, step, seconds, rng)
    return {"table": table.detach(), "steps": step, "seconds": seconds, "rows": rows,
            "resumed_at": resumed}


def heldout_accuracy(lm: Loaded, samples: list[distill.Sample], table: torch.Tensor,
                     topk: int = 10, quiet: bool = False) -> tuple[list[dict], int]:
    """Top-1/5/10 per depth over held-out sequences, and the number of positions."""
    ranks, _ = distill.measure_ranks(lm, samples, table, topk, quiet=quiet)
    acc, _, _ = marginal(ranks.numpy(), topk)
    rows = [{"depth": d + 1, "top1": round(float(acc[d, :1].sum()), 4),
             "top5": round(float(acc[d, :5].sum()), 4),
             "top10": round(float(acc[d, :10].sum()), 4)} for d in range(acc.shape[0])]
    return rows, int(ranks.shape[0])
