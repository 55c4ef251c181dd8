"""Prompt sets: JSONL files (MT-Bench `turns`, Alpaca `instruction`, GSM8K `question`,
or `prompt`) and a small built-in set; chat-template encoding."""
from __future__ import annotations

import json
import pathlib

from .errors import BadInput

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


def load(path: str | None, limit: int | None = None, offset: int = 0,
         stride: int = 1) -> list[str]:
    """Prompts from a JSONL file (or the built-in set when path is None): rows offset,
    offset + stride, offset + 2·stride, ... (at most `limit` of them). A stride spreads a
    small sample over a file whose rows are grouped by category, as MT-Bench's are."""
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be ≥ 1, got {limit}")
    if stride < 1:
        raise BadInput(f"--stride must be ≥ 1, got {stride}")
    if offset < 0:
        raise BadInput(f"--offset must be ≥ 0, got {offset}")
    if path is None:
        rows = BUILTIN[offset::stride]
        return rows[:limit] if limit else rows
    p = pathlib.Path(path)
    if not p.is_file():
        raise BadInput(f"prompt file {p}: no such file")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"prompt file {p} line {i}: malformed JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise BadInput(f"prompt file {p} line {i}: expected a JSON object")
        out.append(prompt_text(row, f"prompt file {p} line {i}"))
    out = out[offset::stride]
    if limit:
        out = out[:limit]
    if not out:
        raise BadInput(f"prompt file {p}: no prompts")
    return out


def encode(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids for one user prompt, through the chat template unless raw."""
    if not text or not text.strip():
        raise BadInput("empty prompt")
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])
