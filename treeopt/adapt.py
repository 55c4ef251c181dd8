"""Choosing the configuration while decoding, from what steps cost and take on this
machine now — the profile and the acceptance file chose the tree before the first token,
as a prior; the run's own steps are the evidence.

Per batch size B the engine may step with its tree (the schedule's entry for B) or plainly.
For each (B, configuration) the chooser keeps the last WINDOW steps: seconds and tokens
emitted per sequence. Its estimate of tokens per second per sequence is their ratio of
sums, Σ tokens / Σ seconds, and its spread the relative half-range of the window's middle
half of per-step rates (what a step's noise allows). One rule, for single and batched
decoding alike:

- until both configurations have MIN_SEEN steps at B, the schedule's choice runs, except
  that the other runs every EXPLORE_EARLY-th step;
- then the faster estimate runs, the incumbent kept unless the other beats it by more than
  max(MARGIN, the two spreads' mean);
- every EXPLORE-th step at B runs the configuration not in use, so its cost and yield stay
  measured: at most 2/EXPLORE of the steps (plus 2·MIN_SEEN at the start) explore.

A step right after a plain one runs the tree from its root alone (no guesses were made):
it is counted, but not as the tree's evidence — so exploring the tree from plain runs two
tree steps, the second of which is. A switch happens between steps, so outputs
stay token-identical to plain greedy decoding.
"""
from __future__ import annotations

import dataclasses
from collections import deque

WINDOW = 32  # steps per (B, configuration) in the running estimate
MIN_SEEN = 4  # steps of each configuration before the evidence decides
EXPLORE = 16  # then one step in EXPLORE runs the other configuration
EXPLORE_EARLY = 4
MARGIN = 0.05  # a switch needs the other configuration faster by at least this


@dataclasses.dataclass
class _Seen:
    seconds: deque = dataclasses.field(default_factory=lambda: deque(maxlen=WINDOW))
    tokens: deque = dataclasses.field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, seconds: float, tokens: float) -> None:
        self.seconds.append(seconds)
        self.tokens.append(tokens)

    @property
    def n(self) -> int:
        return len(self.seconds)

    def rate(self) -> float:
        s = sum(self.seconds)
        return sum(self.tokens) / s if s > 0 else 0.0

    def spread(self) -> float:
        rates = sorted(t / s for t, s in zip(self.tokens, self.seconds) if s > 0)
        if len(rates) < 4:
            return 0.0
        q1, q3 = rates[len(rates) // 4], rates[(3 * len(rates)) // 4]
        mid = rates[len(rates) // 2]
        return (q3 - q1) / (2 * mid) if mid > 0 else 0.0


class Chooser:
    """The running evidence and the rule (module docstring). `pick(B)` → "tree" or
    "plain"; `observe(B, name, seconds, tokens_per_sequence)` after the step."""

    def __init__(self, explore: int = EXPLORE, margin: float = MARGIN):
        self.explore, self.margin = explore, margin
        self.seen: dict[tuple[int, str], _Seen] = {}
        self.current: dict[int, str] = {}
        self.steps: dict[int, int] = {}
        self.last: dict[int, str] = {}
        self.explored = self.total = 0
        self.burst: dict[int, int] = {}
        self.switches: list[dict] = []

    def _seen(self, b: int, name: str) -> _Seen:
        return self.seen.setdefault((b, name), _Seen())

    def estimate(self, b: int, name: str) -> dict:
        s = self._seen(b, name)
        return {"steps": s.n, "tokens_per_second": round(s.rate(), 3),
                "spread": round(s.spread(), 4)}

    def pick(self, b: int) -> str:
        if self.burst.get(b):  # the tree's second step when exploring it from plain
            self.burst[b] -= 1
            self.explored += 1
            return "tree"
        cur = self.current.setdefault(b, "tree")
        other = "plain" if cur == "tree" else "tree"
        n = self.steps[b] = self.steps.get(b, 0) + 1
        mine, theirs = self._seen(b, cur), self._seen(b, other)
        if theirs.n < MIN_SEEN:
            every = EXPLORE_EARLY
        else:
            gain = theirs.rate() / mine.rate() - 1 if mine.rate() > 0 else 1.0
            need = max(self.margin, (mine.spread() + theirs.spread()) / 2)
            if mine.n >= MIN_SEEN and gain > need:
                self.switches.append({"batch": b, "step": n, "from": cur, "to": other,
                                      cur: self.estimate(b, cur),
                                      other: self.estimate(b, other),
                                      "why": f"{other} {100 * gain:+.0f}% tokens/s "
                                             f"(needs > {100 * need:.0f}%)"})
                self.current[b] = cur = other
                return cur
            every = self.explore
        if n % every == 0:
            self.explored += 1
            self.burst[b] = 1 if other == "tree" else 0
            return other
        return cur

    def observe(self, b: int, name: str, seconds: float, tokens: float) -> str:
        """Count one step; returns how it is labelled ("tree*": the tree's first step after
        a plain one, not the tree's evidence)."""
        label = "tree*" if name == "tree" and self.last.get(b) == "plain" else name
        self.last[b] = name
        self.total += 1
        if label != "tree*":
            self._seen(b, name).add(seconds, tokens)
        return label

    def summary(self) -> dict:
        """What a run JSON says: the estimates per batch size, the exploring steps and the
        switches with why."""
        sizes = sorted({b for b, _ in self.seen})
        return {"rule": f"window {WINDOW}, explore 1/{self.explore}, margin "
                        f"{100 * self.margin:.0f}%",
                "steps": self.total, "explored": self.explored,
                "by_batch": {str(b): {"using": self.current.get(b, "tree"),
                                      "tree": self.estimate(b, "tree"),
                                      "plain": self.estimate(b, "plain")} for b in sizes},
                "switches": self.switches}
