"""The run JSON that `run` and `bench` write (schema ``treeopt.run/1``), read back by
`report`: every field a reader formats or plots is checked here, so a hand-edited or
truncated file fails with one line naming the field, never a KeyError mid-report.

Field specs as :func:`treeopt.artefact.check_fields` takes them.
"""
from __future__ import annotations

from .artefact import check_fields, check_schema, finite, read_json
from .bounds import count
from .errors import BadInput

SCHEMA = "treeopt.run/1"

PREDICTED = {"?tokens_per_step": "num", "?tokens_per_second": "num", "?step_seconds": "num",
             "?speed_vs_profile": "num", "?tokens_per_second_at_run_speed": "num",
             "?error_at_run_speed": "num"}
TOP = {"?tokens_per_step": "num", "?tokens_per_second": "num", "?hf_tokens_per_second": "num",
       "?speedup_vs_hf": "num", "?step_overhead_fraction": "num", "?identical_fraction": "num",
       "?unexplained_divergences": "count", "?prompts": "count", "?kind": "str"}
ROWS = {
    "per_prompt": {"speedup_vs_hf": "num", "tokens_per_step": "num", "identical": "bool"},
    "batch": {"batch": "batch", "chosen_tokens_per_second": "num",
              "plain_tokens_per_second": "num", "hf_tokens_per_second": "num",
              "single_tokens_per_second": "num", "speedup_vs_plain": "num",
              "speedup_vs_hf": "num", "tokens_per_step": "num"},
    "families": {"family": "str", "prompts": "count", "tokens_per_step": "num",
                 "tokens_per_second": "num", "hf_tokens_per_second": "num",
                 "speedup_vs_hf": "num", "identical_fraction": "num",
                 "unexplained_divergences": "count", "?ppd_alone_tokens_per_second": "num",
                 "?ppd_alone_tokens_per_step": "num", "?hf_lookup_tokens_per_second": "num",
                 "?speedup_vs_ppd_alone": "num", "?speedup_vs_hf_lookup": "num",
                 "?hf_static_tokens_per_second": "num", "?speedup_vs_hf_static": "num"},
}


DRIFT = {"replayed": "obj", "measured_tokens_per_step": "num",
         "?predicted_tokens_per_step": "num", "?text": "num", "model": "obj", "?speed": "num"}


def check_drift(d, where: str) -> None:
    """A drift block (:mod:`treeopt.drift`): the figures a report formats."""
    check_fields(d, DRIFT, where)
    check_fields(d["replayed"], {"tokens_per_step": "num"}, f"{where}.replayed")
    check_fields(d["model"], {"?tokens_per_step": "num",
                              "?tokens_per_second_at_run_speed": "num"}, f"{where}.model")


def check_predicted(pred, where: str) -> None:
    """A prediction block: its figures numbers, its errors a number or numbers."""
    check_fields(pred, PREDICTED, where)
    err = pred.get("error")
    if err is not None and not finite(err):
        check_fields(err, {f"?{k}": "num" for k in (err if isinstance(err, dict) else {})},
                     f"{where}.error")


def validate(run: dict, where: str = "run file") -> None:
    check_schema(run, SCHEMA, where)
    check_fields(run, TOP, where)
    for key in ("predicted", "decode"):
        if run.get(key) is not None:
            check_predicted(run[key], f"{where}: {key}")
    if run.get("drift") is not None:
        check_drift(run["drift"], f"{where}: drift")
    for key, spec in ROWS.items():
        rows = run.get(key)
        if rows is None:
            continue
        if not isinstance(rows, list):
            raise BadInput(f"{where}: {key} must be a list of rows")
        count(len(rows), "record_prompts", f"{where}: {key}", lo=0)
        for i, row in enumerate(rows):
            check_fields(row, spec, f"{where}: {key}[{i}]")
            if isinstance(row.get("predicted"), dict):
                check_predicted(row["predicted"], f"{where}: {key}[{i}].predicted")
            elif row.get("predicted") is not None:
                raise BadInput(f"{where}: {key}[{i}].predicted must be an object")
            if row.get("drift") is not None:
                check_drift(row["drift"], f"{where}: {key}[{i}].drift")


def load(path) -> dict:
    run = read_json(path, "run file")
    validate(run, f"run file {path}")
    return run


def acceptance_blocks(run: dict) -> list[tuple[str, dict]]:
    """The records a run kept of its steps (:mod:`treeopt.records`), as (where, acceptance
    object): the run's own, each family's, each batch size's."""
    out = [("acceptance", run["acceptance"])] if isinstance(run.get("acceptance"), dict) else []
    for key, name in (("families", "family"), ("batch", "batch")):
        for i, row in enumerate(run.get(key) or []):
            if isinstance(row.get("acceptance"), dict):
                out.append((f"{key}[{i}] ({row.get(name)})", row["acceptance"]))
    return out
