"""Acceptance maths: per-depth, per-rank prompt-token accuracies, their intervals and
fits, and the acceptance.json artefact.

`accuracy[d][r]` = probability that the rank-r guess of prompt token d+1 is the token the
base model produces d+2 steps ahead under greedy decoding. Missing cells (null) are ranks a
published table does not cover; the search never uses them.
"""
from __future__ import annotations

import base64
import binascii
import math

import numpy as np
from scipy.optimize import curve_fit

from .artefact import check_fields, check_schema, read_json
from .bounds import count, int_key
from .errors import BadInput

SCHEMA = "treeopt.acceptance/1"
RECORD_TOPK = 10  # the top-k a run's records rank the true token among (accept's default)


def validate(obj: dict, where: str = "acceptance") -> None:
    check_schema(obj, SCHEMA, where)
    for field in ("model", "num_prompt_tokens", "topk", "accuracy"):
        if field not in obj:
            raise BadInput(f"{where}: missing field {field!r}")
    check_fields(obj, {"model": "str"}, where)
    k, topk, acc = obj["num_prompt_tokens"], obj["topk"], obj["accuracy"]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (k, topk)):
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
            if not _prob(v):
                raise BadInput(f"{where}: accuracy[{d}][{r}]={v!r} outside [0, 1]")
        total = sum(v for v in row if v is not None)
        if total > 1.0 + 1e-6:
            raise BadInput(f"{where}: accuracy[{d}] sums to {total:.4f} > 1")
    smooth = obj.get("accuracy_smoothed")
    if smooth is not None:
        if not isinstance(smooth, list) or len(smooth) != k or any(
                not isinstance(row, list) or len(row) != topk or not all(_prob(v) for v in row)
                for row in smooth):
            raise BadInput(f"{where}: accuracy_smoothed must be {k} rows of {topk} "
                           "probabilities in [0, 1]")
    fit = obj.get("fit")
    if fit is not None:
        corr = fit.get("correlation") if isinstance(fit, dict) else None
        if corr is not None and (not isinstance(corr, list) or not all(
                _number(c) and c >= 0 for c in corr)):
            raise BadInput(f"{where}: fit.correlation must be finite numbers ≥ 0")
    pp = obj.get("path_probs", {})
    if not isinstance(pp, dict):
        raise BadInput(f"{where}: path_probs must be an object")
    for key, v in pp.items():
        if not _prob(v) or any(int_key(x) is None for x in str(key).split(",")):
            raise BadInput(f"{where}: path_probs[{key!r}]={v!r} is not a rank path with a "
                           "probability in [0, 1]")
    if obj.get("mean_context") is not None:
        count(obj["mean_context"], "context", f"{where}: mean_context", lo=0)
    if obj.get("lookup") is not None:
        _validate_lookup(obj["lookup"], f"{where}: lookup")
    if obj.get("cache") is not None:
        _validate_lookup(obj["cache"], f"{where}: cache")
    if obj.get("lookup") is not None:
        unpack_records(obj, where=where)  # every record value checked before any work


def _validate_lookup(lk, where: str) -> None:
    """The summary of a chain source's acceptance, prompt lookup's or the cache's (the
    records are checked by :func:`unpack_records`)."""
    if not isinstance(lk, dict):
        raise BadInput(f"{where} must be an object")
    count(lk.get("max_ngram"), "lookup_ngram", f"{where}: max_ngram")
    count(lk.get("max_tokens"), "lookup_chain", f"{where}: max_tokens")
    by = lk.get("by_match", {})
    if not isinstance(by, dict):
        raise BadInput(f"{where}: by_match must be an object")
    for n, row in by.items():
        if int_key(n) is None or int_key(n) > lk["max_ngram"] or not isinstance(row, dict):
            raise BadInput(f"{where}: by_match[{n!r}] is not a match length "
                           f"0..{lk['max_ngram']} with an object")
        for key in ("share", "longer_than_rank0_guesses"):
            if key in row and not _prob(row[key]):
                raise BadInput(f"{where}: by_match[{n!r}].{key}={row[key]!r} outside [0, 1]")
        if "mean_accepted" in row and not (_number(row["mean_accepted"])
                                           and row["mean_accepted"] >= 0):
            raise BadInput(f"{where}: by_match[{n!r}].mean_accepted must be a number ≥ 0")
        ala = row.get("accepted_at_least", [])
        if not isinstance(ala, list) or not all(_prob(v) for v in ala):
            raise BadInput(f"{where}: by_match[{n!r}].accepted_at_least must be "
                           "probabilities in [0, 1]")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _prob(v) -> bool:
    return _number(v) and 0.0 <= v <= 1.0


