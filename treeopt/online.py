"""What a running decode's own steps say of its candidates (:mod:`treeopt.adapt`): each
one's tokens/s modelled from the acceptance of the text at hand and the step costs of
this machine now, with no step of the candidate itself:

    rate(c) = Σ tokens c accepts over the recent records / Σ t_B(L) of its replayed steps

The records are those of the last RECENT steps of the live sequences and those that
finished (:mod:`treeopt.records`: per step, the rank of each true token among the guess
rows, what prompt lookup's and the cache's chains offered and what the text took — the
quantities the search uses), less each live sequence's last steps whose look-ahead is not
decoded yet; at least MIN_RECORDS of them. A tree with guesses is modelled on the steps
that ran a tree from its own guesses (after plain or chains alone there are none), chains
alone on all of them, each replayed in the state the run recorded
(:func:`treeopt.search.hybrid.replay_predict`; :func:`~treeopt.search.hybrid.replay_batch`
at B > 1, a shared step paying its longest input), at t_B(L) the chooser measured at B
(:meth:`treeopt.adapt.Chooser.latency`); plain decoding makes 1 / t_B(1). Both
candidates of a comparison are read on the same steps of the same text: the model's
ratio has none of a few explored steps' yield noise in it (the chooser bounds what is
left, :meth:`treeopt.adapt.Chooser._model_need`).

`acceptance()` is the same records' running per-source, per-depth acceptance."""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from . import records
from .acceptance import RECORD_TOPK, marginal
from .adapt import NO_GUESSES
from .engine.results import Result
from .search import unreplayable
from .search.hybrid import replay_batch, replay_predict
from .tree import Tree

RECENT = 64  # batched steps of records the model reads: the text now, not the run's start
MIN_RECORDS = 32  # the fewest records the model speaks from
DONE = 16  # finished sequences kept for their recent steps


class Model:
    """The online model of one engine's run: `k` prompt-token rows, the trees' lookup
    policy and the cache source's settings (as the run's records are made)."""

    def __init__(self, k: int, lookup=None, cache: dict | None = None):
        self.k, self.lookup, self.cache = k, lookup, cache
        ngram, chain = records.settings(lookup)
        self.ngram, self.chain = ngram, chain
        # positions past a step its record reads in full: the deepest guess (a chain
        # longer than that is read short on the last few records, never long)
        self.horizon = 1 + k
        self.done: deque = deque(maxlen=DONE)

    def _records(self, ids: list[int], res: Result) -> dict:
        """A sequence's records, each marked `guessing` where its step ran a tree from
        that tree's own guesses (not plain, not chains alone, not a tree's first step
        after them: a tree replayed on those would be charged a root alone)."""
        p = records.of_result(ids, res, self.k, self.ngram, self.chain)
        p["guessing"] = np.array([c not in NO_GUESSES and not c.endswith("*")
                                  for c in res.configs[:len(p["match"])]], dtype=bool)
        return p

    def finished(self, ids: list[int], res: Result) -> None:
        """A sequence that finished: its records (made once: they change no more) stay
        in the window until they are old."""
        self.done.append(self._records(ids, res))

    def recent(self, seqs: list[tuple[list[int], Result]], now: int, b: int | None = None
               ) -> dict[str, dict | None]:
        """The replayable records of the last RECENT steps before step id `now` (with
        `b`, of the steps with b sequences in the batch: a batch's drain is another batch
        size), of the live sequences `seqs` — each one's last `horizon` positions left
        out, their text not decoded yet — and of those that finished: "all" of them (what
        chains alone and plain are modelled on: the chains' records hold at any step),
        and those that ran a tree from its own guesses, "guessing" (:meth:`_records`:
        what a tree is modelled on). Either None below MIN_RECORDS records."""
        parts: dict[str, list] = {"all": [], "guessing": []}
        for p, known in [(self._records(ids, res), len(ids) + len(res.output_ids))
                         for ids, res in seqs] + [(p, None) for p in self.done]:
            keep = p["step"] > now - RECENT
            if b is not None:
                keep &= p["live"] == b
            if known is not None:
                keep &= p["context"] + self.horizon <= known
            for kind, mask in (("all", keep), ("guessing", keep & p["guessing"])):
                parts[kind].append({key: v[mask] for key, v in p.items()})
        out = {kind: records.replayable(ps, self.lookup, self.cache)
               for kind, ps in parts.items()}
        return {kind: rec if rec is not None and len(rec["match"]) >= MIN_RECORDS else None
                for kind, rec in out.items()}

    def rates(self, recs: dict[str, dict | None], b: int, trees: dict[str, Tree | None],
              latency: Callable) -> dict[str, float | None]:
        """Tokens/s a sequence of each candidate at batch size b over the records
        (:meth:`recent`): a tree with guesses on those that ran one, chains alone on all,
        plain 1 / t_B(1). None where its records are too few or cannot replay its chains."""
        out: dict[str, float | None] = {}
        for name, tree in trees.items():
            rec = recs["guessing" if tree is not None and any(tree.states.values())
                       else "all"]
            if tree is None:
                out[name] = 1.0 / float(latency(np.array([1]))[0])
            elif rec is None or unreplayable(tree, rec):
                out[name] = None
            elif b > 1:
                out[name] = replay_batch(tree, rec, latency,
                                         rec["step"].tolist())["tokens_per_second"]
            else:
                out[name] = replay_predict(tree, rec, latency, follow=True)["tokens_per_second"]
        return out

    @staticmethod
    def acceptance(rec: dict) -> dict:
        """The records' per-source, per-depth acceptance: guess row d's top-1 accuracy
        (None where no step had row d), and of the steps where a chain was offered, their
        share and the tokens it won (lookup; the cache where the run has one)."""
        acc, _, n = marginal(rec["ranks"], RECORD_TOPK)
        out = {"records": int(len(rec["match"])),
               "guesses_top1_by_depth": [round(float(a), 4) if m else None
                                         for a, m in zip(acc[:, 0], n)]}
        for name, match, won in (("lookup", "match", "won"),
                                 ("cache", "cache_match", "cache_won")):
            if match in rec:
                offered = rec[match] > 0
                out[name] = {"offered_share": round(float(offered.mean()), 4),
                             "won_per_offer": round(float(rec[won][offered].mean()), 4)
                             if offered.any() else 0.0}
        return out


def attach(engine) -> None:
    """Give an adapting engine (one with a chooser) its online model."""
    if engine.chooser is not None:
        cache = engine.cache_source.settings() if engine.cache_source is not None else None
        engine.online = Model(engine.layout.rows, engine.lookup, cache)
