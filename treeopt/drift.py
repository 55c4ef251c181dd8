"""Why a run's figures differ from the prediction, in three parts (each a ratio − 1):

    text drift  = replayed on this run's text / predicted from the acceptance file
                  (tokens/step: the tree on this text vs on the text it was searched on)
    model error = measured / replayed on this text
                  (tokens/step; tokens/s with the replay's step times at the run's speed)
    speed drift = measured step time / the profile's t(L, C) at each step's own input
                  length and context (:func:`treeopt.evaluation.speed_vs_profile`)

The replay is the tree over the run's own recorded steps (:mod:`treeopt.records`), each
in the state the run recorded (:func:`treeopt.search.hybrid.replay_predict`, `follow`),
with step times read from the profile at the run's mean context; at B > 1 each batched
step pays its longest input (:func:`treeopt.search.hybrid.replay_batch`). Text drift says the
acceptance data is not this text (re-search from the run); speed drift says the profile
is not this machine now (re-profile); model error is treeopt's own (the replay does not
model the runtime). Each beyond its threshold is one line with what to run.
"""
from __future__ import annotations

from . import records
from .acceptance import unpack_records
from .latency import Latency
from .search.batch import flat_step
from .search.hybrid import replay_batch, replay_predict
from .tree import Tree

TEXT_WARN = 0.15  # |text drift| beyond this: the acceptance data is not this text
SPEED_WARN = 0.25  # |speed drift| beyond this: the profile is not this machine now
MODEL_WARN = 0.05  # |model error| beyond this: the replay does not model the runtime


def drift(tree: Tree, records: dict, measured: dict, predicted: dict | None,
          profile: dict | None, speed: float | None, batch: int = 1,
          steps: list[int] | None = None) -> dict:
    """The three drifts of a run (or of one batch size's steps) of `tree`: `records` is the
    run's acceptance block, `measured` its decode figures (tokens_per_step,
    tokens_per_second per sequence, context), `predicted` the acceptance file's
    prediction for the same tree (tokens_per_step), `speed` the run's step time over the
    profile's; at B > 1, `steps` (each record's batched step) lets the replay charge a
    shared step its longest input."""
    ctx = measured.get("context") or records.get("mean_context") or 1
    lat = (lambda L: Latency(profile, batch=batch)(L, ctx)) if profile else flat_step
    rec = unpack_records(records)
    rep = replay_batch(tree, rec, lat, steps) if batch > 1 and steps else \
        replay_predict(tree, rec, lat, follow=True)
    out: dict = {"replayed": rep, "measured_tokens_per_step": measured["tokens_per_step"],
                 "sources": "ppd,lookup,cache" if "cache_match" in rec else "ppd,lookup"}
    if predicted and predicted.get("tokens_per_step"):
        out["predicted_tokens_per_step"] = predicted["tokens_per_step"]
        out["text"] = round(rep["tokens_per_step"] / predicted["tokens_per_step"] - 1, 4)
    out["model"] = {"tokens_per_step": round(
        measured["tokens_per_step"] / rep["tokens_per_step"] - 1, 4)}
    if speed and profile and rep["tokens_per_second"]:
        out["model"]["tokens_per_second_at_run_speed"] = round(
            measured["tokens_per_second"] * speed / rep["tokens_per_second"] - 1, 4)
    if speed is not None:
        out["speed"] = round(speed - 1, 4)
    return out


def speed_line(speed: float | None, profile_src: str | None, model_flag: str = "") -> str | None:
    """One line when the run's speed is more than SPEED_WARN away from the profile's."""
    if speed is None or abs(speed - 1) <= SPEED_WARN:
        return None
    how = f"takes {speed:.2f}x the step time of" if speed > 1 else \
        f"runs {1 / speed:.2f}x faster than"
    return (f"speed drift: this machine {how} the profile {profile_src}; its predictions "
            f"do not hold here — re-profile this machine with `treeopt profile{model_flag}`")


def lines(d: dict | None, run_path, acceptance_src: str | None, profile_src: str | None,
          model_flag: str = "", what: str = "") -> list[str]:
    """The drift lines beyond their thresholds, each with the command that acts on it;
    `what` names the part of the run (a family, a batch size)."""
    if not d:
        return []
    out = []
    at = f" ({what})" if what else ""
    if abs(d.get("text", 0.0)) > TEXT_WARN:
        out.append(f"text drift{at}: on this text the tree makes "
                   f"{d['replayed']['tokens_per_step']:.2f} tokens/step, the acceptance data "
                   f"{acceptance_src} predicts {d['predicted_tokens_per_step']:.2f} "
                   f"({100 * d['text']:+.0f}%) — re-search from this run: `treeopt search"
                   f"{model_flag} --acceptance {run_path} --sources "
                   f"{d.get('sources', 'ppd,lookup')}`")
    worst = max(d["model"].items(), key=lambda kv: abs(kv[1]))
    if abs(worst[1]) > MODEL_WARN:
        out.append(f"model error{at}: measured {100 * worst[1]:+.0f}% against the tree "
                   f"replayed over this run's own steps ({worst[0].replace('_', ' ')}) — "
                   "treeopt's model of this runtime is off here; please report it")
    line = speed_line(1 + d["speed"] if "speed" in d else None, profile_src, model_flag)
    if line:
        out.append(line + (f" ({what})" if what else ""))
    return out


def assess(tree: Tree | None, k: int, model: str, prompts: list[list[int]], results: list,
           measured: dict, predicted: dict | None, profile: dict | None,
           speed: float | None, cache: dict | None = None,
           **about) -> tuple[dict | None, dict | None]:
    """A run's acceptance block (the records of its steps, :func:`records.of_run`; `cache`:
    the settings of the decoder's cache source) and its drifts (None without a tree or a
    full step)."""
    block = records.of_run(model, k, prompts, results, tree.lookup if tree else None,
                           cache, **about)
    if block is None or tree is None or not measured.get("steps"):
        return block, None
    return block, drift(tree, block, measured, predicted, profile, speed)


def batch_assess(row: dict, tree: Tree | None, k: int, model: str, prompts: list[list[int]],
                 results: list, lookup, profile: dict | None, speed: float | None,
                 cache: dict | None = None) -> None:
    """A batch bench row (one batch size B) gains the records of the chosen
    configuration's steps and, where B ran a tree, the drifts of the steps all B
    sequences shared, against the row's prediction where it has one; `speed` is those
    steps' time over `profile`'s (None: no profile at B)."""
    b = row["batch"]
    parts = records.of_results(prompts, results, k, lookup)  # one pass, read twice
    block = records.as_block(model, k, parts, lookup, cache=cache, run="bench --batch",
                             batch=b)
    if block:
        row["acceptance"] = block
    m, p = row.get("chosen_full_batch"), row.get("predicted")
    steps: list[int] = []
    own = records.as_block(model, k, parts, lookup, live=b, steps=steps, cache=cache) \
        if tree and m else None
    if own is None:
        return
    measured = {"tokens_per_step": m["tokens_per_step"], "steps": m["steps"],
                "tokens_per_second": m["tokens_per_second"] / b,
                "context": (p or {}).get("context")}
    row["drift"] = drift(tree, own, measured, p, profile, speed, b, steps)