def load(path) -> dict:
    obj = read_json(path, "acceptance file")
    validate(obj, f"acceptance file {path}")
    return obj


def accuracy_array(obj: dict) -> np.ndarray:
    """[K, topk] float array with NaN for missing cells."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in obj["accuracy"]])


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


def lookup_summary(ranks: np.ndarray, match: np.ndarray, won: np.ndarray, owner: np.ndarray,
                   max_ngram: int, max_tokens: int) -> dict:
    """Prompt lookup's acceptance, conditioned on the match length n: the share of
    positions with each n, P(the first d proposed tokens are right | n) for d = 1..C, the
    joint with the prompt tokens (how often lookup's accepted run is longer than the
    rank-0 guesses'), and the per-position records the hybrid search replays (ranks,
    n, lookup's accepted run; the positions of one prompt in order)."""
    lengths = np.bincount(owner, minlength=int(owner.max()) + 1 if len(owner) else 0)
    return {"max_ngram": max_ngram, "max_tokens": max_tokens,
            "by_match": by_match(ranks, match, won, max_ngram, max_tokens),
            "records": {"lengths": lengths.tolist(),
                        "ranks": pack(ranks), "match": pack(match), "won": pack(won)}}


def cache_summary(ranks: np.ndarray, match: np.ndarray, won: np.ndarray, agree: np.ndarray,
                  settings: dict, **about) -> dict:
    """The cache source's acceptance beside lookup's, at the same positions: per match
    length n as :func:`lookup_summary`, and the records the search replays — n, the
    cache's accepted run and how many leading tokens its chain shares with lookup's
    (`agree`: the two chains merge there)."""
    return {**settings, **about,
            "by_match": by_match(ranks, match, won, settings["max_ngram"],
                                 settings["max_tokens"]),
            "records": {"match": pack(match), "won": pack(won), "agree": pack(agree)}}


def by_match(ranks: np.ndarray, match: np.ndarray, won: np.ndarray, max_ngram: int,
             max_tokens: int) -> dict:
    """A chain source's acceptance per match length n: the share of positions with each
    n, P(the first d proposed tokens are right | n) for d = 1..C, and how often its
    accepted run is longer than the rank-0 guesses'."""
    total = max(len(match), 1)
    by_n = {}
    ppd0 = np.cumprod(ranks == 0, axis=1).sum(1) if len(ranks) else np.zeros(0)
    for n in range(max_ngram + 1):
        sel = match == n
        cnt = int(sel.sum())
        row = {"share": round(cnt / total, 6), "positions": cnt}
        if n and cnt:
            row["accepted_at_least"] = [round(float((won[sel] >= d).mean()), 6)
                                        for d in range(1, max_tokens + 1)]
            row["mean_accepted"] = round(float(won[sel].mean()), 6)
            row["longer_than_rank0_guesses"] = round(float((won[sel] > ppd0[sel]).mean()), 6)
        by_n[str(n)] = row
    return by_n


def pack(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, dtype=np.int16).tobytes()).decode()


