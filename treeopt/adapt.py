"""Choosing the configuration while decoding, from what steps cost and take on this
machine now — the profile and the acceptance file chose the tree before the first token,
as a prior; the run's own steps are the evidence.

Per batch size B the engine offers a few candidates: its tree (the schedule's entry for
B), a smaller tree where the schedule holds one (the tree it chose for a larger batch
size: the best at a smaller input-length cap), the tree's chains alone where it has chains
(prompt lookup and the cache without guesses), and plain decoding. For each
(B, candidate) the chooser keeps the last WINDOW steps: seconds and tokens emitted per
sequence. Its estimate of tokens per second per sequence is their ratio of sums,
Σ tokens / Σ seconds, and its spread the per-step rates' relative standard deviation
(what a step's noise allows). One rule, for single and batched decoding
alike:

- until every candidate has MIN_SEEN steps at B, the schedule's choice runs, except that
  every EXPLORE_EARLY-th step runs the least-seen other one (plain first among equals);
- a candidate is judged *paired*: its exploring steps against the incumbent's step right
  before each (the same stretch of text and load — windows of different stretches would
  compare texts, not candidates; the step after starts from the explored one's guesses);
  the incumbent is kept unless a candidate's paired tokens/s beat it by more than
  max(MARGIN, twice the gain's noise: each side's per-step spread over the root of the
  pairs); after a switch the old incumbent keeps the same pairs, turned, and the others
  start again;
- every EXPLORE-th step at B runs a candidate not in use (the others in turn; one slower
  than the incumbent by more than FAR only every FAR_EVERY-th time), so their costs and
  yields stay measured: at most 2/EXPLORE of the steps (plus 2·MIN_SEEN per candidate at
  the start) explore, however many candidates there are, and a clear loser costs a
  quarter of that.

A tree step right after a plain one or one of chains alone runs from its root alone (no
guesses were made): it is counted, but not as that tree's evidence — so exploring a tree
from those runs two tree steps, the second of which is. A switch happens between steps,
so outputs stay token-identical to plain greedy decoding.

Beside the evidence, a model (:mod:`treeopt.online`, where the engine has one): every
MODEL_EVERY steps at B (more where its host work would take over MODEL_SHARE of them),
each candidate's tokens/s from the recent steps' records (the acceptance of this text,
replayed for each candidate) at the step costs measured at B — t_B(L), the median seconds
of the last WINDOW steps at each input length L, interpolated between the lengths run and
extended beyond them (:meth:`Chooser.latency`). Both candidates of a comparison are read
on the same records (tens to hundreds of steps), so the model's gain has far less noise
than a few explored steps' yields: the costs' and, as a bound, the incumbent's per-step
spread over the root of the records. It acts twice: a candidate the model puts beyond FAR
below the incumbent counts as a clear loser for exploring; and a switch also happens where
the model's gain beats max(MARGIN, twice its noise), the candidate has MIN_SEEN pairs (its
costs measured), they are not against it beyond their own noise and its own window of
steps is not slower than the incumbent's beyond MARGIN (a model read on one stretch of
text must not overrule what the steps measured on others) — sooner than the pairs alone.
To plain or chains alone it needs FAR at least: their steps leave no guess rows, so the
records that would take it back stop coming (the model falls silent, and only the pairs,
slower, can return). The pairs, the weaker evidence where both speak, switch against the
model (it puts the candidate below the incumbent beyond its noise) only with twice the
gain they need; where they undo a model's switch so, the model switches to that candidate
at that B no more.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
import numpy as np

from .latency import Latency

WINDOW = 32  # steps per (B, configuration) in the running estimate
MIN_SEEN = 2  # paired steps of each candidate before the evidence decides (and the noise)
EXPLORE = 16  # then one step in EXPLORE runs a candidate not in use
EXPLORE_EARLY = 4
MARGIN = 0.05  # a switch needs another candidate faster by at least this
FAR = 0.2  # a candidate this much slower than the incumbent is explored FAR_EVERY x less
FAR_EVERY = 4
MODEL_EVERY = 8  # steps at B between the model's estimates, at least
MODEL_SHARE = 0.01  # the most of the decode's time the model's host work may take
PLAIN, CHAINS = "plain", "chains"
# the candidates whose steps leave no guesses: a tree step right after one runs its root
# alone (set apart, as a tree's first step after plain)
NO_GUESSES = (PLAIN, CHAINS)


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
        """The per-step rates' relative standard deviation (std / mean): a step's noise,
        heavy tails included (a tree's steps yield one token mostly, four at times);
        1.0 (unknown, as wide as the rate itself) below 4 steps."""
        rates = [t / s for t, s in zip(self.tokens, self.seconds) if s > 0]
        if len(rates) < 4:
            return 1.0
        mean = float(np.mean(rates))
        return float(np.std(rates, ddof=1)) / mean if mean > 0 else 0.0


@dataclasses.dataclass
class _Pair:
    """A candidate's exploring steps beside the incumbent's step right before each: both
    read the same stretch of text and load. (Not the step after: it starts from the
    explored candidate's guesses — none after plain or chains alone, fewer after a smaller
    tree — and would count the switch's cost against the incumbent.)"""
    other: _Seen = dataclasses.field(default_factory=_Seen)
    mine: _Seen = dataclasses.field(default_factory=_Seen)

    def gain(self) -> float:
        return self.other.rate() / self.mine.rate() - 1 if self.mine.rate() > 0 else 0.0

    def need(self, margin: float, other: _Seen, mine: _Seen) -> float:
        """What the gain must beat: MARGIN, or twice its noise — each side's per-step
        spread (read on its whole window `other`, `mine`: a handful of pairs tells little
        of its own spread) over the root of the pairs (a few steps of a heavy-tailed
        candidate, such as chains on text that repeats, prove little)."""
        n = self.other.n
        noise = (other.spread() ** 2 + mine.spread() ** 2) / n if n else 1.0
        return max(margin, 2 * noise ** 0.5)


class Chooser:
    """The running evidence and the rule (module docstring). `pick(B, names)` → one of
    `names` (the candidates at B, the schedule's choice first); `observe(B, name, seconds,
    tokens_per_sequence)` after the step."""

    def __init__(self, explore: int = EXPLORE, margin: float = MARGIN):
        self.explore, self.margin = explore, margin
        self.seen: dict[tuple[int, str], _Seen] = {}
        self.pairs: dict[tuple[int, str], _Pair] = {}  # against the incumbent at B
        self.names: dict[int, tuple[str, ...]] = {}
        self.current: dict[int, str] = {}
        self.steps: dict[int, int] = {}
        self.last: dict[int, str] = {}
        self.before: dict[int, tuple[float, float]] = {}  # the incumbent's last step
        self.explored = self.total = 0
        self.burst: dict[int, str] = {}
        self.switches: list[dict] = []
        self.cost: dict[tuple[int, int], deque] = {}  # (B, input length) → step seconds
        self.modelled: dict[int, dict[str, float | None]] = {}  # B → the model's rates
        self.acceptance: dict | None = None  # the model's last running acceptance
        self.records: dict[int, int] = {}  # B → how many records the model read
        self.model_seconds = 0.0  # the model's last call, host time
        self.step_seconds: dict[int, float] = {}  # B → running mean of a step's seconds
        self.by_model: dict[int, str | None] = {}  # B → the candidate the model switched to
        self.distrust: set[tuple[int, str]] = set()  # model switches the pairs undid

    def _seen(self, b: int, name: str) -> _Seen:
        return self.seen.setdefault((b, name), _Seen())

    def _pair(self, b: int, name: str) -> _Pair:
        return self.pairs.setdefault((b, name), _Pair())

    def estimate(self, b: int, name: str) -> dict:
        s = self._seen(b, name)
        out = {"steps": s.n, "tokens_per_second": round(s.rate(), 3),
               "spread": round(s.spread(), 4)}
        modelled = self.modelled.get(b, {}).get(name)
        if modelled is not None:
            out["modelled_tokens_per_second"] = round(modelled, 3)
        pair = self.pairs.get((b, name))
        if pair is not None and name != self.current.get(b) and pair.other.n:
            out["vs_incumbent"] = round(pair.gain(), 4)  # paired: the same text and load
        return out

    def pick(self, b: int, names: tuple[str, ...] = ("tree", PLAIN)) -> str:
        self.names[b] = names
        if b in self.burst:  # a tree's second step when exploring it from no guesses
            self.explored += 1
            return self.burst.pop(b)
        cur = self.current.get(b)
        if cur not in names:
            cur = self.current[b] = names[0]
        n = self.steps[b] = self.steps.get(b, 0) + 1
        others = [x for x in names if x != cur]
        if not others:
            return cur
        unseen = [x for x in others if self._pair(b, x).other.n < MIN_SEEN]
        if unseen:
            # plain first: its cost at L = 1 is what the model needs beside the tree's
            every, target = EXPLORE_EARLY, min(
                unseen, key=lambda x: (self._pair(b, x).other.n, x != PLAIN))
        else:
            best = max(others, key=lambda x: self._pair(b, x).gain())
            pair = self._pair(b, best)
            gain = pair.gain()
            need = pair.need(self.margin, self._seen(b, best), self._seen(b, cur))
            if self._seen(b, cur).n >= MIN_SEEN and gain > need and \
                    (gain > 2 * need or not self._model_against(b, cur, best)):
                return self._switch(b, n, cur, best, gain, need)
            won = self._model_win(b, cur, others)
            if won is not None:
                return self._switch(b, n, cur, *won, by="the model")
            every = self.explore
            if n % every == 0:
                target = self._due(b, others, n // every)
                if target is None:
                    return cur
        if n % every == 0:
            self.explored += 1
            if cur in NO_GUESSES and target not in NO_GUESSES:
                self.burst[b] = target
            return target
        return cur

    def model_gain(self, b: int, cur: str, name: str) -> float | None:
        """The model's gain of `name` over `cur` at b (None: no model of both)."""
        m = self.modelled.get(b) or {}
        if not m.get(cur) or m.get(name) is None:
            return None
        return m[name] / m[cur] - 1

    def _model_need(self, b: int) -> float:
        """What the model's gain must beat: MARGIN, or twice its noise — the step costs'
        (:meth:`cost_noise`) and the yields', the incumbent's per-step spread over the
        root of the records (both candidates are read on the same ones: a bound)."""
        cur = self.current.get(b)
        yields = self._seen(b, cur).spread() ** 2 / max(1, self.records.get(b, 0))
        return max(self.margin, 2 * (self.cost_noise(b) ** 2 + yields) ** 0.5)

    def _model_against(self, b: int, cur: str, x: str) -> bool:
        """The model puts `x` below `cur` beyond its noise (and the pairs never undid
        its switch to `x`)."""
        g = self.model_gain(b, cur, x)
        return g is not None and (b, x) not in self.distrust and g < -self._model_need(b)

    def _model_win(self, b: int, cur: str, others: list[str]) -> tuple | None:
        """(candidate, gain, need) the model switches to, or None: its gain beyond
        :meth:`_model_need`, the candidate run MIN_SEEN times beside the incumbent (its
        costs measured), and neither its pairs (beyond their noise) nor its own window
        (beyond MARGIN) against it: a model the run's steps contradict is not followed."""
        def against(x: str) -> bool:  # its pairs beyond their noise, or its own steps
            pair, mine, other = self._pair(b, x), self._seen(b, cur), self._seen(b, x)
            return pair.gain() < -pair.need(self.margin, other, mine) or \
                other.rate() < mine.rate() * (1 - self.margin)

        gains = [(g, x) for x in others if (g := self.model_gain(b, cur, x)) is not None
                 and self._pair(b, x).other.n >= MIN_SEEN and not against(x)
                 and (b, x) not in self.distrust]
        if not gains:
            return None
        gain, best = max(gains)
        need = max(FAR, self._model_need(b)) if best in NO_GUESSES else self._model_need(b)
        return (best, gain, need) if gain > need else None

    def _switch(self, b: int, n: int, cur: str, best: str, gain: float, need: float,
                by: str = "") -> str:
        how = " by the model of the recent steps, its pairs not against" if by else \
            f" beside {cur}'s steps"
        if not by and self.by_model.get(b) == cur:  # the pairs undo the model's switch
            self.distrust.add((b, cur))
        self.by_model[b] = best if by else None
        self.switches.append({"batch": b, "step": n, "from": cur, "to": best,
                              cur: self.estimate(b, cur), best: self.estimate(b, best),
                              "why": f"{best} {100 * gain:+.0f}% tokens/s{how} "
                                     f"(needs > {100 * need:.0f}%)"})
        self.current[b] = best
        won = self.pairs.pop((b, best))
        for x in self.names[b]:  # the others' pairs were against the old incumbent
            self.pairs.pop((b, x), None)
        self.pairs[(b, cur)] = _Pair(other=won.mine, mine=won.other)  # the same pairs, turned
        self.before.pop(b, None)
        return best

    def _due(self, b: int, others: list[str], slot: int) -> str | None:
        """The candidate an exploring slot runs: the others in turn, those slower than the
        incumbent by more than FAR only every FAR_EVERY-th slot (a clear loser stays
        measured at a quarter of the cost); None: this slot explores nothing."""
        far = [x for x in others if self._pair(b, x).gain() < -FAR or
               (self.model_gain(b, self.current[b], x) or 0.0) < -FAR]
        near = [x for x in others if x not in far]
        if far and slot % FAR_EVERY == 0:
            return far[(slot // FAR_EVERY) % len(far)]
        return near[slot % len(near)] if near else None

    def observe(self, b: int, name: str, seconds: float, tokens: float,
                length: int | None = None) -> str:
        """Count one step (`length`: the input length it ran, for the step costs);
        returns how it is labelled ("tree*": a tree's first step after a step that left
        no guesses (plain, chains alone), not that tree's evidence)."""
        if length is not None:  # every step's cost counts, a tree's first ones too
            self.cost.setdefault((b, length), deque(maxlen=WINDOW)).append(seconds)
        last = self.step_seconds.get(b, seconds)
        self.step_seconds[b] = last + (seconds - last) / 8  # a running mean of the steps
        star = name not in NO_GUESSES and self.last.get(b) in NO_GUESSES
        self.last[b] = name
        self.total += 1
        if star:
            return name + "*"
        self._seen(b, name).add(seconds, tokens)
        if name == self.current.get(b, name):  # the incumbent: the pair's other half
            self.before[b] = (seconds, tokens)
        elif b in self.before:  # an exploring step, paired with the incumbent's last one
            pair = self._pair(b, name)
            pair.other.add(seconds, tokens)
            pair.mine.add(*self.before.pop(b))
        return name

    def model_every(self, b: int) -> int:
        """Steps at b between the model's estimates: MODEL_EVERY, or more where its last
        call took more than MODEL_SHARE of that many steps (a GPU's steps are short, the
        model's host work is not)."""
        step = self.step_seconds.get(b)
        if not self.model_seconds or not step:
            return MODEL_EVERY
        return max(MODEL_EVERY, math.ceil(self.model_seconds / (MODEL_SHARE * step)))

    def model_due(self, b: int) -> bool:
        return self.steps.get(b, 0) % self.model_every(b) == 0

    def _costs(self, b: int, least: int = MIN_SEEN) -> list[tuple[int, float, float]]:
        """(L, median seconds, relative standard error) per input length run at b with
        `least` steps or more (the error 1.0 below two)."""
        out = []
        for (bb, L), sec in sorted(self.cost.items()):
            if bb == b and len(sec) >= least:
                x = np.asarray(sec)
                err = float(x.std(ddof=1) / x.mean() / np.sqrt(len(x))) if len(x) > 1 else 1.0
                out.append((L, float(np.median(x)), err))
        return out

    def latency(self, b: int) -> Latency | None:
        """t_B(L) measured in this run: the median step seconds at each input length run,
        read as a profile's points at one context (:class:`treeopt.latency.Latency`:
        monotone in L, interpolated, extended beyond the longest with the last slope — a
        chain longer than any step yet costs more, not the same); None before two lengths
        have MIN_SEEN steps each."""
        if len(self._costs(b)) < 2:
            return None
        points = [{"batch": b, "context": 0, "size": L, "median_s": t}
                  for L, t, _ in self._costs(b, least=1)]
        return Latency({"points": points}, with_overhead=False, batch=b)

    def cost_noise(self, b: int) -> float:
        """The step costs' noise at b: √2 × the largest relative standard error of a
        length's median (two lengths' costs enter a comparison)."""
        return float(np.sqrt(2) * max((e for _, _, e in self._costs(b)), default=1.0))

    def summary(self) -> dict:
        """What a run JSON says: the estimates per batch size and candidate, the exploring
        steps and the switches with why."""
        return {"rule": f"window {WINDOW}, explore 1/{self.explore}, margin "
                        f"{100 * self.margin:.0f}%, paired with the incumbent's neighbours; "
                        f"modelled every {MODEL_EVERY} steps from the recent records",
                "steps": self.total, "explored": self.explored,
                "by_batch": {str(b): {"using": self.current.get(b, names[0]),
                                      **{x: self.estimate(b, x) for x in names}}
                             for b, names in sorted(self.names.items())},
                **({"acceptance": self.acceptance} if self.acceptance else {}),
                "switches": self.switches}
