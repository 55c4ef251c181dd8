"""Argument types and groups shared by the verbs; human output on stdout, warnings on
stderr."""
from __future__ import annotations

import argparse
import math
import re
import sys

from ..bounds import BOUNDS
from ..inputs import foreign_notes
from ..sources import CACHE_TOKENS


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_in(lo: int, hi: int):
    """A type for an integer in lo..hi."""
    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}")
        return v
    return parse


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {v}")
    return v


def seed_int(text: str) -> int:
    v = _int(text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {text}")
    return v


def finite_float(lo: float | None = None, hi: float | None = None, open_lo: bool = False):
    """A type for a finite float in [lo, hi] (or (lo, hi] with open_lo)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if lo is not None and (v <= lo if open_lo else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_lo else '≥'} {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be ≤ {hi}, got {v}")
        return v
    return parse


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu or cuda[:N]")
    return text


def int_list(text: str, hi: int = 2**31 - 1) -> list[int]:
    """A comma list of integers in 1..hi, sorted, without repeats."""
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a comma list of integers") \
            from None
    if not vals or vals[0] < 1 or vals[-1] > hi:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: values must be integers in 1..{hi}")
    return vals


def bounded_list(name: str):
    """A type for a comma list of integers in 1..BOUNDS[name] (bounds.py)."""
    return lambda text: int_list(text, BOUNDS[name])


def bounded_int(name: str):
    """A type for an integer in 1..BOUNDS[name] (bounds.py)."""
    return int_in(1, BOUNDS[name])


def add_batch_arg(p, help: str) -> None:
    """--batch B,.. (batch sizes within their bound), as profile, search and bench take it."""
    p.add_argument("--batch", type=bounded_list("batch"), metavar="B,..", help=help)


def add_adapt_arg(p) -> None:
    """--no-adapt: decode with the chosen configuration throughout (run, bench)."""
    p.add_argument("--no-adapt", action="store_true",
                   help="keep the chosen tree for every step; by default the runtime measures "
                   "what tree and plain steps cost and yield on this machine now and steps "
                   "with the faster (a bounded share of steps explores the other; "
                   "treeopt/adapt.py)")


def add_acceptance_arg(p, help: str) -> None:
    """--acceptance FILE, repeatable: acceptance files and run JSONs, pooled."""
    p.add_argument("--acceptance", action="append", metavar="FILE",
                   help="acceptance file, or a run JSON of `run`/`bench` (its recorded steps); "
                   "repeat it to pool several, each recorded position counting once; " + help)


def add_cache_args(p) -> None:
    """--corpus FILE|none and --cache-tokens N: the cache source's corpus and size."""
    p.add_argument("--corpus", metavar="FILE",
                   help="corpus for the cache source (`treeopt corpus`; default: yours, else "
                   "the shipped one; 'none': start empty)")
    p.add_argument("--cache-tokens", type=bounded_int("cache_tokens"), default=CACHE_TOKENS,
                   metavar="N", help="the cache holds at most N tokens: the corpus, then "
                   f"each answer; the oldest leave first (default {CACHE_TOKENS})")


def add_model_args(p, tree: bool = True) -> None:
    p.add_argument("--model", help="local HF folder or known name (default: embedded "
                   "SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32")
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (default: all cores)")
    if tree:
        p.add_argument("--tree", help="tree.json (default: your searched tree for this device, "
                       "else the shipped one, else the shipped default)")
    p.add_argument("--prompt-tokens", help="prompt-token folder (default: yours, else the "
                   "shipped tokens)")


def add_prompt_args(p, flag: str = "prompts", default_help: str = "built-in set",
                    repeat: str = "") -> None:
    """--prompts NAME|FILE with --limit/--offset/--stride (under a prefix for `check-`);
    `repeat` (its help text) makes --prompts repeatable."""
    pre = "" if flag == "prompts" else flag.split("-")[0] + "-"
    p.add_argument(f"--{flag}", action="append" if repeat else "store",
                   help="a shipped set (mt-bench, vicuna-bench, alpaca-seed, "
                   f"gsm8k-train, input-grounded) or a JSONL file (default: {default_help})"
                   + (f"; {repeat}" if repeat else ""))
    p.add_argument(f"--{pre}limit", type=positive_int, help="at most N prompts")
    p.add_argument(f"--{pre}offset", type=nonneg_int, default=0, help="skip the first N prompts")
    p.add_argument(f"--{pre}stride", type=positive_int, default=1,
                   help="take every N-th prompt (spreads a sample over a file's categories)")


def say(*parts, **kw) -> None:
    """Human output (the verbs call it only without --json, whose one object owns
    stdout)."""
    print(*parts, **kw)
    sys.stdout.flush()


def warn(*parts, **kw) -> None:
    """A warning or note: on stderr, with or without --json."""
    print(*parts, file=sys.stderr, **kw)


def decode_notes(inp, info: dict, args) -> list[str]:
    """The lines a decoding verb says on stderr (with --json too) once its inputs are all
    good: inputs made for another device or dtype, plain decoding chosen by the tree, an
    acceptance file sampled for a bounded replay."""
    notes = foreign_notes(inp, args.device, args.dtype, args.model)
    if info.get("plain"):
        notes.append(f"note: decoding plainly, one token a step: the tree {info['tree']} says "
                     "no tree pays for one sequence on this device")
    return notes + ([inp.acceptance_note] if inp.acceptance_note else [])


def model_flag(model: str | None) -> str:
    """The --model part of a suggested command."""
    return f" --model {model}" if model else ""
