"""First-run calibration as `run`, `bench` and `demo` do it (:mod:`treeopt.calibrate`):
where this device and dtype have no profile and no tree or profile is given, measure a
short profile, keep it as this device's, pick the tree by replay and keep it too — so the
next command finds both. `--no-calibrate` (or TREEOPT_CALIBRATE=0) keeps the tree found.
And what a run keeps for the next one: the corrected profile where the one it found is
off (:func:`keep_correction`) — which the next run mends, once, at the input lengths the
run never visited (:func:`maybe_recalibrate`) — and its text's records, on which the next
run's prediction is also made (:func:`keep_text`, :func:`on_recent_text`)."""
from __future__ import annotations

import os
import time

from .. import acceptance, calibrate, paths
from ..artefact import check_out, write_json
from ..device import device_slug
from ..drift import SPEED_WARN
from ..errors import BadInput
from ..evaluation import predicted_vs_measured
from .common import warn


def add_calibrate_arg(p) -> None:
    p.add_argument("--no-calibrate", action="store_true",
                   help="on a device and dtype without a profile, decode with the tree found "
                   "instead of measuring a short profile and picking the tree for it first "
                   "(also TREEOPT_CALIBRATE=0)")


def switched_off(args) -> bool:
    return getattr(args, "no_calibrate", False) or os.environ.get("TREEOPT_CALIBRATE") == "0"


def wanted(args, inp, dec) -> bool:
    """Calibrate: no profile of this device and dtype, none given, no tree given, a real
    model and acceptance records to replay, and not switched off."""
    return not switched_off(args) and inp.profile is None and \
        not getattr(args, "profile", None) and not getattr(args, "tree", None) and \
        dec.lm.tokenizer is not None and inp.acceptance is not None and \
        "lookup" in inp.acceptance


def in_user_profiles(path) -> bool:
    """The profile file is one of this user's (under $TREEOPT_HOME), not a shipped one."""
    return path.parent.resolve() == paths.user_profiles().resolve()


def maybe_calibrate(args, inp, dec, info: dict, human: bool) -> dict | None:
    """Calibrate where :func:`wanted` says so: the decoder switches to the chosen tree,
    `inp` and `info` name the kept profile and tree; else mend a correction's unvisited
    lengths (:func:`maybe_recalibrate`). Returns what it did, or None."""
    if not wanted(args, inp, dec):
        return maybe_recalibrate(args, inp, dec, info, human)
    t0 = time.perf_counter()
    dev, mid, dtype = device_slug(dec.device.type), info["model"], info["dtype"]
    prof_path = check_out(paths.user_profiles() / paths.profile_name(dev, mid, dtype),
                          what="calibrated profile")
    tree_path = check_out(paths.user_profiles() / paths.tree_name(dev, mid, dtype),
                          what="calibrated tree")
    warn(f"calibrating: no profile of {dev} {dtype} yet — a short one (~{len(calibrate.SIZES)}"
         " input lengths), then the tree for it (--no-calibrate skips this)")
    prof = calibrate.short_profile(dec, quiet=not human)
    write_json(prof_path, prof)
    cands = calibrate.candidates(mid) or [(f"the decoder's {info['tree']}", dec.tree)]
    pick = calibrate.choose(cands, inp.acceptance, prof)
    tree = calibrate.chosen_tree(pick, cands, paths.display_path(prof_path),
                                 inp.acceptance_src, dev, dtype)
    tree.save(tree_path)
    dec.use_tree(tree, args.cache_tokens)
    inp.profile, inp.profile_path = prof, prof_path
    inp.profile_src = paths.display_path(prof_path)
    inp.tree, inp.tree_src = tree, paths.display_path(tree_path)
    info["tree"] = inp.tree_src
    info.pop("plain", None)
    if dec.plain:
        info["plain"] = True
    best, plain = pick["best"], next(r for r in pick["rows"] if r["tree"] is None)
    done = {"seconds": round(time.perf_counter() - t0, 1), "profile": inp.profile_src,
            "tree": inp.tree_src, "chosen": best["name"],
            "tokens_per_second": round(best["tokens_per_second"], 2),
            "plain_tokens_per_second": round(plain["tokens_per_second"], 2)}
    info["calibrated"] = done
    warn(f"calibrated in {done['seconds']:.0f} s: chose {best['name']} "
         f"({best['tokens_per_second']:.1f} tokens/s predicted, plain decoding "
         f"{plain['tokens_per_second']:.1f}); kept {prof_path.name} and {tree_path.name} "
         "as this device's (`treeopt profile` then `treeopt search` find a better tree)")
    return done


