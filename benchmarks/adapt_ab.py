"""The adapting runtime against the static tree and plain decoding, in one process.

`treeopt run` and `bench` adapt by default (treeopt.adapt: the tree, a smaller one, its
chains alone or plain, chosen step by step from the run's own evidence). This measures
what that costs or gains where the tree is right and where it is not: one model load, the
tree found for this machine and dtype, three batch decoders over the same prompts —
adapting, static (`--no-adapt`) and plain — interleaved round by round (the order
reversed every other round), on chat and input-grounded prompts outside the acceptance
sample (MT-Bench's even rows; the acceptance file measured its odd ones). Per batch size:
tokens/s over the full-batch steps (median of rounds), the ratios adapting/static,
adapting/plain and static/plain, and the candidates the adapting steps ran.

`--slower-per-row MS` makes this machine one where the tree does not pay: every step
sleeps MS milliseconds per input row (B × L) inside its forward, as a machine with a
steeper t(L) than the profile's would take — the case the runtime must notice and leave.

    python benchmarks/adapt_ab.py [--batch 1,2,4] [--rounds 3] [--limit 4]
        [--max-new-tokens 64] [--dtype bfloat16] [--slower-per-row MS]
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

from treeopt import prompts
from treeopt.batch import BatchDecoder, schedule_of
from treeopt.engine import loop
from treeopt.evaluation import fresh_evidence, full_batch_speed
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder

FAMILIES = (("mt-bench", 0, 2), ("input-grounded", 0, 1))  # the acceptance sample: mt-bench 1::2
CONFIGS = ("adapting", "static", "plain")


def slower(per_row: float) -> None:
    """Every engine step sleeps per_row seconds per input row inside its forward (the
    engine calls its module's `step` at each step: the sleep is timed as the step)."""
    forward = loop.step

    def step(st, B, L, C, *rest):
        out = forward(st, B, L, C, *rest)
        time.sleep(per_row * B * L)
        return out
    loop.step = step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=4, help="prompts per family")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--slower-per-row", type=float, default=0.0, metavar="MS",
                    help="sleep MS ms per input row (B x L) in every step's forward")
    args = ap.parse_args()
    if args.slower_per_row > 0:
        slower(args.slower_per_row / 1000)
    batches = [int(b) for b in args.batch.split(",")]
    inp = resolve_inputs(None, dtype=args.dtype, want=("tree",))
    dec, info = open_decoder(inp, None, args.dtype)
    texts = [t for name, off, stride in FAMILIES
             for t in prompts.load(name, args.limit, off, stride)]
    encoded = dec.encode_prompts(texts, args.max_new_tokens)
    schedule = schedule_of(dec.tree)
    decoders = {name: BatchDecoder(dec.lm, dec.prompt_tokens if name != "plain" else None,
                                   schedule if name != "plain" else {1: None},
                                   dec.cache_source, adapt=name == "adapting")
                for name in CONFIGS}
    for d in decoders.values():  # warm-up: allocator and lazy init, outside the rounds
        d.generate(encoded[:max(batches)], 8, max_batch=max(batches), learn=False)
    fresh_evidence(decoders["adapting"].engine)  # warm-up steps are no evidence
    speeds = {b: {c: [] for c in CONFIGS} for b in batches}
    used = {b: collections.Counter() for b in batches}
    for r in range(args.rounds):
        for b in batches:
            for c in CONFIGS if r % 2 == 0 else CONFIGS[::-1]:
                res = decoders[c].generate(encoded, args.max_new_tokens, max_batch=b,
                                           timed=True, learn=False)
                speeds[b][c].append(full_batch_speed(res, b))
                if c == "adapting":
                    used[b].update(x.rstrip("*") for x in res.configs)
    rows = []
    for b in batches:
        med = {c: statistics.median(speeds[b][c]) for c in CONFIGS}
        rows.append({"batch": b, **{f"{c}_tokens_per_second": round(v, 2)
                                    for c, v in med.items()},
                     "adapting_vs_static": round(med["adapting"] / med["static"], 3),
                     "adapting_vs_plain": round(med["adapting"] / med["plain"], 3),
                     "static_vs_plain": round(med["static"] / med["plain"], 3),
                     "adapting_steps": dict(used[b])})
    print(f"tree {info['tree']}, {len(texts)} prompts x {args.max_new_tokens} tokens, "
          f"{args.rounds} rounds (tokens/s over full-batch steps, median of rounds)" +
          (f", +{args.slower_per_row} ms per input row" if args.slower_per_row else ""))
    print(f"{'B':>3} {'adapting':>9} {'static':>8} {'plain':>7} {'ad/static':>9} "
          f"{'ad/plain':>8} {'st/plain':>8}  adapting steps")
    for r in rows:
        print(f"{r['batch']:>3} {r['adapting_tokens_per_second']:>9.1f} "
              f"{r['static_tokens_per_second']:>8.1f} {r['plain_tokens_per_second']:>7.1f} "
              f"{r['adapting_vs_static']:>8.3f}x {r['adapting_vs_plain']:>7.3f}x "
              f"{r['static_vs_plain']:>7.3f}x  {r['adapting_steps']}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
