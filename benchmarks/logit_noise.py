"""How far a tree forward's logits drift from one-token forwards, per dtype.

Runs PPD on a few prompts, records the root row of every tree forward (absolute position
p), then recomputes the logits at p the way HF `generate` does (one token at a time on a
KV cache) and reports max / p99.9 of |difference|. evaluation.MARGIN_TOLERANCE is set from
these numbers. Usage: python benchmarks/logit_noise.py [--dtype bfloat16] [--limit 8]
"""
import argparse
import json

import torch

from treeopt import prompts
from treeopt.inputs import resolve_inputs
from treeopt.runtime import new_cache, open_decoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    dec, info = open_decoder(resolve_inputs(dtype=args.dtype, want=("tree",)), dtype=args.dtype)
    call = dec.call
    diffs = []
    for text in prompts.load(None, args.limit):
        ids = prompts.encode(dec.lm.tokenizer, text)
        rows = {}

        def recording(embeds, cache, positions, mask=None, head=True):
            out = call(embeds, cache, positions, mask, head)
            if head and embeds.shape[0] > 1 and int(positions[0]) >= len(ids):
                rows[int(positions[0])] = out[0].clone()  # the tree's root row
            return out

        dec.call = recording
        res = dec.ppd(ids, args.max_new_tokens)
        dec.call = call
        seq = ids + res.output_ids
        with torch.inference_mode():
            cache = new_cache()
            call(dec.embed(torch.tensor(seq[:len(ids)])), cache, torch.arange(len(ids)),
                 head=False)
            for p in range(len(ids), len(seq) - 1):
                logits = call(dec.embed(torch.tensor([seq[p]])), cache, torch.tensor([p]))
                if p in rows:
                    diffs.append((logits[-1] - rows[p]).abs().max().item())
    diffs.sort()
    print(json.dumps({"dtype": args.dtype, "rows_compared": len(diffs),
                      "max_abs_logit_diff": diffs[-1] if diffs else None,
                      "p999": diffs[int(0.999 * (len(diffs) - 1))] if diffs else None,
                      "median": diffs[len(diffs) // 2] if diffs else None}))


if __name__ == "__main__":
    main()
