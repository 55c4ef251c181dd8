"""Where an exported draft length stands among all of them, measured on this machine.

`treeopt search --export vllm` (or trtllm) chooses K(B) per batch size from the profile and
the engine's draft rule replayed; this runs the exported chain — as treeopt's prompt
lookup, `serving.chain_tree` — at every K = 0..KMAX by brute force at each batch size, on
chat and input-grounded prompts outside the acceptance sample (MT-Bench's even rows; the
acceptance file measured its odd ones), interleaved round by round, and reports per B:
tokens/s of each K over the full-batch steps (median of rounds), the fastest K, the
exported K and its ratio to the fastest, and the export's predicted tokens/s against the
measured at run speed (the prediction scaled by measured ÷ predicted plain decoding, as
the bench's speed-drift rescaling does).

    python benchmarks/serving_k.py --about PROFILE_STEM.vllm.about.json [--batch 1,2,4]
        [--rounds 2] [--limit 6] [--max-new-tokens 96]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from treeopt import paths, prompts, serving
from treeopt.acceptance import load as load_acceptance
from treeopt.batch import BatchDecoder
from treeopt.evaluation import full_batch_speed
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder

FAMILIES = (("mt-bench", 0, 2), ("input-grounded", 0, 1))  # the acceptance sample: mt-bench 1::2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--about", required=True, help="the export's .about.json")
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=6, help="prompts per family")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    about = json.load(open(args.about))
    if about.get("engine") == "sglang":
        print("SGLang's trie has no treeopt form: nothing to run", file=sys.stderr)
        return 2
    knobs, source, engine = about["knobs"], about["source"], about["engine"]
    exported = {int(b): r["draft_tokens"] for b, r in
                ((r["batch"], r) for r in about["per_batch"])}
    predicted = {r["batch"]: r for r in about["per_batch"]}
    batches = [int(b) for b in args.batch.split(",")]
    dec, _ = open_decoder(resolve_inputs(None, want=("tree",)), None, about["tuned_on"]["dtype"])
    acc = load_acceptance(paths.stored_path(about["tuned_on"]["acceptance"]))
    sample = set(serving.sample_of(acc)[0])
    texts = [t for name, off, stride in FAMILIES
             for t in prompts.load(name, args.limit, off, stride)]
    if set(texts) & sample:
        print("the benched prompts overlap the acceptance sample", file=sys.stderr)
        return 2
    encoded = dec.encode_prompts(texts, args.max_new_tokens)
    k = dec.prompt_tokens.num
    kmax = serving.KMAX
    decoders = {b: {K: BatchDecoder(dec.lm, dec.prompt_tokens, {b: serving.chain_tree(
        K, *serving.window(engine, source, knobs), k) if K else None}) for K in range(kmax + 1)}
        for b in batches}
    for b in batches:  # warm-up: allocator and lazy init, outside the timed rounds
        for K in (0, kmax):
            decoders[b][K].generate(encoded[:b], 8, max_batch=b, learn=False)
    speeds = {b: {K: [] for K in range(kmax + 1)} for b in batches}
    for r in range(args.rounds):
        for b in batches:
            order = list(range(kmax + 1)) if r % 2 == 0 else list(range(kmax, -1, -1))
            for K in order:
                res = decoders[b][K].generate(encoded, args.max_new_tokens, max_batch=b,
                                              timed=True, learn=False)
                speeds[b][K].append(full_batch_speed(res, b))
    rows = []
    for b in batches:
        med = {K: statistics.median(v) for K, v in speeds[b].items()}
        best = max(med, key=med.get)
        ke = exported.get(b)
        drift = med[0] / predicted[b]["plain_tokens_per_second"] if b in predicted else None
        at_speed = predicted[b]["tokens_per_second"] * drift if drift else None
        rows.append({"batch": b, "tokens_per_second": {K: round(v, 2) for K, v in med.items()},
                     "fastest_k": best, "exported_k": ke,
                     "exported_vs_fastest": round(med[ke] / med[best], 4) if ke is not None
                     else None,
                     "predicted_at_run_speed": round(at_speed, 2) if at_speed else None,
                     "prediction_error": round(at_speed / med[ke] - 1, 4)
                     if at_speed and ke is not None else None,
                     "speed_vs_profile": round(1 / drift, 3) if drift else None})
    print(json.dumps({"about": args.about, "engine": engine, "source": source,
                      "prompts": len(encoded), "max_new_tokens": args.max_new_tokens,
                      "rounds": args.rounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
