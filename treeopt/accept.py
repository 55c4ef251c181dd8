"""Per-depth, per-rank prompt-token accuracies → acceptance.json (and the maths on them).

`accuracy[d][r]` = probability that the rank-r guess of prompt token d+1 is the token the
base model produces d+2 steps ahead under greedy decoding. Missing cells (null) are ranks a
published table does not cover; the search never uses them.
"""
from __future__ import annotations

import math

import numpy as np

from .artefact import check_schema, read_json
from .errors import BadInput

SCHEMA = "treeopt.acceptance/1"


def validate(obj: dict, where: str = "acceptance") -> None:
    check_schema(obj, SCHEMA, where)
    for field in ("model", "num_prompt_tokens", "topk", "accuracy"):
        if field not in obj:
            raise BadInput(f"{where}: missing field {field!r}")
    k, topk, acc = obj["num_prompt_tokens"], obj["topk"], obj["accuracy"]
    if not isinstance(k, int) or k < 1 or not isinstance(topk, int) or topk < 1:
        raise BadInput(f"{where}: num_prompt_tokens and topk must be integers ≥ 1")
    if not isinstance(acc, list) or len(acc) != k:
        raise BadInput(f"{where}: accuracy has {len(acc) if isinstance(acc, list) else '?'} "
                       f"rows, num_prompt_tokens is {k}")
    for d, row in enumerate(acc):
        if not isinstance(row, list) or len(row) != topk:
            raise BadInput(f"{where}: accuracy[{d}] must have topk={topk} entries")
        for r, v in enumerate(row):
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 or math.isnan(v):
                raise BadInput(f"{where}: accuracy[{d}][{r}]={v!r} outside [0, 1]")
        total = sum(v for v in row if v is not None)
        if total > 1.0 + 1e-6:
            raise BadInput(f"{where}: accuracy[{d}] sums to {total:.4f} > 1")


def load(path) -> dict:
    obj = read_json(path, "acceptance file")
    validate(obj, f"acceptance file {path}")
    return obj


def accuracy_array(obj: dict) -> np.ndarray:
    """[K, topk] float array with NaN for missing cells."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in obj["accuracy"]])


def reference_files(published: dict) -> dict[str, dict]:
    """Acceptance objects for the PPD authors' published tables."""
    out = {}
    for model, entry in published["models"].items():
        out[model] = {"schema": SCHEMA, "model": model, "source": "published",
                      "num_prompt_tokens": entry["num_prompt_tokens"], "topk": entry["topk"],
                      "accuracy": entry["accuracy"],
                      "note": published.get("source", ""),
                      "max_ratio_spread": entry.get("max_ratio_spread")}
    return out


