"""Host work per decode step, counted on the CPU (no GPU needed): aten ops dispatched
outside the model's forward and inside it, and device→host syncs, for the plain loop, a
hybrid tree decoding one sequence, and batched steps (treeopt/hostwork.py).

    PYTHONPATH=. python benchmarks/host_work.py [--tokens 32] [--tree T] [--batch 2,4]

Real model in float32, an MT-Bench prompt of the rows no shipped artefact was built on
(even rows), the shipped hybrid tree by default, the shipped corpus behind the cache.
On a GPU each op outside the forward is a launch from Python and each sync drains the
queue; the engine's CUDA graph of the step replays the forward's ops and these alike, so
on a GPU only the plan load, the replay and the read-back remain.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from treeopt import prompts  # noqa: E402
from treeopt.batch import BatchDecoder, schedule_of  # noqa: E402
from treeopt.hostwork import per_step  # noqa: E402
from treeopt.inputs import resolve_inputs  # noqa: E402
from treeopt.measure import decode_host_work  # noqa: E402
from treeopt.paths import SHIPPED  # noqa: E402
from treeopt.runtime import open_decoder  # noqa: E402

TREE = SHIPPED / "cpu-amd-epyc-avx512bf16-2c__SmolLM2-135M-Instruct__bfloat16.tree.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--tree", default=str(TREE))
    ap.add_argument("--batch", default="2,4")
    args = ap.parse_args()
    inp = resolve_inputs(tree=args.tree, want=("corpus",), device="cpu", dtype="float32")
    dec, info = open_decoder(inp, dtype="float32", device="cpu")
    texts = prompts.load("mt-bench", stride=2, limit=8)
    ids = prompts.encode(dec.lm.tokenizer, texts[0])
    model = dec.model
    rows = dict(zip(("plain loop", "tree, one sequence"),
                    decode_host_work(dec, ids, args.tokens)))
    for b in (int(x) for x in args.batch.split(",") if x):
        many = [prompts.encode(dec.lm.tokenizer, t) for t in texts[:b]]
        bd = BatchDecoder(dec.lm, dec.prompt_tokens, schedule_of(dec.tree), dec.cache_source)
        plain = BatchDecoder(dec.lm, dec.prompt_tokens, {1: None})
        rows[f"plain loop, batch {b}"] = per_step(
            model, lambda n: len(plain.generate(many, n).live), args.tokens)
        rows[f"tree, batch {b}"] = per_step(
            model, lambda n: len(bd.generate(many, n, learn=False).live), args.tokens)
    print(f"host work per decode step, {args.tokens} new tokens, float32, tree {info['tree']}")
    print(f"{'':>22} {'outside ops':>12} {'syncs':>6} {'forward ops':>12} {'all ops':>8}")
    for name, r in rows.items():
        print(f"{name:>22} {r['outside_ops_per_step']:>12.1f} {r['syncs_per_step']:>6.2f} "
              f"{r['forward_ops_per_step']:>12.1f} {r['ops_per_step']:>8.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