def unpack_records(obj: dict, max_chain: int | None = None, where: str = "acceptance"
                   ) -> dict | None:
    """The lookup records of an acceptance file as arrays (None where it has none), every
    value checked: ranks in −1..topk (−1: not measurable, topk: not among the top k),
    match lengths in 0..max_ngram, accepted runs in 0..max_tokens, per-prompt lengths that add up, at most
    BOUNDS["records"] positions. With `max_chain`, as if chains had been cut to that many
    tokens (a run within the first C proposed tokens is the same run)."""
    lk = obj.get("lookup")
    if not isinstance(lk, dict) or "records" not in lk:
        return None
    rec, where = lk["records"], f"{where}: lookup records"
    try:
        raw = {k: base64.b64decode(rec[k], validate=True) for k in ("ranks", "match", "won")}
        lengths = rec["lengths"]
    except (KeyError, ValueError, TypeError, binascii.Error) as e:
        raise BadInput(f"{where} are malformed ({e})") from e
    k = obj["num_prompt_tokens"]
    if isinstance(lengths, list):
        count(len(lengths), "record_prompts", f"{where}: lengths", lo=0)
    if not isinstance(lengths, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
        raise BadInput(f"{where}: lengths must be a list of integers ≥ 0")
    total = sum(lengths)
    count(total, "records", f"{where}: {len(lengths)} prompts", lo=0)
    if any(len(b) != 2 * n for b, n in ((raw["match"], total), (raw["won"], total),
                                         (raw["ranks"], total * k))):
        raise BadInput(f"{where} have inconsistent lengths")
    arr = {key: np.frombuffer(b, dtype=np.int16).astype(np.int64) for key, b in raw.items()}
    arr["ranks"] = arr["ranks"].reshape(-1, k)
    for key, lo, hi in (("ranks", -1, obj["topk"]), ("match", 0, lk["max_ngram"]),
                        ("won", 0, lk["max_tokens"])):
        bad = (arr[key] < lo) | (arr[key] > hi)
        if bad.any():
            raise BadInput(f"{where}: a {key} value {int(arr[key][bad][0])} outside {lo}..{hi}")
    arr["lengths"] = lengths
    arr["max_ngram"], arr["max_tokens"] = int(lk["max_ngram"]), int(lk["max_tokens"])
    _stepwise(rec, arr, k, total, where)
    _cache_records(obj, arr, total, where)
    if max_chain is not None:
        if not 1 <= max_chain <= arr["max_tokens"]:
            raise BadInput(f"lookup chain {max_chain}: the acceptance file measured chains "
                           f"of 1..{arr['max_tokens']} tokens (measure longer ones with "
                           "`treeopt accept --lookup-chain`)")
        arr["won"] = np.minimum(arr["won"], max_chain)
        arr["max_tokens"] = max_chain
    return arr


def _cache_records(obj: dict, arr: dict, total: int, where: str) -> None:
    """The cache source's records at the same positions (where the file has them):
    cache_match, cache_won, agree and the cache's n-gram and chain bounds."""
    ck = obj.get("cache")
    if not isinstance(ck, dict) or "records" not in ck:
        return
    where = f"{where}: cache records"
    try:
        raw = {k: base64.b64decode(ck["records"][k], validate=True)
               for k in ("match", "won", "agree")}
    except (KeyError, ValueError, TypeError, binascii.Error) as e:
        raise BadInput(f"{where} are malformed ({e})") from e
    if any(len(b) != 2 * total for b in raw.values()):
        raise BadInput(f"{where} have inconsistent lengths")
    for key, b in raw.items():
        a = np.frombuffer(b, dtype=np.int16).astype(np.int64)
        hi = ck["max_ngram"] if key == "match" else ck["max_tokens"]
        bad = (a < 0) | (a > hi)
        if bad.any():
            raise BadInput(f"{where}: a {key} value {int(a[bad][0])} outside 0..{hi}")
        arr["agree" if key == "agree" else f"cache_{key}"] = a
    arr["cache_max_ngram"], arr["cache_max_tokens"] = int(ck["max_ngram"]), int(ck["max_tokens"])


def _stepwise(rec: dict, arr: dict, k: int, total: int, where: str) -> None:
    """A run's records (:mod:`treeopt.records`): which prompts' records are one a step
    (`stepwise`, else one a position) and each record's tree state (−1: not recorded)."""
    flags = rec.get("stepwise", [False] * len(arr["lengths"]))
    if not isinstance(flags, list) or len(flags) != len(arr["lengths"]) or not all(
            isinstance(f, bool) for f in flags):
        raise BadInput(f"{where}: stepwise must be one true/false per prompt")
    arr["stepwise"] = flags
    if "state" not in rec:
        arr["state"] = np.full(total, -1, dtype=np.int64)
        return
    try:
        raw = base64.b64decode(rec["state"], validate=True)
    except (ValueError, TypeError, binascii.Error) as e:
        raise BadInput(f"{where}: state is malformed ({e})") from e
    if len(raw) != 2 * total:
        raise BadInput(f"{where} have inconsistent lengths")
    arr["state"] = np.frombuffer(raw, dtype=np.int16).astype(np.int64)
    bad = (arr["state"] < -1) | (arr["state"] > k)
    if bad.any():
        raise BadInput(f"{where}: a state value {int(arr['state'][bad][0])} outside -1..{k}")


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
