"""What a decode returns: one sequence's :class:`Result`, a batch's :class:`BatchResult`,
and the one "full steps" rule bench and accept count by."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Result:
    """One decode. `steps` counts forward passes, prefill included; `accepted[i]` is the
    number of tokens decode step i emitted (after any cut by EOS or max_new_tokens);
    `offers[i]` is what step i was offered: (tokens emitted before it, its state, the guess
    rows it started from (m lists of ≥ RECORD_TOPK token ids, best first) or None; a batched step adds how many
    sequences it ran with and its id) — the run's records (:mod:`treeopt.records`)."""

    output_ids: list[int]
    steps: int
    seconds: float
    prefill_seconds: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    # when timed: plan load, step, read-back — the part of a step the profile times
    forward_seconds: list[float] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # input length per step
    finish_reason: str = "length"
    graphs: str | None = None  # how the steps ran: 'cuda graphs', 'eager', 'eager: why'
    # graph captures during this decode and their time (warm-up, capture), kept out of
    # `seconds` and of every step's time
    captures: int = 0
    capture_seconds: float = 0.0
    kernels: str | None = None  # which kernels ran the model: 'stock', 'onednn'
    offers: list[tuple] = dataclasses.field(default_factory=list, repr=False)
    # the cache source's offer (n, chain) at each step, where the decoder had a cache
    cache_offers: list[tuple] = dataclasses.field(default_factory=list, repr=False)
    propose_seconds: float = 0.0  # time spent asking the chain sources (lookup, cache)
    # per step: "tree", "smaller", "chains", "plain", or a tree's name with "*" (its first
    # step after plain or chains alone: no guesses) — the candidate the step ran
    # (treeopt.adapt chooses where the engine adapts)
    configs: list[str] = dataclasses.field(default_factory=list, repr=False)

    @property
    def new_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"new_tokens": self.new_tokens, "steps": self.steps,
                "tokens_per_step": round(self.tokens_per_step, 4),
                "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "prefill_seconds": round(self.prefill_seconds, 4),
                "finish_reason": self.finish_reason,
                **({"graphs": self.graphs} if self.graphs else {}),
                **({"captures": self.captures, "capture_seconds": round(
                    self.capture_seconds, 4)} if self.captures else {}),
                **({"kernels": self.kernels} if self.kernels else {}),
                "output_ids": self.output_ids}


def full_steps(res: Result) -> int:
    """How many of a decode's steps ran in full: all but the last, unless the decode
    stopped at the context limit (a last step that met EOS or max_new_tokens may have
    emitted fewer tokens than it accepted). The one rule bench and accept count by."""
    return max(0, len(res.accepted) - (res.finish_reason != "context"))



def record_step(res: Result, added: int, length: int) -> None:
    """A decode step into its sequence's Result: one forward, `added` tokens emitted, the
    step's input length."""
    res.steps += 1
    res.accepted.append(added)
    res.lengths.append(length)


@dataclasses.dataclass
class BatchResult:
    """One batched decode: per-sequence results (in prompt order) and the batch's decode
    steps (prefill excluded): live sequences, padded input length, seconds and tokens
    emitted over all sequences, per step."""

    results: list[Result]
    seconds: float
    prefill_seconds: float = 0.0
    live: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    step_tokens: list[int] = dataclasses.field(default_factory=list)
    contexts: list[int] = dataclasses.field(default_factory=list)  # cache slots read
    forward_seconds: list[float] = dataclasses.field(default_factory=list)  # when timed
    captures: int = 0  # graph captures in this decode, timed apart (not in `seconds`)
    capture_seconds: float = 0.0
    configs: list[str] = dataclasses.field(default_factory=list)  # per step, as Result's

    @property
    def new_tokens(self) -> int:
        return sum(r.new_tokens for r in self.results)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens per sequence per forward it took part in."""
        return self.new_tokens / max(1, sum(r.steps for r in self.results))