def maybe_recalibrate(args, inp, dec, info: dict, human: bool) -> dict | None:
    """Where the profile found is this machine's correction (:func:`keep_correction`) and
    its run never visited some of the short profile's input lengths, measure those (and
    the visited ends beside them) now, once, and keep the mended profile in its place
    (:func:`treeopt.calibrate.recalibrated`). Not where calibration is switched off or a
    profile was given. Returns what it did, or None."""
    path = inp.profile_path
    if switched_off(args) or getattr(args, "profile", None) or path is None or \
            not in_user_profiles(path) or (inp.profile or {}).get("model") != dec.lm.model_id:
        return None
    need = calibrate.needs_points(inp.profile)
    if need is None:
        return None
    anchors, sizes = need
    warn(f"re-calibrating: {inp.profile_src} was corrected from a run's steps; measuring "
         f"input lengths {', '.join(map(str, sizes))} it never visited (once, seconds)")
    t0 = time.perf_counter()
    points = calibrate.measure_sizes(dec, anchors + sizes, quiet=not human)
    new = calibrate.recalibrated(inp.profile, points, time.perf_counter() - t0)
    write_json(path, new)
    inp.profile = new
    done = new["corrected"]["recalibrated"]
    info["recalibrated"] = {"profile": inp.profile_src, "seconds": done["seconds"],
                            "by_input_length": done["by_input_length"]}
    warn(f"re-calibrated in {done['seconds']:.0f} s: " + ", ".join(
        f"L={L} x{r:.2f}" for L, r in done["by_input_length"].items()) +
         f" beside the run's own (kept in {inp.profile_src})")
    return done


def keep_correction(args, inp, speed: float | None, steps: int, run: str,
                    by_length: dict | None = None) -> str | None:
    """Where this run found the profile in use (found, not given; shipped or an earlier
    correction, never your own measured one) off beyond its stated error, this machine's
    corrected profile under $TREEOPT_HOME, which the next run finds first; the line that
    says so, else None."""
    prof, path = inp.profile, inp.profile_path
    if speed is None or prof is None or path is None or getattr(args, "profile", None):
        return None
    mine = in_user_profiles(path)
    if mine and "corrected" not in prof:
        return None  # your own full profile: the drift line says re-profile
    threshold = max(SPEED_WARN, (prof.get("short") or {}).get("error", 0.0))
    new = calibrate.corrected(prof, inp.profile_src, speed, steps, threshold, run, by_length)
    if new is None:
        return None
    out = paths.user_profiles() / path.name
    if not mine:  # an earlier correction is replaced (it was read: no other check_out rule)
        check_out(out, what="corrected profile")
    write_json(paths.make_folder(out.parent) / out.name, new)
    shape = new["corrected"].get("by_input_length")
    how = ("each point by its input length's ratio: " + ", ".join(
        f"L={L} x{r:.2f}" for L, r in shape.items())) if shape else f"every point x{speed:.2f}"
    return (f"corrected: this machine ran {speed:.2f}x the step time of {inp.profile_src} "
            f"over {steps} steps; kept {paths.display_path(out)} ({how}), "
            "which the next run starts from — `treeopt profile` measures it in full")


def keep_text(model: str, block: dict | None) -> None:
    """A greedy run's records (its acceptance block) as this user's recent text for
    `model` (:func:`treeopt.paths.recent_text`), replacing the last one."""
    if block:
        out = paths.recent_text(model)
        write_json(paths.make_folder(out.parent) / out.name, block)


def on_recent_text(tree, measured: dict, inp, speed: float | None, model: str
                   ) -> dict | None:
    """The prediction of this run made on the user's last run's text instead of the
    acceptance sample (the same rule, :func:`treeopt.evaluation.predicted_vs_measured`):
    the text drift a run cannot know from the sample. None where no recent text is kept,
    it does not read, or its table does not cover the tree."""
    path = paths.recent_text(model)
    if not path.is_file():
        return None
    try:
        recent = acceptance.load(path)
        return predicted_vs_measured(tree, measured, inp.profile, inp.profile_src, recent,
                                     paths.display_path(path), speed)
    except BadInput:
        return None


def recent_line(pred: dict | None) -> str | None:
    """One line on the prediction made on the last run's text."""
    if not pred:
        return None
    err = pred["error"].get("tokens_per_second_at_run_speed", pred["error"]["tokens_per_second"])
    return (f"on your last run's text ({pred['acceptance']}): predicted "
            f"{pred['tokens_per_step']:.2f} tokens/step, {100 * err:+.0f}% off this run's "
            f"tokens/s at run speed")

