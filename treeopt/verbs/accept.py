"""Measure per-depth, per-rank prompt-token accuracies → acceptance.json (teacher-forced
over the model's own greedy continuations), and check the predictions for given trees by
decoding held-out prompts."""
from __future__ import annotations

import copy
import hashlib

import numpy as np

from .. import corpus, paths, prompts
from ..acceptance import RECORD_TOPK, SCHEMA, validate
from ..artefact import check_out, stamp, write_json
from ..distill import measure_acceptance
from ..errors import BadInput
from ..evaluation import check_trees
from ..export import load_tree
from ..inputs import find_tree, resolve_inputs
from ..runtime import open_decoder
from ..sources import LOOKUP_CHAIN, LOOKUP_NGRAM
from ..tree import Tree
from .common import add_cache_args, add_model_args, add_prompt_args, bounded_int, int_in, positive_int, say

HELP = "measure per-depth, per-rank prompt-token accuracies (and check predictions)"
BUILT_IN_TREES = ("default", "chain", "wide")


def add_arguments(p) -> None:
    add_model_args(p, tree=False)
    add_prompt_args(p)
    p.add_argument("--topk", type=positive_int, default=RECORD_TOPK)
    p.add_argument("--max-new-tokens", type=int_in(2, 65536), default=160,
                   help="length of the greedy continuations measured (≥ 2)")
    p.add_argument("--min-support", type=positive_int, default=40,
                   help="parent-path count from which a path's empirical probability is used")
    p.add_argument("--lookup-ngram", type=bounded_int("lookup_ngram"), default=LOOKUP_NGRAM,
                   metavar="N",
                   help="prompt lookup records: match the last N..1 tokens (default "
                   f"{LOOKUP_NGRAM})")
    p.add_argument("--lookup-chain", type=bounded_int("lookup_chain"), default=LOOKUP_CHAIN,
                   metavar="C",
                   help="prompt lookup records: chains of up to C proposed tokens; the "
                   f"search picks each state's length up to C (default {LOOKUP_CHAIN})")
    p.add_argument("--check-tree", action="append", metavar="TREE",
                   help="predict tokens/step for this tree and measure it by decoding "
                   "(repeatable; 'default' = the runtime's default tree, 'chain', 'wide')")
    add_cache_args(p)
    add_prompt_args(p, "check-prompts", "built-in set")
    p.set_defaults(check_limit=20)
    p.add_argument("--out", help="acceptance path (default: $TREEOPT_HOME/profiles/"
                   "<model>.acceptance.json)")


def _trees(names: list[str], k: int, model_id: str, device: str,
           dtype: str) -> dict[str, Tree]:
    out = {}
    for name in names:
        if name == "default":
            path = find_tree(model_id, device, dtype)
            out[name] = load_tree(path) if path else Tree.chain(k, k)
        elif name == "chain":
            out[name] = Tree.chain(k, k)
        elif name == "wide":
            out[name] = Tree.static([[r] for r in range(8)] + [[0, r] for r in range(4)], k)
        else:
            out[name] = load_tree(name)
    return out


def main(args) -> dict:
    texts = prompts.load(args.prompts, args.limit, args.offset, args.stride)
    check_texts = []
    if args.check_tree:
        check_texts = prompts.load(args.check_prompts, args.check_limit, args.check_offset,
                                   args.check_stride)
        overlap = set(check_texts) & set(texts)
        if overlap:
            raise BadInput(f"--check-prompts share {len(overlap)} prompts with the estimate")
    inp = resolve_inputs(args.model, prompt_tokens=args.prompt_tokens, device=args.device,
                         want=("corpus",), corpus=args.corpus,
                         dtype=args.dtype)
    for name in args.check_tree or []:  # fail early on a bad file; each one is an input
        path = find_tree(inp.model_id, args.device, args.dtype) \
            if name == "default" else None if name in BUILT_IN_TREES else name
        if path is not None:
            load_tree(path)
    out = check_out(args.out or paths.user_profiles() / paths.acceptance_name(inp.model_id))
    if inp.corpus and corpus.answered(inp.corpus, texts):
        raise BadInput(f"the corpus {inp.corpus_src} holds the answers to "
                       f"{corpus.answered(inp.corpus, texts)} of these prompts: the cache "
                       "would be measured on its own answers (measure other prompts, or "
                       "--corpus none)")
    dec, info = open_decoder(inp, args.model, args.dtype, args.device, args.threads,
                             cache_tokens=args.cache_tokens)
    human = not args.json
    # the cache is measured on a copy: the check decodes below start from the corpus too
    est = measure_acceptance(dec.lm, dec.table, texts, args.topk, args.max_new_tokens,
                             args.min_support, quiet=not human,
                             lookup=(args.lookup_ngram, args.lookup_chain),
                             cache=copy.deepcopy(dec.cache_source), corpus=info.get("corpus"))
    table = dec.prompt_tokens.embeddings
    obj = {"schema": SCHEMA, "model": info["model"], "source": "measured",
           "prompt_tokens": {"path": info["prompt_tokens"],
                             "sha256": hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]},
           "num_prompt_tokens": dec.prompt_tokens.num, "topk": args.topk,
           "dtype": info["dtype"], "prompt_file": args.prompts or "built-in",
           "offset": args.offset, "stride": args.stride,
           "max_new_tokens": args.max_new_tokens, **est, **stamp()}
    if args.check_tree:
        trees = _trees(args.check_tree, dec.prompt_tokens.num, info["model"], args.device,
                        args.dtype)
        obj["check"] = {"prompt_file": args.check_prompts or "built-in",
                        "prompts": len(check_texts),
                        "trees": check_trees(dec, trees, obj, check_texts, args.max_new_tokens,
                                             quiet=not human)}
    validate(obj)
    write_json(out, obj)
    if human:
        _print(obj, est, out)
    return {"out": str(out), **{k: obj[k] for k in ("model", "num_prompt_tokens", "topk",
                                                      "accuracy", "positions", "prompts")},
            "fit": est["fit"], **({"check": obj["check"]} if "check" in obj else {})}


def _print(obj: dict, est: dict, out) -> None:
    say(f"{obj['prompts']} prompts, {est['positions'][0]} positions; top-k accuracy:")
    say("depth  top-1 [95% CI]          top-5   top-10")
    for d in range(obj["num_prompt_tokens"]):
        row = np.array(obj["accuracy"][d])
        ci = obj.get("bootstrap_top1_ci95")
        ci_s = f"[{ci['low'][d]:.3f}, {ci['high'][d]:.3f}]" if ci else ""
        say(f"{d + 1:>5}  {row[0]:.3f} {ci_s:<18}  {row[:5].sum():.3f}   {row.sum():.3f}")
    say(f"correlation factors {est['fit']['correlation']}; "
        f"{len(est['path_probs'])} paths with empirical probabilities")
    for c in obj.get("check", {}).get("trees", []):
        if c["error_product"] is None:
            say(f"check {c['tree']}: no full decode step measured")
            continue
        if c.get("method") == "replay":
            say(f"check {c['tree']}: measured {c['measured_tokens_per_step']:.3f} tokens/step; "
                f"predicted (replayed, hybrid) {c['predicted_fitted']:.3f} "
                f"({100 * c['error_fitted']:+.1f}%)")
            continue
        say(f"check {c['tree']}: measured {c['measured_tokens_per_step']:.3f} tokens/step; "
            f"predicted product {c['predicted_product']:.3f} ({100 * c['error_product']:+.1f}%),"
            f" fitted {c['predicted_fitted']:.3f} ({100 * c['error_fitted']:+.1f}%)")
    say(f"wrote {out}")
