"""Prompt sets: the shipped sets by name (``treeopt/data``), JSONL files (MT-Bench
`turns`, Alpaca `instruction`, GSM8K `question`, or `prompt`; `.gz` too) and a small
built-in set; chat-template encoding."""
from __future__ import annotations

import json
import pathlib
import re
import zlib

from .artefact import input_file, note_input
from .bounds import BOUNDS
from .errors import BadInput, shown

DATA = pathlib.Path(__file__).resolve().parent / "data"
# --prompts NAME: the shipped sets (source and license in treeopt/data/README.md)
SLICE = re.compile(r"^(?P<name>.+?)(?P<bracket>\[(?P<start>[0-9]*):(?P<stop>[0-9]*)\])?$",
                   re.DOTALL)
SETS = {"mt-bench": "mt-bench.jsonl", "vicuna-bench": "vicuna-bench.jsonl",
        "alpaca-seed": "alpaca-seed.jsonl", "gsm8k-train": "gsm8k-train.jsonl.gz",
        "input-grounded": "input-grounded.jsonl"}

FIELDS = ("turns", "instruction", "question", "prompt")

# A small built-in set (our own wording) so bench and demo need no files.
BUILTIN = [
    "Explain why the sky is blue in a short paragraph.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Describe the water cycle for a ten-year-old.",
    "Summarize the plot of Romeo and Juliet in four sentences.",
    "List five countries in Europe and their capitals.",
    "How do I make a cup of green tea?",
]


def prompt_text(row: dict, where: str) -> str:
    for field in FIELDS:
        if field in row:
            value = row[field]
            if field == "turns":
                if not isinstance(value, list) or not value:
                    raise BadInput(f"{where}: 'turns' must be a non-empty list")
                value = value[0]
            if not isinstance(value, str):
                raise BadInput(f"{where}: field {field!r} is not a string")
            return value
    raise BadInput(f"{where}: no prompt field (one of {', '.join(FIELDS)})")