# ---- estimates ----------------------------------------------------------------------
def wilson(hits: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for binomial proportions (elementwise)."""
    hits, n = np.asarray(hits, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(n > 0, hits / n, 0.0)
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = np.where(n > 0, np.clip(centre - half, 0, 1), 0.0)
    hi = np.where(n > 0, np.clip(centre + half, 0, 1), 1.0)
    return lo, hi


def marginal(ranks: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """accuracy [K, topk], hit counts [K, topk], valid positions [K] from ranks [N, K]."""
    k = ranks.shape[1]
    hits = np.zeros((k, topk))
    n = np.zeros(k)
    for d in range(k):
        col = ranks[:, d]
        col = col[col >= 0]
        n[d] = col.size
        hits[d] = np.bincount(col[col < topk], minlength=topk)[:topk]
    acc = np.where(n[:, None] > 0, hits / np.maximum(n[:, None], 1), 0.0)
    return acc, hits, n


def path_counts(ranks: np.ndarray, topk: int) -> tuple[dict, dict]:
    """Empirical joint counts: hits of each rank path [r1..rd] at the same insertion point,
    and the number of positions where depths 1..d are all measurable."""
    k = ranks.shape[1]
    counts: dict[tuple, int] = {}
    totals: dict[int, int] = {}
    for d in range(1, k + 1):
        sub = ranks[:, :d]
        ok = (sub >= 0).all(1)
        totals[d] = int(ok.sum())
        sub = sub[ok & (sub < topk).all(1)]
        if sub.size:
            paths, c = np.unique(sub, axis=0, return_counts=True)
            counts.update({tuple(int(x) for x in p): int(n) for p, n in zip(paths, c)})
    return counts, totals


def power_tail(acc_row: np.ndarray, hits_row: np.ndarray) -> tuple[float, float]:
    """Fit acc[r] ≈ a·(r+1)^(−b) with scipy (weighted by counts); returns (a, b)."""
    from scipy.optimize import curve_fit

    r = np.arange(1, acc_row.size + 1, dtype=float)
    sigma = 1.0 / np.sqrt(np.maximum(hits_row, 1.0))
    try:
        (a, b), _ = curve_fit(lambda x, a, b: a * x ** (-b), r, acc_row,
                              p0=(max(acc_row[0], 1e-3), 1.0), sigma=sigma,
                              bounds=([0, 0], [1, 10]), maxfev=5000)
    except (RuntimeError, ValueError):
        a, b = float(acc_row[0]), 1.0
    return float(a), float(b)


def estimate(ranks: np.ndarray, topk: int, prompt_of: np.ndarray | None = None,
             min_support: int = 40, min_cell_hits: int = 20, bootstrap: int = 500,
             seed: int = 0) -> dict:
    """Everything the acceptance file holds, from ranks [N, K] (−1 = not measurable)."""
    acc, hits, n = marginal(ranks, topk)
    lo, hi = wilson(hits, n[:, None])
    k = ranks.shape[1]
    tails = [power_tail(acc[d], hits[d]) for d in range(k)]
    smooth = acc.copy()
    for d, (a, b) in enumerate(tails):
        r = np.arange(1, topk + 1, dtype=float)
        few = hits[d] < min_cell_hits
        smooth[d, few] = a * r[few] ** (-b)
    scale = np.minimum(1.0, acc.sum(1) / np.maximum(smooth.sum(1), 1e-12))
    smooth = smooth * scale[:, None]  # keep each row's total hit rate
    counts, totals = path_counts(ranks, topk)
    # correlation factor per depth ≥ 2: P(hit_d | path to d−1 hit) / P(hit_d), where the
    # conditional is taken over the rank-0 parent paths with enough support
    corr = [1.0]
    for d in range(2, k + 1):
        num = den = 0.0
        for path, c in counts.items():
            if len(path) == d - 1 and c >= min_support:
                child = sum(v for p2, v in counts.items() if len(p2) == d and p2[:-1] == path)
                num += child
                den += c * acc[d - 1].sum()
        corr.append(float(num / den) if den > 0 else 1.0)
    path_probs = {}
    for path, c in counts.items():
        parent_n = counts.get(path[:-1], totals[len(path)]) if len(path) > 1 else totals[1]
        if parent_n >= min_support and totals[len(path)] > 0:
            path_probs[",".join(map(str, path))] = round(c / totals[len(path)], 8)
    out = {"accuracy": [[round(float(x), 6) for x in row] for row in acc],
           "accuracy_smoothed": [[round(float(x), 6) for x in row] for row in smooth],
           "ci95": {"low": lo.round(6).tolist(), "high": hi.round(6).tolist()},
           "counts": hits.astype(int).tolist(), "positions": [int(x) for x in n],
           "path_probs": path_probs,
           "fit": {"correlation": [round(c, 6) for c in corr],
                   "tail": [{"a": round(a, 6), "b": round(b, 6)} for a, b in tails],
                   "min_support": min_support, "min_cell_hits": min_cell_hits}}
    if prompt_of is not None and bootstrap:
        rng = np.random.default_rng(seed)
        ids = np.unique(prompt_of)
        by = [np.nonzero(prompt_of == i)[0] for i in ids]
        tops = []
        for _ in range(bootstrap):
            pick = np.concatenate([by[i] for i in rng.integers(0, len(by), len(by))])
            a, _, _ = marginal(ranks[pick], topk)
            tops.append(a[:, 0])
        tops = np.array(tops)
        out["bootstrap_top1_ci95"] = {"low": np.percentile(tops, 2.5, 0).round(6).tolist(),
                                      "high": np.percentile(tops, 97.5, 0).round(6).tolist(),
                                      "prompts": len(by), "resamples": bootstrap}
    return out


def search_inputs(obj: dict, conditional: bool = True) -> tuple[np.ndarray, dict | None]:
    """(accuracy array, path probabilities) the search should use.

    Product model: the measured (or published) marginals. Fitted model: smoothed
    marginals, depth ≥ 2 scaled by the fitted correlation factor, with the empirical joint
    path probabilities wherever they have support."""
    acc = accuracy_array(obj)
    if not conditional or "fit" not in obj:
        return acc, None
    if "accuracy_smoothed" in obj:
        acc = np.array(obj["accuracy_smoothed"], dtype=float)
    corr = np.array(obj["fit"].get("correlation", [1.0] * acc.shape[0]), dtype=float)
    acc = acc * corr[:, None]
    acc = np.minimum(acc, 1.0)
    pp = {tuple(int(x) for x in key.split(",")): float(v)
          for key, v in obj.get("path_probs", {}).items()}
    return acc, pp


def mean_context(samples) -> int:
    """Mean KV length over the measured positions (position i of a response attends to
    the prompt and the i tokens before it): the context a search for this workload should
    read the profile's t(L) at."""
    total = count = 0
    for s in samples:
        n = len(s.ids) - 1 - s.prompt_len  # positions prompt_len-1 .. len(ids)-3
        if n > 0:
            total += n * s.prompt_len + n * (n - 1) // 2
            count += n
    return round(total / count) if count else 0


# ---- the verb -----------------------------------------------------------------------
HELP = "measure per-depth, per-rank prompt-token accuracies (and check predictions)"


def add_arguments(p) -> None:
    from .cliutil import add_model_args, positive_int

    add_model_args(p, tree=False)
    p.add_argument("--prompt-tokens", help="prompt-token folder (default: shipped tokens)")
    p.add_argument("--prompts", help="JSONL prompts for the estimate (default: built-in set)")
    p.add_argument("--limit", type=positive_int, help="first N prompts (after --offset)")
    p.add_argument("--offset", type=int, default=0, help="skip the first N prompts")
    p.add_argument("--stride", type=positive_int, default=1,
                   help="take every N-th prompt (spreads --limit over a file's categories)")
    p.add_argument("--topk", type=positive_int, default=10)
    p.add_argument("--max-new-tokens", type=positive_int, default=160,
                   help="length of the greedy continuations measured")
    p.add_argument("--min-support", type=positive_int, default=40,
                   help="parent-path count from which a path's empirical probability is used")
    p.add_argument("--check-tree", action="append", metavar="TREE",
                   help="predict tokens/step for this tree and measure it by decoding "
                   "(repeatable; 'default' = the runtime's default tree, 'chain', 'wide')")
    p.add_argument("--check-prompts", help="held-out JSONL prompts for --check-tree")
    p.add_argument("--check-limit", type=positive_int, default=20)
    p.add_argument("--check-offset", type=int, default=0)
    p.add_argument("--check-stride", type=positive_int, default=1)
    p.add_argument("--out", help="acceptance path (default profiles/<model>.acceptance.json)")


def check_trees(dec, names: list[str], obj: dict, texts: list[str], max_new_tokens: int,
                quiet: bool = False) -> list[dict]:
    """Predicted (product-only and fitted) vs measured tokens per decode step."""
    from . import prompts, search
    from .cliutil import progress
    from .shipped import tree_path
    from .tree import Tree

    k = dec.prompt_tokens.num
    rows = []
    for name in names:
        if name == "default":
            tree = Tree.load(tree_path(dec.lm.model_id, dec.device.type))
        elif name == "chain":
            tree = Tree.chain(k, k)
        elif name == "wide":
            tree = Tree.static([[r] for r in range(8)] + [[0, r] for r in range(4)], k)
        else:
            tree = Tree.load(name)
        acc_p, _ = search_inputs(obj, conditional=False)
        acc_f, pp = search_inputs(obj, conditional=True)
        pred_p = search.predict(tree, acc_p)["tokens_per_step"]
        pred_f = search.predict(tree, acc_f, path_prob=pp)["tokens_per_step"]
        dec.set_tree(tree, dec.prompt_tokens)
        acc_tokens = steps = 0
        for text in progress(texts, f"check {name}", quiet=quiet):
            res = dec.ppd(prompts.encode(dec.lm.tokenizer, text), max_new_tokens)
            full = res.accepted[:-1] if res.finish_reason != "eos" else res.accepted
            acc_tokens += sum(full)  # the last step may be cut by max_new_tokens
            steps += len(full)
        measured = acc_tokens / max(steps, 1)
        rows.append({"tree": name, "input_lengths": {str(m): tree.input_length(m)
                                                     for m in tree.states},
                     "measured_tokens_per_step": round(measured, 4), "steps": steps,
                     "predicted_product": round(pred_p, 4), "predicted_fitted": round(pred_f, 4),
                     "error_product": round(pred_p / measured - 1, 4),
                     "error_fitted": round(pred_f / measured - 1, 4)})
    return rows


def main(args) -> dict:
    import datetime
    import hashlib
    import sys

    from . import distill, prompts
    from .artefact import write_json
    from .cliutil import say
    from .runtime import open_decoder
    from .shipped import acceptance_path

    texts = prompts.load(args.prompts, args.limit, args.offset, args.stride)
    check_texts = []
    if args.check_tree:
        check_texts = prompts.load(args.check_prompts, args.check_limit, args.check_offset,
                                   args.check_stride)
        overlap = set(check_texts) & set(texts)
        if overlap:
            raise BadInput(f"--check-prompts share {len(overlap)} prompts with the estimate")
        for name in args.check_tree:
            if name not in ("default", "chain", "wide"):
                from .tree import Tree

                Tree.load(name)  # fail early on a bad file
    dec, info = open_decoder(args.model, args.dtype, args.device, None, args.prompt_tokens,
                             args.threads)
    human = not args.json
    lm = dec.lm
    samples = distill.load_samples(lm, texts, args.max_new_tokens, quiet=not human,
                                   tag="accept data")
    ranks, owner = distill.measure_ranks(lm, samples, dec.table, args.topk, quiet=not human,
                                         tag="accept")
    est = estimate(ranks.numpy(), args.topk, owner.numpy(), args.min_support)
    est["mean_context"] = mean_context(samples)
    table = dec.prompt_tokens.embeddings
    obj = {"schema": SCHEMA, "model": info["model"], "source": "measured",
           "prompt_tokens": {"path": info["prompt_tokens"],
                             "sha256": hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]},
           "num_prompt_tokens": dec.prompt_tokens.num, "topk": args.topk,
           "dtype": info["dtype"], "prompt_file": args.prompts or "built-in",
           "prompts": len(samples), "offset": args.offset, "stride": args.stride,
           "max_new_tokens": args.max_new_tokens, **est,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "treeopt " + " ".join(sys.argv[1:])}
    if args.check_tree:
        obj["check"] = {"prompt_file": args.check_prompts or "built-in",
                        "prompts": len(check_texts),
                        "trees": check_trees(dec, args.check_tree, obj, check_texts,
                                             args.max_new_tokens, quiet=not human)}
    validate(obj)
    out = args.out or acceptance_path(info["model"])
    write_json(out, obj)
    if human:
        say(f"{len(samples)} prompts, {est['positions'][0]} positions; top-k accuracy:")
        say("depth  top-1 [95% CI]          top-5   top-10")
        for d in range(obj["num_prompt_tokens"]):
            row = np.array(obj["accuracy"][d])
            ci = obj.get("bootstrap_top1_ci95")
            ci_s = f"[{ci['low'][d]:.3f}, {ci['high'][d]:.3f}]" if ci else ""
            say(f"{d + 1:>5}  {row[0]:.3f} {ci_s:<18}  {row[:5].sum():.3f}   {row.sum():.3f}")
        say(f"correlation factors {est['fit']['correlation']}; "
            f"{len(est['path_probs'])} paths with empirical probabilities")
        for c in obj.get("check", {}).get("trees", []):
            say(f"check {c['tree']}: measured {c['measured_tokens_per_step']:.3f} tokens/step; "
                f"predicted product {c['predicted_product']:.3f} ({100 * c['error_product']:+.1f}%),"
                f" fitted {c['predicted_fitted']:.3f} ({100 * c['error_fitted']:+.1f}%)")
        say(f"wrote {out}")
    return {"out": str(out), **{k: obj[k] for k in ("model", "num_prompt_tokens", "topk",
                                                      "accuracy", "positions", "prompts")},
            "fit": est["fit"], **({"check": obj["check"]} if "check" in obj else {})}
