"""The search behind `treeopt search`: the tree with the most expected tokens per second
for an acceptance file on a latency profile. One concern a module, each importing only
those before it:

- :mod:`.exact`  — the exact optimiser (candidate universe, budget DP, policy iteration,
  prediction of any tree); the maths is in its docstring;
- :mod:`.curves` — the best value per input-length cap and the greedy static curve;
- :mod:`.tuning` — optuna over the optimiser's settings;
- :mod:`.hybrid` — prompt lookup beside the guesses, by replaying measured positions;
- :mod:`.batch`  — one configuration per batch size.

Engine formats (Medusa, PPD) are :mod:`treeopt.export`'s.
"""
from __future__ import annotations

import dataclasses
import re
import time

from ..acceptance import search_inputs, unpack_records
from ..artefact import mask_secrets
from ..errors import BadInput
from ..latency import Latency
from ..tree import Tree
from .curves import greedy_curve, optimise_static, per_input_length
from .exact import figures, optimise, predict, prediction
from .hybrid import replay_predict, with_cache, with_lookup
from .tuning import tune

DEFAULT_CONTEXT = 512  # where the acceptance file does not say what context it measured


@dataclasses.dataclass
class Options:
    """What `treeopt search` takes beside its inputs (checked here, in plain words)."""

    max_input: int = 512
    context: int | None = None  # default: the acceptance file's mean context, else 512
    static: bool = False
    product: bool = False
    trials: int = 0
    storage: str | None = None

    def __post_init__(self):
        if not 2 <= self.max_input <= 65536:
            raise BadInput(f"--max-input must be in 2..65536, got {self.max_input}")
        if self.context is not None and self.context < 1:
            raise BadInput(f"--context must be ≥ 1, got {self.context}")
        if self.trials < 0:
            raise BadInput(f"--trials must be ≥ 0, got {self.trials}")
        if self.storage is not None and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://.*",
                                                         self.storage):
            raise BadInput(f"--storage {mask_secrets(self.storage)}: not a database URL "
                           "(e.g. sqlite:///path/study.db)")


def latency_at(profile: dict, context: int):
    """(t(L) at this context, overhead included; t(1) without it — plain decoding's step,
    as every prediction compares against) from a profile."""
    lat_model = Latency(profile)
    t1 = float(Latency(profile, with_overhead=False)([1], context)[0])
    return (lambda L: lat_model(L, context)), t1


def search(acc_obj: dict, profile: dict, opts: Options, name: str = "search") -> dict:
    """The search behind `treeopt search`: the best tree for an acceptance file and a
    latency profile. Returns the solution, the tree (its meta: how it was chosen and
    what it predicts), and the report (per-input-length table, greedy curve)."""
    context = opts.context if opts.context is not None else \
        int(acc_obj.get("mean_context") or DEFAULT_CONTEXT)
    lat, t1 = latency_at(profile, context)
    acc_prod, _ = search_inputs(acc_obj, conditional=False)
    acc_fit, pp = search_inputs(acc_obj, conditional=not opts.product)
    t0 = time.perf_counter()
    config = {"k": acc_prod.shape[0], "width_cap": None, "conditional": pp is not None}
    if opts.trials:
        config = tune(acc_prod, acc_fit, pp, lat, opts.max_input, opts.trials, opts.storage,
                      opts.static, name)
    acc, use_pp = (acc_fit, pp) if config["conditional"] else (acc_prod, None)
    if opts.static:
        sol = optimise_static(acc, lat, config["k"], opts.max_input, use_pp)
        rows = None
    else:
        sol = optimise(acc, lat, k=config["k"], max_input=opts.max_input, path_prob=use_pp,
                       width_cap=config["width_cap"])
        rows = per_input_length(sol, acc, lat, opts.max_input, use_pp)
    seconds = time.perf_counter() - t0
    pred = prediction(sol, t1)
    report = {"greedy_curve": greedy_curve(acc, lat, config["k"], opts.max_input, use_pp)}
    if rows:
        report["per_input_length"] = rows
    meta = {"context": context, "max_input": opts.max_input, "config": config,
            "static": opts.static, "predicted": pred, "search_seconds": round(seconds, 3)}
    return {"solution": sol, "acc": acc, "path_prob": use_pp, "latency": lat, "t1": t1,
            "meta": meta, "report": report}


