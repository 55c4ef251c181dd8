"""First-run calibration: on a device and dtype with no profile, a short profile (a few
input lengths at one context, seconds) and the tree picked for it among the trees at hand —
or plain decoding where none pays — before the first decode.

Each candidate's tokens/s is predicted the way the search predicts (its steps replayed
over the acceptance file's measured positions, :func:`treeopt.search.hybrid.replay_predict`,
at t(L) of the short profile); plain decoding makes 1/t(1) tokens/s. The full
`treeopt profile` + `treeopt search` stays the way to the best tree: the short profile says
it is short (`short`), and the chosen tree says how it was chosen (`meta.calibrated`).
"""
from __future__ import annotations

import copy
import dataclasses
import pathlib
import time

import numpy as np

from . import paths
from .acceptance import unpack_records
from .artefact import stamp
from .errors import BadInput
from .export import load_tree
from .latency import Latency
from .measure import measure_overhead, measure_points, measure_profile
from .search import latency_at, unreplayable
from .search.hybrid import replay_predict
from .tree import Tree

SIZES = [1, 2, 4, 8, 16, 32]  # input lengths of the short profile
CONTEXT = 256  # its one context: a chat's length after a short answer
# the least error a short profile states for its points: seconds of measurement on a shared
# 2-core VM were 25 % off a full profile of the same process at one point (CI, 2026-12-04)
MIN_ERROR = 0.3
MIN_STEPS = 32  # the fewest measured steps a run's correction of a profile may rest on
MIN_STEPS_AT = 8  # the fewest steps at one input length for its own ratio


def stated_error(points: list[dict]) -> float:
    """What a short profile's point may be off a full profile's, relative: the largest
    p10–p90 half-spread of its samples over their median, at least MIN_ERROR (a VM's
    speed moves more than one point's samples show)."""
    spread = max((p["p90_s"] - p["p10_s"]) / 2 / p["median_s"] for p in points)
    return round(max(MIN_ERROR, spread), 3)


def short_profile(dec, quiet: bool = True, sizes: list[int] = SIZES) -> dict:
    """A profile of this device measured in seconds: t(L) for SIZES at CONTEXT, two
    sweeps (a stall in one moves a point less), and the runtime's per-step overhead on one
    short decode (:func:`treeopt.measure.measure_profile`)."""
    t0 = time.perf_counter()
    prof = measure_profile(dec, sizes, [CONTEXT], repeats=16, budget=2.0, rounds=2,
                           overhead=False, quiet=quiet)
    prof["overhead"] = measure_overhead(dec, sizes=(8,), new_tokens=16, quiet=quiet)
    prof["short"] = {"sizes": sizes, "context": CONTEXT,
                     "seconds": round(time.perf_counter() - t0, 1),
                     "error": stated_error(prof["points"]),
                     "note": "first-run calibration: a few input lengths at one context; "
                             "`treeopt profile` measures the full grid"}
    return prof


def candidates(model_id: str) -> list[tuple[str, Tree]]:
    """The trees at hand for a model: yours and the shipped ones (any device), the shipped
    hand-made default; each hybrid one also without its chain sources."""
    found: dict[str, pathlib.Path] = {}
    for folder in (paths.user_profiles(), paths.SHIPPED):
        for p in sorted(folder.glob(f"*__{paths.name_part(model_id)}*.tree.json")):
            found.setdefault(p.name, p)
    default = paths.lookup(paths.default_tree_name(model_id))
    if default is not None:
        found.setdefault(default.name, default)
    out = []
    for name, p in found.items():
        try:
            tree = load_tree(p)
        except BadInput:
            continue  # a damaged file of yours is not a candidate
        label = paths.display_path(p)
        out.append((label, dataclasses.replace(tree, by_batch={})))
        if tree.has_chains:
            out.append((f"{label} (guesses alone)", tree.ppd_part()))
    return out


