"""Where shipped and generated artefacts live, and how devices are named in file names."""
from __future__ import annotations

import os
import pathlib
import platform
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PROFILES = pathlib.Path(os.environ.get("TREEOPT_PROFILES", REPO / "profiles"))
REPORTS = REPO / "reports"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: str = "cpu") -> str:
    """File-name id of the local device: `cpu-<model>-<cores>c` or the GPU's name."""
    if device.startswith("cuda"):
        import torch

        return slug(torch.cuda.get_device_name(0))
    return f"cpu-{slug(cpu_name())}-{os.cpu_count()}c"


def display_path(path) -> str:
    """A path as stored in artefacts: relative to the repository when inside it (so shipped
    artefacts stay valid in any clone), else absolute."""
    p = pathlib.Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def stored_path(text) -> pathlib.Path | None:
    """An artefact's stored path back as a file (relative ones are tried against the
    current directory, then the repository); None when it names no file."""
    if not text:
        return None
    for p in (pathlib.Path(text), REPO / text):
        if p.is_file():
            return p
    return None


def profile_path(device_id: str, model_id: str, dtype: str) -> pathlib.Path:
    """Where `profile` writes, and `search`/`bench`/`demo` look for, a measured profile."""
    return PROFILES / f"{device_id}__{model_id}__{dtype}.json"


def acceptance_path(model_id: str) -> pathlib.Path:
    """Where `accept` writes, and the other verbs look for, a model's acceptance file."""
    return PROFILES / f"{model_id}.acceptance.json"


def prompt_tokens_dir(model_id: str) -> pathlib.Path:
    return PROFILES / f"{model_id}.prompt_tokens"


def tree_path(model_id: str, device: str = "cpu") -> pathlib.Path:
    """The tree `run`/`bench` use by default: the searched one for this device, else the
    shipped hand-made default."""
    searched = PROFILES / f"{device_slug(device)}__{model_id}.tree.json"
    return searched if searched.is_file() else PROFILES / f"default__{model_id}.tree.json"
