"""The serving engines' own draft rules, replayed over a model's greedy answers.

A replay walks each answer a as the engine would decode it greedily: the prefill gives
a[0]; a step with j tokens emitted asks the proposer for a draft of the history (prompt +
a[:j]), verifies it against a[j:] — a chain keeps its longest agreeing prefix, a trie its
longest agreeing path — and emits 1 + accepted tokens. Only steps whose draft and bonus
lie inside the answer count (j + K + 1 ≤ |a|, the "full steps" of a bench). Requests are
replayed one after another, so a proposer's memory across requests (SGLang's trie,
TensorRT-LLM's public pool, vLLM's suffix corpus) sees every earlier answer, as a server
that served them earlier would.

Each proposer is the engine's rule as its source reads (`treeopt.engines.SOURCES`), in
treeopt's code:

- :class:`VllmNgram` — vLLM `ngram`: the longest n in min..max whose last-n tokens occur
  earlier, its rightmost occurrence, the K tokens after it (exact);
- :class:`VllmSuffix` — vLLM `suffix`: the longest suffix match (≤ max depth) in the
  request's own history, or in the corpus of finished answers where that match is longer;
  the corpus part is treeopt's :class:`~treeopt.sources.SuffixCache` (most frequent
  continuation of the most recent occurrences), an approximation of vLLM's hash-slot vote;
- :class:`TrtNgram` — TensorRT-LLM `NGram`: the pattern → matches pool, longest pattern
  first, the oldest match (exact, public or private pool);
- :class:`SglangTrie` — SGLang `NGRAM` with match type BFS: one trie of the last
  max_trie_depth tokens of every request after each step (never the rest of the prompt),
  drafts of N − 1 nodes grown breadth-first from the longest matching suffix (exact up to
  the trie's capacity eviction, which a replay this size never reaches).
"""
from __future__ import annotations

from collections import deque

from .sources import PromptLookup, SuffixCache, run_length

LONG = 64  # the longest draft any replay asks for


class VllmNgram:
    def __init__(self, min_n: int = 5, max_n: int = 5):
        self.min_n, self.max_n = min_n, max_n

    def start(self, ids: list[int]) -> None:
        self.look = PromptLookup(self.max_n, LONG).reset(ids)

    def extend(self, new: list[int]) -> None:
        self.look.extend(new)

    def draft(self, k: int) -> list[int]:
        n, chain = self.look.offer()  # the longest match: below min_n no shorter one helps
        return chain[:k] if n >= self.min_n else []

    def finish(self, answer: list[int]) -> None:
        pass


class VllmSuffix:
    def __init__(self, depth: int = 24, corpus_tokens: int = 1 << 20, cached: int = 10000):
        self.depth = depth
        reach = max(2, min(depth, 8))  # vLLM enters by the last 2 or 4 tokens, then extends
        self.corpus = SuffixCache(min(corpus_tokens, 2_000_000), 2, reach, LONG) \
            if corpus_tokens and cached else None

    def start(self, ids: list[int]) -> None:
        self.ids = list(ids)
        self.look = PromptLookup(self.depth, LONG).reset(ids)

    def extend(self, new: list[int]) -> None:
        self.ids += new
        self.look.extend(new)

    def draft(self, k: int) -> list[int]:
        n, chain = self.look.offer()
        if self.corpus is not None:
            g, other = self.corpus.offer(self.ids[-self.corpus.max_ngram:])
            if g > n:  # the longer match wins, ties go to the request's own history
                chain = other
        return chain[:k]

    def finish(self, answer: list[int]) -> None:
        if self.corpus is not None:
            self.corpus.add(answer)