def choose(cands: list[tuple[str, Tree]], acceptance: dict, profile: dict) -> dict:
    """Every candidate's predicted figures on this profile (the replay over the
    acceptance file's records), best first, and plain decoding's: {"rows", "best"
    (a row; its "tree" None for plain decoding)}."""
    rec = unpack_records(acceptance)
    if rec is None:
        raise BadInput("calibration needs an acceptance file with per-position records "
                       "(`treeopt accept`)")
    context = int(acceptance.get("mean_context") or CONTEXT)
    lat, t1 = latency_at(profile, context)
    rows = [{"name": "plain decoding", "tree": None, "tokens_per_step": 1.0,
             "tokens_per_second": 1.0 / t1}]
    for name, tree in cands:
        if unreplayable(tree, rec):
            continue  # its chains were not measured by this acceptance file
        got = replay_predict(tree, rec, lat)
        rows.append({"name": name, "tree": tree, "tokens_per_step": got["tokens_per_step"],
                     "tokens_per_second": got["tokens_per_second"]})
    rows.sort(key=lambda r: -r["tokens_per_second"])
    return {"rows": rows, "best": rows[0], "context": context}


def chosen_tree(pick: dict, cands: list[tuple[str, Tree]], profile_src: str,
                acceptance_src: str, device_id: str, dtype: str) -> Tree:
    """The tree a calibration keeps as this device's: the best candidate (for plain
    decoding, the best tree with a table that says plain at B = 1), its meta saying how
    it was chosen."""
    best = pick["best"]
    tree = best["tree"]
    if tree is None:  # plain: keep the best tree beside it, for when one pays
        runner = next((r for r in pick["rows"] if r["tree"] is not None), None)
        tree = runner["tree"] if runner else cands[0][1]
        tree = dataclasses.replace(tree, by_batch={1: None})
    table = [{"candidate": r["name"], "tokens_per_step": round(r["tokens_per_step"], 4),
              "tokens_per_second": round(r["tokens_per_second"], 3)} for r in pick["rows"]]
    tree.meta = {**{k: v for k, v in (tree.meta or {}).items()
                    if k in ("model", "acceptance", "sources")},
                 "profile": profile_src, "acceptance": acceptance_src,
                 "device_id": device_id, "dtype": dtype, "simulated": False,
                 "calibrated": {"chosen": best["name"], "context": pick["context"],
                                "candidates": table}}
    return tree


def shape(by_length: dict[int, tuple[float, int]] | None, speed: float):
    """The correction's factor per input length: where the run measured at least two
    lengths with MIN_STEPS_AT steps each, their ratios interpolated over log L (the
    nearest measured one beyond the ends); else `speed` for every length."""
    seen = sorted((L, r) for L, (r, n) in (by_length or {}).items() if n >= MIN_STEPS_AT)
    if len(seen) < 2:
        return lambda L: speed, None
    logs, ratios = np.log([L for L, _ in seen]), [r for _, r in seen]
    return (lambda L: float(np.interp(np.log(max(L, 1)), logs, ratios)),
            {str(L): round(r, 4) for L, r in seen})


def scaled(profile: dict, factor) -> dict:
    """A copy of `profile` with each point's times multiplied by factor(its input length)."""
    out = copy.deepcopy(profile)
    for pt in out["points"]:
        f = factor(int(pt["size"]))
        for key in ("median_s", "p10_s", "p90_s"):
            if key in pt:
                pt[key] = pt[key] * f
    return out


def visited(by_length: dict[int, tuple[float, int]] | None) -> list[int]:
    """The input lengths a run measured with MIN_STEPS_AT steps or more."""
    return sorted(L for L, (_, n) in (by_length or {}).items() if n >= MIN_STEPS_AT)


