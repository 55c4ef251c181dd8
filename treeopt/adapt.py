"""Choosing the configuration while decoding, from what steps cost and take on this
machine now — the profile and the acceptance file chose the tree before the first token,
as a prior; the run's own steps are the evidence.

Per batch size B the engine offers a few candidates: its tree (the schedule's entry for
B), a smaller tree where the schedule holds one (the tree it chose for a larger batch
size: the best at a smaller input-length cap), the tree's chains alone where it has chains
(prompt lookup and the cache without guesses), and plain decoding. For each
(B, candidate) the chooser keeps the last WINDOW steps: seconds and tokens emitted per
sequence. Its estimate of tokens per second per sequence is their ratio of sums,
Σ tokens / Σ seconds, and its spread the relative half-range of the window's middle half
of per-step rates (what a step's noise allows). One rule, for single and batched decoding
alike:

- until every candidate has MIN_SEEN steps at B, the schedule's choice runs, except that
  every EXPLORE_EARLY-th step runs the least-seen other one;
- then the fastest estimate runs, the incumbent kept unless another beats it by more than
  max(MARGIN, the two spreads' mean);
- every EXPLORE-th step at B runs a candidate not in use (the others in turn), so their
  costs and yields stay measured: at most 2/EXPLORE of the steps (plus 2·MIN_SEEN per
  candidate at the start) explore, however many candidates there are.

A step right after a plain one runs a tree from its root alone (no guesses were made):
it is counted, but not as that tree's evidence — so exploring a tree from plain runs two
tree steps, the second of which is. A switch happens between steps, so outputs stay
token-identical to plain greedy decoding.
"""
from __future__ import annotations

import dataclasses
from collections import deque

WINDOW = 32  # steps per (B, configuration) in the running estimate
MIN_SEEN = 4  # steps of each configuration before the evidence decides
EXPLORE = 16  # then one step in EXPLORE runs a candidate not in use
EXPLORE_EARLY = 4
MARGIN = 0.05  # a switch needs another candidate faster by at least this
PLAIN = "plain"


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
    """The running evidence and the rule (module docstring). `pick(B, names)` → one of
    `names` (the candidates at B, the schedule's choice first); `observe(B, name, seconds,
    tokens_per_sequence)` after the step."""

    def __init__(self, explore: int = EXPLORE, margin: float = MARGIN):
        self.explore, self.margin = explore, margin
        self.seen: dict[tuple[int, str], _Seen] = {}
        self.names: dict[int, tuple[str, ...]] = {}
        self.current: dict[int, str] = {}
        self.steps: dict[int, int] = {}
        self.last: dict[int, str] = {}
        self.explored = self.total = 0
        self.burst: dict[int, str] = {}
        self.switches: list[dict] = []

    def _seen(self, b: int, name: str) -> _Seen:
        return self.seen.setdefault((b, name), _Seen())

    def estimate(self, b: int, name: str) -> dict:
        s = self._seen(b, name)
        return {"steps": s.n, "tokens_per_second": round(s.rate(), 3),
                "spread": round(s.spread(), 4)}

    def pick(self, b: int, names: tuple[str, ...] = ("tree", PLAIN)) -> str:
        self.names[b] = names
        if b in self.burst:  # a tree's second step when exploring it from plain
            self.explored += 1
            return self.burst.pop(b)
        cur = self.current.get(b)
        cur = self.current[b] = cur if cur in names else names[0]
        n = self.steps[b] = self.steps.get(b, 0) + 1
        others = [x for x in names if x != cur]
        if not others:
            return cur
        mine = self._seen(b, cur)
        unseen = [x for x in others if self._seen(b, x).n < MIN_SEEN]
        if unseen:
            every, target = EXPLORE_EARLY, min(unseen, key=lambda x: self._seen(b, x).n)
        else:
            best = max(others, key=lambda x: self._seen(b, x).rate())
            theirs = self._seen(b, best)
            gain = theirs.rate() / mine.rate() - 1 if mine.rate() > 0 else 1.0
            need = max(self.margin, (mine.spread() + theirs.spread()) / 2)
            if mine.n >= MIN_SEEN and gain > need:
                self.switches.append({"batch": b, "step": n, "from": cur, "to": best,
                                      cur: self.estimate(b, cur),
                                      best: self.estimate(b, best),
                                      "why": f"{best} {100 * gain:+.0f}% tokens/s "
                                             f"(needs > {100 * need:.0f}%)"})
                self.current[b] = best
                return best
            every = self.explore  # the others in turn
            target = others[(n // every) % len(others)]
        if n % every == 0:
            self.explored += 1
            if cur == PLAIN and target != PLAIN:
                self.burst[b] = target
            return target
        return cur

    def observe(self, b: int, name: str, seconds: float, tokens: float) -> str:
        """Count one step; returns how it is labelled ("tree*": a tree's first step after
        a plain one, not that tree's evidence)."""
        star = name != PLAIN and self.last.get(b) == PLAIN
        self.last[b] = name
        self.total += 1
        if not star:
            self._seen(b, name).add(seconds, tokens)
        return name + "*" if star else name

    def summary(self) -> dict:
        """What a run JSON says: the estimates per batch size and candidate, the exploring
        steps and the switches with why."""
        return {"rule": f"window {WINDOW}, explore 1/{self.explore}, margin "
                        f"{100 * self.margin:.0f}%",
                "steps": self.total, "explored": self.explored,
                "by_batch": {str(b): {"using": self.current.get(b, names[0]),
                                      **{x: self.estimate(b, x) for x in names}}
                             for b, names in sorted(self.names.items())},
                "switches": self.switches}