def add_sources(found: dict, rec: dict, sources: list[str], max_input: int) -> None:
    """The chain sources beside the searched guesses (`sources` ⊇ {"ppd"}; lookup, cache),
    each kept only where the replay over the measured positions predicts faster: the
    solution's tree gains their policies, the meta says what each added (`replayed`)."""
    meta = found["meta"]
    meta["sources"] = ",".join(sources)
    meta["replayed"] = with_lookup(found, rec, max_input) if "lookup" in sources \
        else {"lookup_kept": False}
    if "cache" in sources:
        r = meta["replayed"]
        c = with_cache(found["solution"].tree, rec, found["latency"], max_input)
        r["cache"] = c
        r.setdefault("ppd_only", c["without_cache"])
        if "hybrid" in r:
            r["with_lookup"] = r["hybrid"]  # before the cache
        r["hybrid"] = c["hybrid"] if c["cache_kept"] else r.get("hybrid", c["without_cache"])
        r["lookup_kept"] = found["solution"].tree.lookup is not None


def plain_if_faster(found: dict) -> dict | None:
    """Where plain decoding (one token a step at t(1)) beats the chosen tree's predicted
    tokens/s (replayed with its chain sources where it has them), one sequence decodes
    plainly: the tree's per-batch table says so for B = 1 (:meth:`Tree.at_batch`); the
    figures of both, else None."""
    tree, meta = found["solution"].tree, found["meta"]
    hybrid = (meta.get("replayed") or {}).get("hybrid") if tree.has_chains else None
    tps = (hybrid or meta["predicted"])["tokens_per_second"]
    plain = 1.0 / found["t1"]
    if tps >= plain or tree.by_batch:
        return None
    tree.by_batch = {1: None}
    meta["plain_at_1"] = {"tree_tokens_per_second": round(tps, 3),
                          "plain_tokens_per_second": round(plain, 3)}
    return meta["plain_at_1"]


def unreplayable(tree: Tree, rec: dict | None) -> str | None:
    """Why a tree's chain sources cannot be replayed over these records (None: they can,
    or it has none): no records, no cache records for a cache policy, or a lookup policy
    the records did not measure."""
    lk = tree.lookup
    if tree.has_chains and rec is None:
        return ("the tree has a prompt-lookup or cache policy, and the acceptance file has no "
                "lookup records to replay it on (measure them with `treeopt accept`)")
    if tree.cache is not None and "cache_match" not in rec:
        return ("the tree has a cache policy, and the acceptance file has no cache records to "
                "replay it on (measure them with `treeopt accept`, which uses your corpus)")
    if lk is not None and (lk.max_ngram != rec["max_ngram"] or
                            lk.max_tokens > rec["max_tokens"]):
        return (f"the tree's lookup (n ≤ {lk.max_ngram}, chain ≤ {lk.max_tokens}) was not "
                f"measured by the acceptance file (n ≤ {rec['max_ngram']}, chain ≤ "
                f"{rec['max_tokens']})")
    return None


def evaluate_tree(tree: Tree, acc_obj: dict, profile: dict, opts: Options) -> dict:
    """A given tree's predicted figures on this profile and acceptance, beside the best
    tree the search finds at the same input length. A tree with a prompt-lookup policy is
    replayed over the acceptance file's measured positions (its PPD part alone beside it);
    without lookup records that measured its lookup it cannot be predicted: refused."""
    rec = unpack_records(acc_obj) if tree.has_chains else None
    why = unreplayable(tree, rec)
    if why:
        raise BadInput(why)
    best = search(acc_obj, profile, dataclasses.replace(opts, max_input=max(
        2, tree.max_input_length), trials=0), "evaluate")
    acc, pp, lat = best["acc"], best["path_prob"], best["latency"]
    ppd = tree.ppd_part()
    if rec is None:
        out = {"given": figures(predict(ppd, acc, lat, pp), tree)}
    else:
        out = {"given": {**replay_predict(tree, rec, lat), "input_length": tree.max_input_length,
                         "method": "replay"},
               "given_ppd_only": {**replay_predict(ppd, rec, lat),
                                  "input_length": ppd.max_input_length}}
    return {**out, "best_at_same_input_length": best["meta"]["predicted"] | {
                "input_length": best["solution"].tree.max_input_length},
            "context": best["meta"]["context"]}
