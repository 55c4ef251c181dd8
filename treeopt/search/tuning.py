"""optuna over what the exact optimiser takes as given (how many prompt-token rows, a
width cap, the product or the conditional probability model): `search --trials N`.

One study per objective: its name carries a digest of everything a trial's score depends
on (the accuracies and path probabilities, t(L) over the input lengths allowed, the input
cap, static or dynamic), so trials scored under another profile, acceptance file or cap
are never counted or chosen; the same search run again resumes its own study."""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from ..artefact import mask_secrets
from ..errors import BadInput, deferred_signals
from ..paths import cache_dir, make_folder
from .curves import optimise_static
from .exact import optimise

def objective_key(acc_prod, acc_fit, pp, lat, max_input: int, static: bool) -> str:
    """A digest of what defines the objective (16 hex digits)."""
    h = hashlib.sha256()
    for a in (acc_prod, acc_fit, lat(np.arange(1, max_input + 1))):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(repr((sorted((pp or {}).items()), pp is None, max_input, static)).encode())
    return h.hexdigest()[:16]


def _open_study(optuna, storage: str, name: str):
    for attempt in range(3):  # another process creating the same storage's tables races
        try:
            return optuna.create_study(direction="maximize", study_name=f"treeopt-{name}",
                                       storage=storage, load_if_exists=True,
                                       sampler=optuna.samplers.TPESampler(seed=0))
        except Exception as e:  # noqa: BLE001 - unknown dialect, unreachable server, bad path
            if attempt == 2 or e.__class__.__name__ not in ("IntegrityError",
                                                            "OperationalError"):
                raise BadInput(f"--storage {mask_secrets(storage)}: cannot open it "
                               f"({e.__class__.__name__})") from e
            time.sleep(0.2 * (attempt + 1))


def tune(acc_prod, acc_fit, pp, lat, max_input, trials, storage, static, name) -> dict:
    """optuna TPE over what the exact optimiser takes as given."""
    import optuna  # heavy and optional: loaded only when trials are asked for

    optuna.logging.set_verbosity(logging.ERROR)  # a failed trial is our one-line error
    if storage is None:
        make_folder(cache_dir())
        storage = f"sqlite:///{cache_dir() / 'search.db'}"
    # a signal mid-trial would raise inside optuna's or SQLAlchemy's bookkeeping: hold it,
    # stop after the running trial, then let it through
    study_name = f"{name}-{objective_key(acc_prod, acc_fit, pp, lat, max_input, static)}"
    with deferred_signals() as stopped:
        study = _open_study(optuna, storage, study_name)

        def objective(trial):
            k = trial.suggest_int("k", 1, acc_prod.shape[0])
            cap = trial.suggest_int("width_cap", 1, acc_prod.shape[1])
            cond = trial.suggest_categorical("conditional", [True, False]) if pp else False
            acc, use = (acc_fit, pp) if cond else (acc_prod, None)
            if static:
                return optimise_static(acc, lat, k, max_input, use).tokens_per_second
            return optimise(acc, lat, k, max_input, use, width_cap=cap).tokens_per_second

        # the exact optimiser's own setting first: tuning can then only match or improve it
        study.enqueue_trial({"k": acc_prod.shape[0], "width_cap": acc_prod.shape[1],
                             **({"conditional": True} if pp else {})}, skip_if_exists=True)
        if not stopped:
            study.optimize(objective, n_trials=trials, catch=(),
                           callbacks=[lambda st, _: st.stop() if stopped else None])
    bp = study.best_params
    return {"k": bp["k"], "width_cap": bp["width_cap"],
            "conditional": bool(bp.get("conditional", False)), "trials": len(study.trials),
            "storage": mask_secrets(storage), "study": study.study_name}
