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
