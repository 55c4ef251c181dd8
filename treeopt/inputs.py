"""The one input resolver: which model, profile, acceptance file, tree and prompt tokens a
verb uses. Given paths win; otherwise the user's own artefact for this device and model
(under $TREEOPT_HOME), then the shipped one, then (for models with published reference
data and no weights) the reference acceptance table and a simulated GPU profile.

Files are read and validated here, before any model loads, so bad input fails in
seconds.
"""
from __future__ import annotations

import dataclasses
import pathlib

from . import corpus as corpora
from . import latency, paths, pooled
from .device import cpu_class, device_slug
from .errors import BadInput
from .export import load_tree
from .models import (DEFAULT_MODEL_ID, KNOWN_MODELS, canonical_model, context_of, dtype_name,
                     known_model, pick_device, pick_dtype)
from .tree import Tree

DEFAULT_SIM_GPU = "a100-80gb"


@dataclasses.dataclass
class Inputs:
    model_id: str
    profile: dict | None = None
    profile_path: pathlib.Path | None = None
    profile_src: str | None = None
    acceptance: dict | None = None
    acceptance_paths: list[pathlib.Path] = dataclasses.field(default_factory=list)
    acceptance_src: str | None = None
    acceptance_note: str | None = None  # its records sampled for a bounded replay
    tree: Tree | None = None
    tree_src: str | None = None
    prompt_tokens: pathlib.Path | None = None
    prompt_tokens_src: str | None = None
    corpus: dict | None = None  # the cache source's corpus (treeopt.corpus/1) and documents
    corpus_docs: list = dataclasses.field(default_factory=list, repr=False)  # int32 arrays
    corpus_src: str | None = None

    def paths(self) -> list[pathlib.Path]:
        """Every input file (an --out must be none of them)."""
        return [p for p in (self.profile_path, *self.acceptance_paths,
                            paths.stored_path(self.tree_src)) if p is not None]


def model_id(model: str | None) -> str:
    """The id artefacts of this model are named by, known before any weights load."""
    if model is None:
        return DEFAULT_MODEL_ID
    return known_model(model) or pathlib.Path(model).expanduser().resolve().name


def local_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """(device type, dtype name) that a model load with these settings would use."""
    dev = pick_device(device)
    return dev.type, dtype_name(pick_dtype(dtype, dev))


def find_profile(mid: str, device: str = "auto", dtype: str = "auto") -> pathlib.Path | None:
    """This device's measured profile for the model and dtype: the user's, else shipped."""
    pattern = f"*__{paths.name_part(mid)}__*.json"
    if not any(not p.name.startswith("sim-")
               for folder in (paths.user_profiles(), paths.SHIPPED) for p in folder.glob(pattern)):
        return None  # no measured profile of this model anywhere: torch need not load
    dev_type, dt = local_device(device, dtype)
    return paths.lookup(paths.profile_name(device_slug(dev_type), mid, dt))


def find_acceptance(mid: str, tree: Tree | None = None) -> list[pathlib.Path]:
    """The user's measured acceptance, else what the tree was searched with (acceptance
    files or runs, " + " between pooled ones), else the shipped one, else the published
    reference table of a known model. [] when none is found."""
    name = paths.acceptance_name(mid)
    cands = [[paths.user_profiles() / name]]
    if tree is not None:
        src = (tree.meta or {}).get("acceptance")
        cands.append([paths.stored_path(s) for s in str(src or "").split(" + ")])
    cands.append([paths.SHIPPED / name])
    ref = KNOWN_MODELS.get(known_model(mid) or "", {}).get("reference")
    if ref:
        cands.append([paths.SHIPPED / "reference" / paths.acceptance_name(ref)])
    return next((c for c in cands if all(p is not None and p.is_file() for p in c)), [])


def find_tree(mid: str, device: str = "auto", dtype: str = "auto") -> pathlib.Path | None:
    """The tree searched for this device and dtype (yours, else shipped), else one searched
    for a CPU of this one's class and this dtype (:func:`class_tree`), else the shipped
    hand-made default."""
    dev_type, dt = local_device(device, dtype)
    here = device_slug(dev_type)
    return paths.lookup(paths.tree_name(here, mid, dt)) or class_tree(here, mid, dt) or \
        paths.lookup(paths.default_tree_name(mid))


