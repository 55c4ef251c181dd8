"""Hybrid trees: chains beside the prompt tokens' guesses — prompt lookup's (the request's
own text) and the cache's (the model's earlier text, :class:`treeopt.sources.SuffixCache`)
— searched by replaying an acceptance file's measured positions (:class:`Replay`): each
source's policy per state and match length, and the PPD part chosen jointly with lookup."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ..tree import Lookup, Tree
from .exact import LatencyFn, Solution, optimise, prediction


# ---- hybrid trees: chains beside the prompt tokens -------------------------------------------
def _table(policy: dict, tree: Tree, max_ngram: int) -> list[list[tuple]]:
    """A chain policy as a table [m][n] (n = 0: no match, no chain)."""
    none = (0, 1, 1)
    return [[policy.get((m, n), none) if n else none for n in range(max_ngram + 1)]
            for m in range(tree.num_prompt_tokens + 1)]


@dataclasses.dataclass
class Replay:
    """The measured positions of an acceptance file (ranks of the true tokens among the
    guesses, lookup's match length and accepted run, per prompt in order), and a tree's
    PPD part evaluated on them once: for state m and position i, the depth of the deepest
    accepted tree node and the state it leads to. Held as Python lists: the search
    replays hundreds of policies over the same positions. A run's records are stepwise
    (:mod:`treeopt.records`): one record a step, so the walk takes the next record
    whatever the step accepted."""

    tree: Tree
    rec: dict
    depth: dict[int, list[int]]
    next_state: dict[int, list[int]]
    match: list[int]
    won: list[int]
    state: list[int]
    cache_match: list[int] | None = None  # the cache source's records, where measured
    cache_won: list[int] | None = None
    agree: list[int] | None = None

    @classmethod
    def build(cls, tree: Tree, rec: dict) -> "Replay":
        ranks = rec["ranks"]
        depth = {0: np.zeros(len(ranks), dtype=np.int64)}  # state 0: no guesses
        nxt = {0: np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)}
        for m, nodes in tree.states.items():
            count = {nd.path: nd.prompt_tokens for nd in nodes}
            d = np.zeros(len(ranks), dtype=np.int64)
            s = np.full(len(ranks), tree.root_prompt_tokens, dtype=np.int64)
            for i, row in enumerate(ranks.tolist()):
                path: tuple = ()
                for r in row[:m]:
                    if r < 0 or path + (r,) not in count:
                        break
                    path += (r,)
                if path:
                    d[i], s[i] = len(path), count[path]
            depth[m], nxt[m] = d, s
        cache = [rec[key].tolist() if key in rec else None
                 for key in ("cache_match", "cache_won", "agree")]
        return cls(tree, rec, {m: v.tolist() for m, v in depth.items()},
                   {m: v.tolist() for m, v in nxt.items()}, rec["match"].tolist(),
                   rec["won"].tolist(), rec["state"].tolist() if "state" in rec else [],
                   *cache)

    def run(self, policy: dict, tau: np.ndarray, seen: set | None = None,
            follow: bool = False, charged: list | None = None,
            cache_policy: dict | None = None,
            shares: list | None = None) -> tuple[float, float, int]:
        """(tokens, seconds, steps) of greedy decoding replayed over the positions with
        these chain policies (prompt lookup's `policy`, the cache's `cache_policy`, each
        (m, n) → (c, q, keep)): a step in state m with match lengths (n, n') accepts
        max(tree depth, lookup's run within c, the cache's run within c') + 1 tokens. Its
        input grows by (1 + q) per lookup token not already a tree node (the accepted
        ones are, when the tree has them too) and by (1 + q') per cache token in neither
        the tree nor lookup's chain (the recorded agreement of the two chains); a chain
        entry with keep = 0 drops the guess nodes. The next state is the deepest accepted
        node's: the tree's first, then lookup's, then the cache's. `seen` collects the
        chain states (source 0 lookup / 1 cache, m, n ≥ 1) the walk visits. `follow`: a
        stepwise record's step is in the state the run recorded (replaying a run's own
        tree over its own steps), not the one the walk reached. `charged` collects
        (record, input length) of every step; `shares` [3] adds up the tokens each
        source won beyond the root's (the guesses', lookup's, the cache's)."""
        rec, tree = self.rec, self.tree
        match, won, depth, nxt = self.match, self.won, self.depth, self.next_state
        cached = bool(cache_policy) and self.cache_match is not None
        cmatch, cwon, agree = (self.cache_match, self.cache_won, self.agree) if cached else \
            ([0] * len(match), [0] * len(match), [0] * len(match))
        stepwise = rec.get("stepwise") or [False] * len(rec["lengths"])
        base = {m: tree.input_length(m) for m in [0, *tree.states]}
        root = tree.root_prompt_tokens
        table, ctable = (_table(p, tree, ngram) for p, ngram in (
            (policy, rec["max_ngram"]), (cache_policy if cached else {},
                                         rec.get("cache_max_ngram", 0))))
        tokens = steps = 0
        seconds = 0.0
        start = 0
        for length, each in zip(rec["lengths"], stepwise):
            i, m = 0, root
            while i < length:
                j = start + i
                if follow and each and self.state[j] in depth:
                    m = self.state[j]
                c, q, keep = table[m][match[j]]
                cc, qc, kc = ctable[m][cmatch[j]]
                if seen is not None:
                    if match[j]:
                        seen.add((0, m, match[j]))
                    if cmatch[j]:
                        seen.add((1, m, cmatch[j]))
                keep = (keep or not c) and (kc or not cc)
                dp = depth[m][j] if keep else 0
                dl, dc = min(won[j], c), min(cwon[j], cc)
                a = 1 + max(dp, dl, dc)
                if not each and i + a > length:  # the data ends inside this step
                    break
                shared = max(min(dc, dp), min(agree[j], c, cc))
                length_j = base[m if keep else 0] + (c - min(dl, dp)) * (1 + q) + \
                    (cc - shared) * (1 + qc)
                seconds += tau[length_j]
                if charged is not None:
                    charged.append((j, length_j))
                tokens, steps = tokens + a, steps + 1
                if shares is not None:
                    shares[0 if dp >= max(dl, dc) else 1 if dl >= dc else 2] += a - 1
                m = (nxt[m][j] if dp else root) if dp >= max(dl, dc) else \
                    q if dl >= dc else qc
                i += 1 if each else a
            start += length
        return tokens, seconds, steps


def _tau(tree: Tree, rec: dict, latency: LatencyFn, max_input: int = 0) -> np.ndarray:
    big = max(tree.max_input_length, max_input) + (
        rec["max_tokens"] + rec.get("cache_max_tokens", 0)) * (1 + tree.num_prompt_tokens) + 2
    tau = np.asarray(latency(np.arange(big)), dtype=float)
    tau[0] = tau[1]
    return tau


def _replay_figures(v) -> dict:
    return {"tokens_per_step": round(float(v[1] / max(v[3], 1)), 6),
            "step_seconds": round(float(v[2] / max(v[3], 1)), 8),
            "tokens_per_second": round(float(v[0]), 6), "steps": int(v[3])}


@dataclasses.dataclass
class Source:
    """The chain source a search climbs — 0: prompt lookup, 1: the cache — with the other
    source's policy held fixed (`other`)."""

    index: int = 0
    other: dict = dataclasses.field(default_factory=dict)

    def ngrams(self, rec: dict) -> range:
        return range(1, rec["max_ngram" if self.index == 0 else "cache_max_ngram"] + 1)

    def chain(self, rec: dict) -> int:
        return rec["max_tokens" if self.index == 0 else "cache_max_tokens"]

    def keeps(self) -> tuple:
        return (1, 0) if self.index == 0 else (1,)  # the cache's chain keeps the guesses

    def room(self, tree: Tree, m: int, max_input: int) -> int:
        """max_input less the other source's longest chain in state m."""
        return max_input - max((c * (1 + q) for (mm, _), (c, q, _) in self.other.items()
                                if mm == m), default=0)

    def policies(self, policy: dict) -> tuple[dict, dict]:
        """(lookup's, the cache's)."""
        return (policy, self.other) if self.index == 0 else (self.other, policy)


def _replay_value(tree: Tree, rec: dict, latency: LatencyFn, max_input: int,
                  source: Source):
    """policy → (tokens/s, tokens, seconds, steps, states seen) replayed over the measured
    positions, for the source climbed."""
    replay = Replay.build(tree, rec)
    tau = _tau(tree, rec, latency, max_input)

    def value(policy, visits=False):
        seen: set | None = set() if visits else None
        look, cache = source.policies(policy)
        tok, sec, steps = replay.run(look, tau, seen, cache_policy=cache)
        return (tok / sec if sec else 0.0), tok, sec, steps, seen
    return value


def uniform_start(tree: Tree, rec: dict, latency: LatencyFn, max_input: int,
                  source: Source | None = None) -> tuple:
    """The best policy with one setting (c, q, keep) for every state (m, n) — settings
    which pay only together (q = 0 and state 0's own chain) are within its reach — or
    none where no chain is better: (the replay's value function, the figures without
    this source, the best figures, the policy); :func:`hybrid` climbs from it."""
    source = source or Source()
    value = _replay_value(tree, rec, latency, max_input, source)
    plain = value({})
    best, policy = plain, {}
    entries = [(m, n) for m in [*sorted(tree.states), 0] for n in source.ngrams(rec)]
    for c, q, keep in itertools.product(range(1, source.chain(rec) + 1),
                                        [0, *sorted(tree.states)], source.keeps()):
        trial = {(m, n): (c, q, keep) for m, n in entries if tree.input_length(
            m if keep else 0) + c * (1 + q) <= source.room(tree, m, max_input)}
        v = value(trial)
        if v[0] > best[0] * (1 + 1e-9):
            best, policy = v, trial
    return value, plain, best, policy


def hybrid(tree: Tree, rec: dict, latency: LatencyFn, max_input: int,
           sweeps: int = 3, start: tuple | None = None, source: Source | None = None) -> dict:
    """A chain source's policy per state (m, n) for a tree's PPD part (prompt lookup's by
    default; `source` picks the cache's, the other's policy held fixed), by coordinate
    ascent on the replayed tokens per second over the measured positions (each entry
    tries every chain length c, prompt-token count q and keeping or dropping the guess
    nodes that fits max_input), started from the best uniform policy (`start`, from
    :func:`uniform_start`, where the caller has it). Returns the policy and the replayed
    figures with and without it."""
    source = source or Source()
    value, plain, best, policy = start or uniform_start(tree, rec, latency, max_input, source)
    for _ in range(sweeps):
        changed = False
        seen = value(policy, visits=True)[4]
        for m in [*sorted(tree.states), 0]:
            room = source.room(tree, m, max_input)
            for n in source.ngrams(rec):
                if (source.index, m, n) not in seen:  # no step of this walk is in (m, n)
                    continue
                current = policy.get((m, n))
                for c in range(0, source.chain(rec) + 1):
                    for q, keep in (itertools.product([0, *sorted(tree.states)], source.keeps())
                                    if c else [(1, 1)]):
                        if (c and (c, q, keep) == current) or (not c and current is None):
                            continue
                        if tree.input_length(m if keep else 0) + c * (1 + q) > room:
                            continue
                        trial = dict(policy)
                        if c:
                            trial[(m, n)] = (c, q, keep)
                        else:
                            trial.pop((m, n), None)
                        v = value(trial)
                        if v[0] > best[0] * (1 + 1e-9):
                            best, policy, current, changed = v, trial, trial.get((m, n)), True
                            seen = value(policy, visits=True)[4]
        if not changed:
            break

    return {"policy": policy, "hybrid": _replay_figures(best), "ppd_only": _replay_figures(plain)}


def _shares(won: list) -> dict:
    """Each source's share of the tokens won beyond the root's."""
    total = max(sum(won), 1)
    return {k: round(v / total, 4) for k, v in zip(("ppd", "lookup", "cache"), won)}


def _policies(tree: Tree) -> tuple[dict, dict]:
    """A tree's chain policies: (lookup's, the cache's)."""
    return tuple(lk.policy if lk else {} for lk in tree.chains)


def replay_predict(tree: Tree, rec: dict, latency: LatencyFn, follow: bool = False) -> dict:
    """A (hybrid) tree's tokens/step, step time and tokens/s replayed over measured
    positions (:class:`Replay`; `follow` as there), and each source's share of the tokens
    won beyond the root's."""
    shares = [0, 0, 0]
    tok, sec, steps = Replay.build(tree, rec).run(
        *_policies(tree)[:1], _tau(tree, rec, latency), follow=follow,
        cache_policy=_policies(tree)[1], shares=shares)
    return {**_replay_figures(((tok / sec) if sec else 0.0, tok, sec, steps)),
            "shares": _shares(shares)}


def replay_batch(tree: Tree, rec: dict, latency: LatencyFn, groups: list[int]) -> dict:
    """A run's own tree replayed over its stepwise records at a batch size B > 1, each step
    in its recorded state: the records that shared a batched forward (`groups`, one id
    per record) pay that step's time at the longest input among them, as the batched
    runtime pads to it. Seconds are sequence-seconds (a shared step counts once per
    sequence in it): tokens/s per sequence, as the search's per-batch figures."""
    tau = _tau(tree, rec, latency)
    charged: list = []
    shares = [0, 0, 0]
    tok, _, steps = Replay.build(tree, rec).run(_policies(tree)[0], tau, follow=True,
                                                charged=charged, cache_policy=_policies(tree)[1],
                                                shares=shares)
    longest: dict[int, int] = {}
    size: dict[int, int] = {}
    for j, length in charged:
        longest[groups[j]] = max(longest.get(groups[j], 0), length)
        size[groups[j]] = size.get(groups[j], 0) + 1
    sec = float(sum(tau[longest[g]] * size[g] for g in longest))
    return {**_replay_figures(((tok / sec) if sec else 0.0, tok, sec, steps)),
            "shares": _shares(shares)}


def ppd_candidates(found: dict, max_input: int) -> list[Solution]:
    """PPD parts for a hybrid tree: the searched tree first, then the PPD optima under
    smaller input caps (every cap up to 8, and a quarter, half and three quarters of the
    searched tree's input): a smaller tree leaves room and time for the lookup chain.
    A static search keeps its tree."""
    sol = found["solution"]
    if found["meta"].get("static"):
        return [sol]
    top = min(sol.tree.max_input_length, max_input)
    caps = sorted({*range(2, min(top, 9)), top // 4, top // 2, 3 * top // 4} - {0, 1, top})

    def shape(t: Tree):
        return t.root_prompt_tokens, tuple((m, tuple(ns)) for m, ns in sorted(t.states.items()))
    out, seen = [sol], {shape(sol.tree)}
    for cap in caps:
        s = optimise(found["acc"], found["latency"], found["meta"]["config"]["k"], cap,
                     found["path_prob"], found["meta"]["config"]["width_cap"])
        if shape(s.tree) not in seen:
            seen.add(shape(s.tree))
            out.append(s)
    return out


def with_lookup(found: dict, rec: dict, max_input: int) -> dict:
    """Give the searched tree (`found`, from :func:`search`) a lookup policy where it
    predicts faster, choosing the PPD part jointly with the lookup: each of
    :func:`ppd_candidates` is screened by its best uniform lookup policy, and the searched
    tree and the best other candidate get the full per-state search (:func:`hybrid`).
    When another PPD part wins, found's solution and predicted figures become its.
    Returns the replayed figures (PPD alone: the searched tree without lookup)."""
    lat = found["latency"]
    sol, *others = ppd_candidates(found, max_input)
    screened = 1 + len(others)
    runs = [(sol, hybrid(sol.tree, rec, lat, max_input))]
    if others:
        starts = [(s, uniform_start(s.tree, rec, lat, max_input)) for s in others]
        s, start = max(starts, key=lambda st: st[1][2][0])  # by tokens/s; first on ties
        runs.append((s, hybrid(s.tree, rec, lat, max_input, start=start)))
    best, h = max(runs, key=lambda r: r[1]["hybrid"]["tokens_per_second"])  # first on ties
    ppd_only = runs[0][1]["ppd_only"]
    kept = bool(h["policy"]) and \
        bool(h["hybrid"]["tokens_per_second"] > ppd_only["tokens_per_second"])
    if kept:
        best.tree.lookup = Lookup(rec["max_ngram"], rec["max_tokens"], h["policy"])
        if best is not sol:
            found["solution"] = best
            found["meta"]["predicted"] = prediction(best, found["t1"])
    return {"hybrid": h["hybrid"], "ppd_only": ppd_only, "lookup_kept": kept,
            "ppd_part": {"input_lengths": {str(m): L for m, L in
                                           found["solution"].input_lengths.items()},
                         "screened": screened, "searched": len(runs)}}


def with_cache(tree: Tree, rec: dict, latency: LatencyFn, max_input: int) -> dict:
    """Give a (hybrid) tree the cache source's chains where it predicts faster: the cache
    policy per state (m, n') by :func:`hybrid` with the tree's lookup policy held fixed,
    then lookup's policy climbed once more beside the cache's (each source's chain pays
    differently once the other proposes too). Sets `tree.cache` (and `tree.lookup`) when
    kept. Returns the replayed figures with and without the cache."""
    look = tree.lookup.policy if tree.lookup else {}
    h = hybrid(tree, rec, latency, max_input, source=Source(1, look))
    kept = bool(h["policy"]) and \
        h["hybrid"]["tokens_per_second"] > h["ppd_only"]["tokens_per_second"]
    figures = h["hybrid"]
    if kept:
        tree.cache = Lookup(rec["cache_max_ngram"], rec["cache_max_tokens"], h["policy"])
        if look:
            value = _replay_value(tree, rec, latency, max_input, Source(0, h["policy"]))
            again = hybrid(tree, rec, latency, max_input, sweeps=1,
                           start=(value, value({}), value(look), look),
                           source=Source(0, h["policy"]))
            tree.lookup = Lookup(rec["max_ngram"], rec["max_tokens"], again["policy"]) \
                if again["policy"] else None
            figures = again["hybrid"]
    return {"hybrid": figures, "without_cache": h["ppd_only"], "cache_kept": kept,
            "policy_entries": len(h["policy"]) if kept else 0}
