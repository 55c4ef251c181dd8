"""Peak memory of PPD decoding vs the plain greedy loop, each in a fresh process.

On CPU the figure is the process's peak resident set (ru_maxrss: weights, runtime, cache,
activations); on CUDA it is torch.cuda.max_memory_allocated. Prints both and the ratio.

    python benchmarks/memory.py [--max-new-tokens 128] [--dtype auto] [--batch B]

With --batch B: B MT-Bench prompts decoded as one batch, the tree's per-batch table
(batched PPD) vs the plain batched loop of the same runtime.
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from treeopt import prompts
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder
from treeopt.batch import BatchDecoder, schedule_of
mode, n, dtype, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
dec, info = open_decoder(resolve_inputs(dtype=dtype, want=("tree",)), dtype=dtype)
if batch:
    texts = prompts.load("mt-bench", limit=batch, stride=4)
    many = [prompts.encode(dec.lm.tokenizer, t) for t in texts]
    sched = schedule_of(dec.tree) if mode == "ppd" else {1: None}
    bd = BatchDecoder(dec.lm, dec.prompt_tokens, sched)
if dec.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
if batch:
    res = bd.generate(many, n)
else:
    ids = prompts.encode(dec.lm.tokenizer, prompts.BUILTIN[1])
    res = (dec.ppd if mode == "ppd" else dec.baseline)(ids, n)
peak = (torch.cuda.max_memory_allocated() if dec.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"mode": mode, "peak_bytes": peak, "new_tokens": res.new_tokens,
                  "device": info["device"], "tree": info["tree"]}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: one prompt)")
    args = ap.parse_args()
    out = {}
    for mode in ("baseline", "ppd"):
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.max_new_tokens),
                            args.dtype, str(args.batch)], capture_output=True, text=True,
                           check=True)
        out[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    ratio = out["ppd"]["peak_bytes"] / out["baseline"]["peak_bytes"]
    print(f"peak memory: baseline {out['baseline']['peak_bytes'] / 2**20:.1f} MiB, "
          f"PPD {out['ppd']['peak_bytes'] / 2**20:.1f} MiB, ratio {ratio:.4f} "
          f"({out['ppd']['device']})")
    print(json.dumps({**out, "ratio": round(ratio, 5)}))


if __name__ == "__main__":
    main()