def corrected(profile: dict, profile_src: str, speed: float, steps: int,
              threshold: float, run: str,
              by_length: dict[int, tuple[float, int]] | None = None) -> dict | None:
    """This machine's own profile where a run found the one in use off: every point's
    time times the run's measured ÷ profiled step time (:func:`treeopt.evaluation.
    speed_by_length`, each step read at its own input length and context) — one ratio
    `speed` for the whole grid, or where the run measured two input lengths or more
    (a tree's steps and the adapting runtime's plain ones), the ratio at each point's
    input length (:func:`shape`: a profile whose t(L) shape is wrong is mended too) —
    with the measurements it rests on and when. The runtime's overhead scales by `speed`.
    None where the ratios are within `threshold` of 1, or rest on fewer than MIN_STEPS
    steps. Lengths and batch sizes the run never visited take the nearest measured
    length's ratio: `treeopt profile` remains the way to a full one."""
    factor, measured = shape(by_length, speed)
    off = [abs(speed - 1)] + [abs(float(r) - 1) for r in (measured or {}).values()]
    if steps < MIN_STEPS or max(off) <= threshold:
        return None
    out = scaled(profile, factor)
    over = out.get("overhead") or {}
    if "per_step_s" in over:
        over["per_step_s"] *= speed
    per_seq = (over.get("batched") or {}).get("per_sequence_s") or {}
    for key in per_seq:
        per_seq[key] *= speed
    base = (profile.get("corrected") or {})
    out["corrected"] = {"from": base.get("from", profile_src),
                        "ratio": round(speed * base.get("ratio", 1.0), 4),
                        "this_ratio": round(speed, 4), "steps": steps, "run": run,
                        **({"by_input_length": measured} if measured else {}),
                        "input_lengths": visited(by_length),
                        "note": "every point scaled by the run's measured / profiled step "
                                "time" + (" at its input length (interpolated over log L)"
                                          if measured else "") +
                                "; `treeopt profile` measures this machine in full",
                        **stamp()}
    return out


def needs_points(profile: dict | None) -> tuple[list[int], list[int]] | None:
    """What a corrected profile's next run measures, once: (anchors, lengths) — the
    short profile's SIZES outside the range of input lengths its run visited, and the
    visited ends they are read against (none where the run recorded no lengths: then every
    size). None: not a correction, already re-calibrated, or nothing outside."""
    cor = (profile or {}).get("corrected")
    if not cor or "recalibrated" in cor:
        return None
    seen = cor.get("input_lengths") or []
    if not seen:
        return [], list(SIZES)
    lo, hi = min(seen), max(seen)
    new = [L for L in SIZES if L < lo or L > hi]
    if not new:
        return None
    anchors = sorted({lo for L in new if L < lo} | {hi for L in new if L > hi})
    return anchors, new


def measure_sizes(dec, sizes: list[int], quiet: bool = True) -> list[dict]:
    """The short profile's points (two sweeps at CONTEXT, B = 1) at `sizes` alone."""
    points, _ = measure_points(dec, sorted(set(sizes)), [CONTEXT], repeats=16, budget=2.0,
                               quiet=quiet, rounds=2)
    return points


def recalibrated(profile: dict, points: list[dict], seconds: float) -> dict:
    """The corrected profile mended where its run never measured: each measured size's
    ratio r(L) = measured / profiled t(L, CONTEXT), read against the visited end beside it
    (r(L) / r(anchor): the machine may run at another speed now; the run already set the
    level, the calibration sets the shape beyond it) — or, where the run recorded no
    lengths, against the median ratio. Points outside the visited range are scaled by
    that relative ratio, interpolated over log L (:func:`shape`); inside it, by 1."""
    lat = Latency(profile, with_overhead=False)
    ratio = {int(p["size"]): p["median_s"] / float(lat([int(p["size"])], CONTEXT)[0])
             for p in points}
    cor = profile["corrected"]
    seen = cor.get("input_lengths") or []
    if seen:
        lo, hi = min(seen), max(seen)
        rel = {lo: 1.0, hi: 1.0}
        rel.update({L: r / ratio[lo] for L, r in ratio.items() if L < lo})
        rel.update({L: r / ratio[hi] for L, r in ratio.items() if L > hi})
    else:
        mid = float(np.median(list(ratio.values())))
        rel = {L: r / mid for L, r in ratio.items()}
    factor, _ = shape({L: (r, MIN_STEPS_AT) for L, r in rel.items()}, 1.0)
    out = scaled(profile, factor)
    out["corrected"]["recalibrated"] = {
        "context": CONTEXT, "seconds": round(seconds, 1),
        "by_input_length": {str(L): round(r, 4) for L, r in sorted(rel.items())},
        "note": "input lengths the run never visited, measured at the start of the next "
                "(a short profile's points, read against the visited lengths beside them)",
        **stamp()}
    return out
