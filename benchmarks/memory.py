"""Peak memory of `treeopt run` against HF `generate`, each decoder in a fresh process,
in float32 and bfloat16 on the embedded model.

On the CPU the figure is the process's peak resident set (ru_maxrss: interpreter,
weights, caches, activations — what a user must have free); on CUDA it is
`torch.cuda.max_memory_allocated`. Decoders (each with the same greedy prompt):

- `hf`: the model loaded as treeopt loads it, HF `generate` (stock kernels);
- `run`: what `treeopt run` does (`open_decoder`, the searched tree; in float32 on an
  x86 CPU the linears packed in place);
- `run+hf`: what `bench` does (HF beside the engine: a packed copy, the stock model kept).

Processes alternate by round (hf, run, run+hf, hf, …) so the machine's drift hits all
alike; medians of peak and tokens/s are printed, and the ratios to `hf`.

    python benchmarks/memory.py [--max-new-tokens 64] [--rounds 2] [--dtypes float32,bfloat16]
"""
import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
from treeopt import prompts
from treeopt.device import peak_memory
from treeopt.inputs import resolve_inputs
from treeopt.runtime import open_decoder
mode, n, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
inp = resolve_inputs(dtype=dtype, want=("tree", "corpus"))
dec, info = open_decoder(inp, dtype=dtype, hf_beside=mode != "run")
ids = prompts.encode(dec.lm.tokenizer, prompts.BUILTIN[1])
res = dec.hf_generate(ids, n) if mode == "hf" else dec.ppd(ids, n)
print(json.dumps({"mode": mode, "peak": peak_memory(dec.device), "kernels": info["kernels"],
                  "tokens_per_second": res.tokens_per_second, "output_ids": res.output_ids,
                  "device": info["device"], "tree": info["tree"]}))
"""
MODES = ("hf", "run", "run+hf")


def child(mode: str, n: int, dtype: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), dtype],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{mode} {dtype} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    table = {}
    for dtype in args.dtypes.split(","):
        runs = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(child(mode, args.max_new_tokens, dtype))
        row = {}
        for mode, rs in runs.items():
            row[mode] = {"peak_mib": statistics.median(r["peak"]["bytes"] for r in rs) / 2**20,
                         "tokens_per_second": statistics.median(r["tokens_per_second"]
                                                                for r in rs),
                         "kernels": rs[0]["kernels"], "measure": rs[0]["peak"]["measure"]}
        same = runs["run"][0]["output_ids"] == runs["hf"][0]["output_ids"]
        for mode in MODES:
            r = row[mode]
            print(f"{dtype:>9} {mode:>7}: peak {r['peak_mib']:7.1f} MiB "
                  f"({r['peak_mib'] / row['hf']['peak_mib']:.3f}x hf), "
                  f"{r['tokens_per_second']:6.1f} tok/s, kernels {r['kernels']}")
        print(f"{dtype:>9} run output identical to HF generate: {same} "
              f"({runs['run'][0]['device']}, {row['run']['measure']})")
        table[dtype] = {**row, "run_identical_to_hf": same}
    print(json.dumps(table))


if __name__ == "__main__":
    main()
