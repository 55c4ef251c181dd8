"""How far a tree forward's logits drift from one-token forwards, per dtype.

Runs PPD on a few prompts, records the root row of every tree forward (absolute position
p), then recomputes the logits at p the way HF `generate` does (one token at a time on a
KV cache) and reports max / p99.9 of |difference|. bench.MARGIN_TOLERANCE is set from
these numbers. Usage: python benchmarks/logit_noise.py [--dtype bfloat16] [--limit 8]
"""
import argparse
import json

import torch

from treeopt import prompts
from treeopt.runtime import open_decoder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    dec, info = open_decoder(dtype=args.dtype)
    seen = {}
    fwd, lg = dec.forward, dec.logits

    def forward(embeds, cache, positions, mask=None):
        seen["pos"], seen["q"] = int(positions[0]), embeds.shape[0]
        return fwd(embeds, cache, positions, mask)

    diffs = []
    for text in prompts.load(None, args.limit):
        ids = prompts.encode(dec.lm.tokenizer, text)
        rows = {}

        def logits(h):
            out = lg(h)
            if mask_mode[0] and seen.get("q", 1) > 1 and out.dim() == 2 and seen["pos"] >= len(ids):
                rows[seen["pos"]] = out[0].clone()
            return out

        mask_mode = [True]
        dec.forward, dec.logits = forward, logits
        res = dec.ppd(ids, args.max_new_tokens)
        mask_mode[0] = False
        dec.forward, dec.logits = fwd, lg
        seq = ids + res.output_ids
        with torch.inference_mode():
            cache = dec.new_cache()
            dec.forward(dec.embed(torch.tensor(seq[:len(ids)])), cache, torch.arange(len(ids)))
            for p in range(len(ids), len(seq) - 1):
                h = dec.forward(dec.embed(torch.tensor([seq[p]])), cache, torch.tensor([p]))
                if p in rows:
                    diffs.append((dec.logits(h[-1]) - rows[p]).abs().max().item())
    diffs.sort()
    print(json.dumps({"dtype": args.dtype, "rows_compared": len(diffs),
                      "max_abs_logit_diff": diffs[-1] if diffs else None,
                      "p999": diffs[int(0.999 * (len(diffs) - 1))] if diffs else None,
                      "median": diffs[len(diffs) // 2] if diffs else None}))


if __name__ == "__main__":
    main()
