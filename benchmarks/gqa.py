"""What handing a GQA model's KV heads to SDPA unrepeated changes in the engine's step.

With a 4-D float mask transformers' SDPA path repeats the KV heads (`repeat_kv`) every
layer every step; TRANSFORMERS_SDPA_FORCE_GQA=1 passes them as they are (`enable_gqa`).
Per (B, C, L): the engine's step, both ways interleaved by round (medians, ratio), and
whether a batched greedy decode gives the same tokens both ways.

    python benchmarks/gqa.py [--dtype float32] [--batch 1,8] [--contexts 512,2048]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from treeopt import prompts  # noqa: E402
from treeopt.engine import Engine  # noqa: E402
from treeopt.models import load  # noqa: E402

FLAG = "TRANSFORMERS_SDPA_FORCE_GQA"


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--lengths", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lm = load(None, dtype=args.dtype, device="cpu")
    cfg = lm.config
    print(f"{lm.model_id} {args.dtype}: {cfg.num_attention_heads} heads, "
          f"{cfg.num_key_value_heads} KV heads")
    for B in map(int, args.batch.split(",")):
        for C in map(int, args.contexts.split(",")):
            for L in map(int, args.lengths.split(",")):
                eng = Engine(lm, None, {1: None}, room=L)
                step = eng.timed_step(B, L, C)
                step()
                times = {False: [], True: []}
                for _ in range(args.rounds):  # interleaved
                    for forced in (False, True):
                        os.environ.pop(FLAG, None)
                        if forced:
                            os.environ[FLAG] = "1"
                        times[forced] += timed(step, 3)
                os.environ.pop(FLAG, None)
                a, b = statistics.median(times[False]), statistics.median(times[True])
                print(f"B={B:>2} C={C:>5} L={L:>3}: repeat_kv {1000 * a:8.2f} ms, "
                      f"enable_gqa {1000 * b:8.2f} ms, ratio {b / a:.3f}")
    ids = [prompts.encode(lm.tokenizer, t) for t in prompts.BUILTIN[:4]]
    outs = {}
    for forced in (False, True):
        os.environ.pop(FLAG, None)
        if forced:
            os.environ[FLAG] = "1"
        res = Engine(lm, None, {1: None}).generate(ids, 48)
        outs[forced] = [r.output_ids for r in res.results]
    os.environ.pop(FLAG, None)
    print(f"batched greedy decode (4 prompts, 48 tokens) identical both ways: "
          f"{outs[False] == outs[True]}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