class TrtNgram:
    def __init__(self, max_ngram: int = 2, k: int = 4, public: bool = True,
                 keep_all: bool = True, oldest: bool = True):
        self.max_ngram, self.k, self.public = max_ngram, k, public
        self.keep_all, self.oldest = keep_all, oldest
        self.pool: dict[tuple, list[tuple]] = {}

    def start(self, ids: list[int]) -> None:
        self.seq, self.start_index = list(ids), 0
        if not self.public:
            self.pool = {}

    def extend(self, new: list[int]) -> None:
        self.seq += new

    def _update(self) -> None:
        seq, pool = self.seq[self.start_index:], self.pool
        for size in range(min(self.max_ngram, len(self.seq) - 1), 0, -1):
            for left in range(len(seq) - size):
                pattern = tuple(seq[left:left + size])
                match = tuple(seq[left + size:min(left + size + self.k, len(seq))])
                had = pool.get(pattern)
                if had is None or (not self.keep_all and len(match) > len(had[0])):
                    pool[pattern] = [match]
                elif match not in had:  # shorter matches make way for a longer one
                    pool[pattern] = [m for m in had if len(m) >= len(match)] + [match]

    def draft(self, k: int) -> list[int]:
        self._update()
        out: list[int] = []
        n = len(self.seq)
        for size in range(min(self.max_ngram, n - 1), 0, -1):
            got = self.pool.get(tuple(self.seq[n - size:]))
            if got is not None:
                out = list(got[0 if self.oldest else -1])[:k]
                break
        self.start_index = max(0, n - (self.k + self.max_ngram - 1))
        return out

    def finish(self, answer: list[int]) -> None:
        pass


class _Node:
    __slots__ = ("child", "recent")

    def __init__(self):
        self.child: dict[int, _Node] = {}
        self.recent: list[int] = []  # the children's tokens, most recently inserted first


class SglangTrie:
    def __init__(self, depth: int = 18, min_breadth: int = 1, max_breadth: int = 10):
        self.depth, self.min_b, self.max_b = depth, min_breadth, max_breadth
        self.root = _Node()

    def start(self, ids: list[int]) -> None:
        self.seq = list(ids)  # the prompt is not inserted (SGLang skips the prefill)

    def extend(self, new: list[int]) -> None:
        self.seq += new
        window = self.seq[-self.depth:]  # after each step: the last depth tokens
        for i in range(len(window)):
            node = self.root
            for tok in window[i:i + self.depth]:
                nxt = node.child.get(tok)
                if nxt is None:
                    nxt = node.child[tok] = _Node()
                else:
                    node.recent.remove(tok)
                node.recent.insert(0, tok)
                node = nxt

    def _anchors(self) -> list[tuple[_Node, int]]:
        ctx = self.seq[-self.depth:]
        out = []
        for d in range(len(ctx), 0, -1):  # the longest matching suffix first
            node = self.root
            for tok in ctx[len(ctx) - d:]:
                node = node.child.get(tok)
                if node is None:
                    break
            if node is not None and node.child:
                out.append((node, d))
        return out

    def draft(self, k: int) -> dict:
        top = max(1, self.depth - 1)
        scale = (self.max_b - self.min_b) / top
        tree: dict = {}
        count = 0
        for node, d in self._anchors():
            queue = deque([(tree, (top - d) * scale + self.min_b, node)])
            while queue and count < k:
                parent, breadth, trie = queue.popleft()
                for tok in trie.recent[:max(1, int(breadth))]:
                    if count >= k:
                        break
                    if tok not in parent:
                        parent[tok] = {}
                        count += 1
                    queue.append((parent[tok], breadth - scale, trie.child[tok]))
        return tree

    def finish(self, answer: list[int]) -> None:
        pass


def accepted(draft, truth: list[int]) -> int:
    """Tokens of a draft the greedy text takes: a chain's agreeing prefix, a trie's
    deepest agreeing path."""
    if isinstance(draft, list):
        return run_length(draft, truth)
    depth = 0
    while depth < len(truth) and truth[depth] in draft:
        draft = draft[truth[depth]]
        depth += 1
    return depth


def replay(proposer, texts: list[tuple[list[int], list[int]]], k: int) -> dict:
    """Tokens per step of drafts of `k` tokens (a chain's length, a trie's node budget)
    over (prompt, greedy answer) pairs, in order; see the module docstring."""
    steps = tokens = 0
    for prompt, answer in texts:
        if not answer:
            continue
        proposer.start(list(prompt) + answer[:1])
        j = 1
        while j + k + 1 <= len(answer):
            got = accepted(proposer.draft(k), answer[j:j + k]) if k else 0
            steps, tokens = steps + 1, tokens + 1 + got
            proposer.extend(answer[j:j + 1 + got])
            j += 1 + got
        proposer.finish(answer)
    return {"steps": steps, "tokens_per_step": tokens / steps if steps else 1.0}