def class_tree(here: str, mid: str, dtype: str) -> pathlib.Path | None:
    """A tree of this model and dtype searched on another CPU of this one's architecture
    (x86, Arm): the same ISA class first, then the nearest core count; yours before the
    shipped ones. None on a GPU or where none is."""
    mine = cpu_class(here)
    if mine is None:
        return None
    suffix = f"__{paths.name_part(mid)}__{paths.slug(dtype)}.tree.json"
    found = []
    for rank, folder in enumerate((paths.user_profiles(), paths.SHIPPED)):
        for p in sorted(folder.glob(f"cpu-*{suffix}")):
            theirs = cpu_class(p.name.removesuffix(suffix))
            if theirs is not None and theirs[0] == mine[0]:
                found.append(((theirs[1] != mine[1], abs(theirs[2] - mine[2]), rank), p))
    return min(found, key=lambda f: f[0])[1] if found else None


def searched_for(tree: Tree) -> tuple[str | None, str | None]:
    """(device id, dtype) a tree was searched for: its own meta, else its profile's (trees
    searched before trees named them); (None, None) for a hand-made tree."""
    meta = tree.meta or {}
    dev, dt = meta.get("device_id"), meta.get("dtype")
    prof = paths.stored_path(meta.get("profile")) if dev is None or dt is None else None
    if prof is not None:
        try:
            obj = latency.load(prof)
            dev, dt = dev or obj.get("device_id"), dt or obj["dtype"]
        except BadInput:
            pass
    return (dev if isinstance(dev, str) else None), (dt if isinstance(dt, str) else None)


def foreign_notes(inp: Inputs, device: str = "auto", dtype: str = "auto",
                  model: str | None = None) -> list[str]:
    """One line for each input made for another device or dtype than this decode's (the
    tree, the profile), with the commands that make this device's own; [] when none is."""
    dev_type, dt = local_device(device, dtype)
    here = (device_slug(dev_type), dt)
    flags = (f" --model {model}" if model else "") + (f" --dtype {dtype}" if dtype != "auto"
                                                      else "")
    fix = (f"`treeopt profile{flags}` then `treeopt search --sources ppd,lookup,cache{flags}` "
           "search this device's tree")
    notes = []
    if inp.tree is not None:
        made = searched_for(inp.tree)
        if made == (None, None):
            notes.append(f"note: tree {inp.tree_src} is a hand-made default, searched for no "
                         f"device; this is {' '.join(here)}: {fix}")
        elif made != here:
            notes.append(f"note: tree {inp.tree_src} was searched for {made[0]} {made[1]}, "
                         f"this is {' '.join(here)}: {fix}")
    if inp.profile is not None and not inp.profile.get("simulated"):
        made = (inp.profile.get("device_id"), inp.profile["dtype"])
        if made != here:
            notes.append(f"note: profile {inp.profile_src} was measured on {made[0]} "
                         f"{made[1]}, this is {' '.join(here)}: its predictions do not hold "
                         f"here (`treeopt profile{flags}` measures this device)")
    return notes


