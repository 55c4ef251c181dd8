"""Batched decoding: B prompts of different lengths at once, on a stock model — the
engine's one loop (:mod:`treeopt.engine.loop`) with a schedule: batch size → tree (or None:
plain decoding). Sequence b owns row b of the one KV store and its slots 0..ctx_b − 1 (a
*ragged* store); a finished sequence leaves and the rows after it move up, so it stops
costing compute; a waiting prompt joins as soon as one finishes (continuous batching).
Which tree a step uses depends on how many sequences are live: the search's per-batch
table (:mod:`treeopt.search`). Greedy: each sequence's output is the base model's greedy
output for its prompt.
"""
from __future__ import annotations

import time

import torch

from . import online
from .device import sync
from .engine import BatchResult, Engine, Result  # noqa: F401 - BatchResult re-exported
from .models import Loaded
from .prompt_tokens import PromptTokens
from .runtime import Decoder
from .sources import SuffixCache
from .tree import Tree, size_for


def schedule_of(tree: Tree | None) -> dict[int, Tree | None]:
    """The tree's per-batch table (batch size → tree, None = plain), or the one tree for
    every batch size."""
    if tree is None:
        return {1: None}
    return dict(tree.by_batch) if tree.by_batch else {1: tree}


class BatchDecoder:
    """A loaded model with a schedule: batch size → tree or None (plain decoding)."""

    def __init__(self, loaded: Loaded, prompt_tokens: PromptTokens | None,
                 schedule: dict[int, Tree | None], cache: SuffixCache | None = None,
                 **engine_options):
        self.lm, self.model = loaded, loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.cache_source = cache
        trees = [t for t in schedule.values() if t is not None]
        # each entry checked as a decoder would check it (prompt tokens, ranks, lengths)
        self.schedule = {b: Decoder(loaded, prompt_tokens if t else None, t, cache)
                         for b, t in sorted(schedule.items())}
        self.engine = Engine(loaded, prompt_tokens if trees else None, schedule, cache,
                             **engine_options)
        online.attach(self.engine)
        self.lookup = self.engine.lookup  # the schedule's prompt-lookup policy (records)

    def pick(self, live: int) -> Decoder:
        """The configuration for `live` sequences (:func:`treeopt.tree.size_for`)."""
        return self.schedule[size_for(self.schedule, live)]

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 128,
                 max_batch: int | None = None, timed: bool = False,
                 learn: bool = True) -> BatchResult:
        """Greedy-decode every prompt; each result equals the unbatched greedy output
        (:meth:`treeopt.engine.Engine.generate`)."""
        limits = max_new_tokens if isinstance(max_new_tokens, list) else \
            [max_new_tokens] * len(prompts)
        for ids, lim in zip(prompts, limits):
            self.schedule[min(self.schedule)].check_prompt(ids, lim)
        return self.engine.generate(prompts, max_new_tokens, max_batch, timed, learn)


@torch.inference_mode()
def hf_generate_batch(dec: Decoder, prompts: list[list[int]], max_new_tokens: int
                      ) -> BatchResult:
    """HF `generate(do_sample=False)` on the batch, left-padded (the peer baseline)."""
    eos, pad = dec.eos_and_pad()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dec.device)
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                       device=dec.device)
    sync(dec.device)
    t0 = time.perf_counter()
    seq = dec.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
    sync(dec.device)
    seconds = time.perf_counter() - t0
    results = []
    for row in seq[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in dec.eos), len(row))
        results.append(Result(row[:cut], cut, seconds, 0.0))
    return BatchResult(results, seconds)
