"""Argument groups and output helpers shared by the verbs."""
from __future__ import annotations

import sys


def add_model_args(p, tree: bool = True) -> None:
    p.add_argument("--model", help="local HF folder or known name (default: embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    if tree:
        p.add_argument("--tree", help="tree.json (default: the searched tree for this device, "
                       "else the shipped default)")
        p.add_argument("--prompt-tokens", help="prompt-token folder (default: shipped tokens)")


def positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def say(*parts, **kw) -> None:
    """Human output on stderr (stdout is kept for results and --json)."""
    print(*parts, file=sys.stderr, **kw)


def progress(iterable, desc: str, total: int | None = None, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=quiet,
                dynamic_ncols=True, leave=False)
