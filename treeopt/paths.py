"""Where artefacts live: shipped inputs (read-only) and the user's own outputs.

Shipped artefacts (``profiles/`` at the top of a clone; the package data
``treeopt/profiles/`` of an installed wheel) are inputs and are never written by a verb. Every verb writes under one user folder, ``$TREEOPT_HOME`` (default
``$XDG_DATA_HOME/treeopt``, i.e. ``~/.local/share/treeopt``): ``profiles/`` for
profiles, acceptance files, trees and prompt tokens, ``reports/`` for run JSON and HTML
reports. The default lookup for an input is the user's own file first, then the shipped
one. File names are built from sanitised components only (:func:`slug`).
"""
from __future__ import annotations

import os
import pathlib
import re

from .errors import BadInput

PACKAGE = pathlib.Path(__file__).resolve().parent
# the folder that holds the shipped `profiles/`: the package itself once installed from a
# wheel (setup.py maps profiles/ into it), else the clone the package sits in
ROOT = PACKAGE if (PACKAGE / "profiles").is_dir() else PACKAGE.parent
SHIPPED = ROOT / "profiles"


def _env_folder(var: str, xdg: str, default: str) -> pathlib.Path:
    """$var, else $xdg/treeopt, else ~/default/treeopt; a path that cannot be a folder
    (an unknown ~user, an existing file) is a one-line BadInput."""
    raw = os.environ.get(var)
    name = var if raw else xdg
    p = pathlib.Path(raw) if raw else pathlib.Path(
        os.environ.get(xdg) or os.path.join(os.path.expanduser("~"), default)) / "treeopt"
    try:
        p = p.expanduser()
    except RuntimeError:  # ~user of no such user
        raise BadInput(f"${name}={p}: no such user to expand {str(p).split('/')[0]!r}") \
            from None
    if p.exists() and not p.is_dir():
        raise BadInput(f"${name}={p}: is not a folder")
    return p


def home() -> pathlib.Path:
    """The user's output folder."""
    return _env_folder("TREEOPT_HOME", "XDG_DATA_HOME", os.path.join(".local", "share"))


def cache_dir() -> pathlib.Path:
    """User cache for converted models and other derived data ($TREEOPT_CACHE)."""
    return _env_folder("TREEOPT_CACHE", "XDG_CACHE_HOME", ".cache")


def make_folder(p: pathlib.Path) -> pathlib.Path:
    """Create a cache or output folder (and its parents); failure → one-line BadInput."""
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create folder {p} ({e.strerror or e})") from e
    if not os.access(p, os.W_OK):
        raise BadInput(f"folder {p} is not writable")
    return p


def user_profiles() -> pathlib.Path:
    return home() / "profiles"


def user_reports() -> pathlib.Path:
    return home() / "reports"


def recent_text(model_id: str) -> pathlib.Path:
    """The records of this user's last greedy run or bench of the model (what the text
    took), kept apart from `profiles/`: they inform the next run's prediction, never the
    search's acceptance."""
    return home() / "recent" / f"{name_part(model_id)}.acceptance.json"


def slug(text: str) -> str:
    """A safe file-name component: lower-case letters, digits, '.', '-' (no '..')."""
    s = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.")
    return re.sub(r"\.{2,}", ".", s) or "x"


def name_part(text: str) -> str:
    """A file-name component that keeps a model's own spelling but nothing that could
    leave the folder (separators, '..', control characters)."""
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-.")
    return re.sub(r"\.{2,}", ".", s) or "x"


def lookup(name: str) -> pathlib.Path | None:
    """The user's file of that name, else the shipped one, else None."""
    for folder in (user_profiles(), SHIPPED):
        p = folder / name
        if p.exists():
            return p
    return None


def display_path(path) -> str:
    """A path as stored in artefacts: relative to :data:`ROOT` when inside it (so shipped
    artefacts stay valid in any clone and in an installed package), else absolute."""
    p = pathlib.Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def stored_path(text) -> pathlib.Path | None:
    """An artefact's stored path back as a file (relative ones are tried against the
    current directory, then :data:`ROOT`); None when it names no file."""
    if not text:
        return None
    for p in (pathlib.Path(text), ROOT / text):
        if p.is_file():
            return p
    return None


# ---- artefact names (one rule each) ---------------------------------------------------
def profile_name(device_id: str, model_id: str, dtype: str) -> str:
    return f"{slug(device_id)}__{name_part(model_id)}__{slug(dtype)}.json"


def acceptance_name(model_id: str) -> str:
    return f"{name_part(model_id)}.acceptance.json"


def corpus_name(model_id: str) -> str:
    return f"{name_part(model_id)}.corpus.json"


def tree_name(device_id: str, model_id: str, dtype: str) -> str:
    return f"{slug(device_id)}__{name_part(model_id)}__{slug(dtype)}.tree.json"


def prompt_tokens_name(model_id: str) -> str:
    return f"{name_part(model_id)}.prompt_tokens"


def run_name(device_id: str, model_id: str) -> str:
    return f"{slug(device_id)}__{name_part(model_id)}.run.json"


def default_tree_name(model_id: str) -> str:
    return f"default__{name_part(model_id)}.tree.json"


def search_report_path(tree_path) -> pathlib.Path:
    """The search report (per-input-length table, curves) that sits beside a tree."""
    p = pathlib.Path(tree_path)
    stem = p.name.removesuffix(".json").removesuffix(".tree")
    return p.with_name(f"{stem}.search.json")