def resolve_inputs(model: str | None = None, profile: str | None = None,
                   acceptance: str | list[str] | None = None, tree: str | None = None,
                   prompt_tokens: str | None = None, device: str = "auto", dtype: str = "auto",
                   need: tuple[str, ...] = (), want: tuple[str, ...] = (),
                   simulate: bool = False, batch: list[int] | None = None,
                   corpus: str | None = None) -> Inputs:
    """Find and load what a verb needs. `need` names what must be found ("profile",
    "acceptance"; an error when missing), `want` what to look for (None when there is
    none; "tree" is only ever wanted); `simulate` allows a simulated GPU profile for a known model
    without a measured one (at the `batch` sizes too). Given files must belong to the
    model. Several acceptance sources (files, run JSONs) are pooled
    (:func:`treeopt.pooled.load`). The corpus (where "corpus" is wanted or one is given;
    "none": no corpus) is read and checked here, its tokenizer when the model loads."""
    acceptance = [acceptance] if isinstance(acceptance, str) else list(acceptance or [])
    given = {"acceptance": pooled.load(acceptance) if acceptance else None,
             "profile": latency.load(profile) if profile else None}
    mid = model_id(model)
    if model is None:  # the given files name the model
        mid = next((g["model"] for g in given.values() if g is not None), mid)
    out = Inputs(mid)
    if tree:
        out.tree, out.tree_src = load_tree(tree), paths.display_path(tree)
        limit = context_of(model)
        if limit and out.tree.max_input_length >= limit:
            raise BadInput(f"--tree {tree}: its forward input is {out.tree.max_input_length} "
                           f"tokens, the model's context is {limit}")
    elif "tree" in need + want:
        path = find_tree(mid, device, dtype)
        if path is not None:
            out.tree, out.tree_src = load_tree(path), paths.display_path(path)
    if prompt_tokens:
        p = pathlib.Path(prompt_tokens)
        if not p.is_dir():
            raise BadInput(f"prompt tokens {p}: no such folder")
        out.prompt_tokens, out.prompt_tokens_src = p, paths.display_path(p)
    else:
        p = paths.lookup(paths.prompt_tokens_name(mid))
        if p is not None:
            out.prompt_tokens, out.prompt_tokens_src = p, paths.display_path(p)
    if "corpus" in want or corpus:
        path = None if corpus == "none" else \
            pathlib.Path(corpus) if corpus else paths.lookup(paths.corpus_name(mid))
        if path is not None:
            out.corpus, out.corpus_docs = corpora.read(path)
            _same_model("corpus", out.corpus, path, mid, bool(corpus))
            out.corpus_src = paths.display_path(path)
    if "acceptance" in need + want or acceptance:
        found = [pathlib.Path(a) for a in acceptance] or find_acceptance(mid, out.tree)
        if found:
            out.acceptance = given["acceptance"] or pooled.load(found)
            out.acceptance_paths = found
            out.acceptance_src = " + ".join(paths.display_path(p) for p in found)
            out.acceptance, out.acceptance_note = pooled.capped(out.acceptance,
                                                                out.acceptance_src)
            _same_model("acceptance", out.acceptance, out.acceptance_src, mid,
                        bool(acceptance))
        elif "acceptance" in need:
            raise BadInput(f"no acceptance file for {mid}: run `treeopt accept` or pass "
                           "--acceptance")
    if "profile" in need + want or profile:
        path = pathlib.Path(profile) if profile else find_profile(mid, device, dtype)
        if path is not None:
            out.profile, out.profile_path = given["profile"] or latency.load(path), path
            out.profile_src = paths.display_path(path)
            _same_model("profile", out.profile, path, mid, bool(profile))
        elif simulate and known_model(mid) and known_model(mid) != DEFAULT_MODEL_ID:
            out.profile = latency.simulate(DEFAULT_SIM_GPU, known_model(mid), "float16",
                                           latency.GPU_SIZES + [384, 512], latency.CONTEXTS,
                                           batch_sizes=sorted({1, *(batch or [])}))
            out.profile_src = f"simulated {DEFAULT_SIM_GPU} (roofline, no weights needed)"
        elif "profile" in need:
            raise BadInput(f"no measured profile for {mid} on this device: run "
                           "`treeopt profile` or pass --profile")
    if out.profile and out.acceptance and \
            canonical_model(out.profile["model"]) != canonical_model(out.acceptance["model"]):
        raise BadInput(f"profile is for {out.profile['model']} but the acceptance file is for "
                       f"{out.acceptance['model']}")
    return out


def _same_model(what: str, obj: dict, path, mid: str, given: bool) -> None:
    if canonical_model(obj["model"]) != canonical_model(mid):
        flag = f"--{what} " if given else ""
        raise BadInput(f"{flag}{path} is for {obj['model']}, the model is {mid}")