def jsonl_rows(text: str, where: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL text."""
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BadInput(f"{where} line {i}: malformed JSON") from e
        if not isinstance(row, dict):
            raise BadInput(f"{where} line {i}: expected a JSON object")
        rows.append((i, row))
    return rows


def split_slice(spec: str) -> tuple[str, int, int | None]:
    """NAME[START:STOP] → (name, start, stop): rows START..STOP − 1 of a set or file; a
    name without brackets (or a file that exists under the full name) is all of it."""
    m = SLICE.match(spec)
    if m is None or not m["bracket"] or _is_file(spec):
        return spec, 0, None
    start, stop = (_row(spec, m["start"]) if m["start"] else 0,
                   _row(spec, m["stop"]) if m["stop"] else None)
    if stop is not None and stop <= start:
        raise BadInput(f"--prompts {spec}: empty slice")
    return m["name"], start, stop


def _row(spec: str, digits: str) -> int:
    """A slice bound as a row number within BOUNDS["prompt_rows"] (checked on its digits
    first: Python refuses to convert thousands of them)."""
    hi, digits = BOUNDS["prompt_rows"], digits.lstrip("0") or "0"
    if len(digits) > len(str(hi)) or int(digits) > hi:
        raise BadInput(f"--prompts {shown(spec, 80)}: row {shown(digits, 20)} is past "
                       f"{hi}, the most rows a prompt set may have")
    return int(digits)


def _is_file(name: str) -> bool:
    try:
        return pathlib.Path(name).is_file()
    except (OSError, ValueError):
        return False


def load(path: str | None, limit: int | None = None, offset: int = 0,
         stride: int = 1) -> list[str]:
    """Prompts from a JSONL file (or the built-in set when path is None): rows offset,
    offset + stride, offset + 2·stride, ... (at most `limit` of them). A stride spreads a
    small sample over a file whose rows are grouped by category, as MT-Bench's are.
    `path` may name a slice, NAME[START:STOP] (:func:`split_slice`): rows START..STOP − 1
    first, then offset, stride and limit within them."""
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be ≥ 1, got {limit}")
    if stride < 1:
        raise BadInput(f"--stride must be ≥ 1, got {stride}")
    if offset < 0:
        raise BadInput(f"--offset must be ≥ 0, got {offset}")
    start, stop = 0, None
    if path is not None:
        path, start, stop = split_slice(path)
    if path is None:
        rows, where = list(BUILTIN), "the built-in prompt set"
    else:
        p = resolve(path)
        where = f"prompt file {p}"
        rows = [prompt_text(row, f"{where} line {i}")
                for i, row in jsonl_rows(read_text(p), where)]
    total, rows = len(rows), rows[start:stop]
    if not rows:
        raise BadInput(f"{where}: no rows in slice [{start}:{'' if stop is None else stop}] "
                       f"(it has {total})")
    out = rows[offset::stride][:limit]
    if not out:
        raise BadInput(f"{where}: no prompts at --offset {offset} (it has {len(rows)})")
    return out


def family_name(name: str | None) -> str:
    """A prompt set's short name: the shipped set's name, a file's stem, or "built-in"."""
    if name is None:
        return "built-in"
    name = split_slice(name)[0]
    if name in SETS:
        return name
    return pathlib.Path(name).name.removesuffix(".gz").removesuffix(".jsonl")


def resolve(name: str) -> pathlib.Path:
    """A shipped set's file for its name, else the path itself (which must exist); a
    slice's (:func:`split_slice`) likewise."""
    name = split_slice(name)[0]
    if name in SETS:
        return DATA / SETS[name]
    p = pathlib.Path(name)
    try:
        there = p.exists()
    except OSError:  # a name the file system refuses: input_file says so
        there = True
    if not there:
        raise BadInput(f"prompt file {shown(name, 120)}: no such file (shipped sets: "
                       f"{', '.join(SETS)})")
    return input_file(p, "prompt file")


def read_text(p: pathlib.Path) -> str:
    """A prompt file's text (gzip when it ends in .gz), at most BOUNDS["prompt_bytes"]
    bytes after decompression; unreadable, corrupt, too large or non-UTF-8 → BadInput."""
    limit = BOUNDS["prompt_bytes"]
    note_input(p)
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
        if p.suffix == ".gz":  # streamed: a small bomb never inflates past the bound
            z = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            raw = z.decompress(raw, limit + 1)
            if len(raw) <= limit and not z.eof:
                raise BadInput(f"prompt file {p}: truncated gzip data")
    except OSError as e:
        raise BadInput(f"prompt file {p}: cannot read ({e.strerror or e})") from e
    except zlib.error as e:
        raise BadInput(f"prompt file {p}: corrupt gzip data ({e})") from e
    if len(raw) > limit:
        raise BadInput(f"prompt file {p}: more than {limit >> 20} MiB of text (the bound)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"prompt file {p}: not UTF-8 text (byte {e.start})") from e


PIECE = 1 << 16  # characters tokenized at once


def tokenize(tokenizer, text: str, limit: int, where: str) -> list[int]:
    """A document's ids, tokenized in pieces of about PIECE characters cut before a space
    or after a newline (a fast tokenizer given tens of MB at once can exhaust memory);
    more than `limit` tokens → BadInput, before the rest is tokenized."""
    ids, at = [], 0
    while at < len(text):
        end = min(at + PIECE, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", at, end) + 1, text.rfind(" ", at, end))
            end = cut if cut > at else end
        ids += tokenizer(text[at:end], add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            raise BadInput(f"{where}: more than {limit} tokens (the bound on corpus tokens)")
        at = end
    return ids


def encode(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids for one user prompt, through the chat template unless raw."""
    if not text or not text.strip():
        raise BadInput("empty prompt")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(f"prompt is not valid UTF-8 text (position {e.start})") from e
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])
