"""Trees in and out of other engines' formats.

| format | what it is | what it can express |
|---|---|---|
| `medusa` | Medusa's `medusa_choices`: a JSON list of rank paths | one static tree; every node (and the root) reads all K heads; ranks < 10 (Medusa's global TOPK: a rank ≥ 10 silently aliases to the next head's rank 0); depth ≤ the number of heads |
| `ppd` | the PPD authors' dynamic sparse tree: `{"k": [[path, p_end, n], ...]}` for k = 1..N | one tree per state k = prompt rows available; n prompt tokens per node; the root always carries N; ranks < 10 (PPD's candidate pool holds each row's top 10) |

treeopt's own `treeopt.tree/1` expresses both and more (a root with fewer than K prompt
tokens, ranks up to its `topk`). :func:`constraints` names what a tree uses that a format
cannot express; :func:`load_tree` reads any of the three (format detected).
"""
from __future__ import annotations

import pathlib

from .artefact import finite, read_json_any
from .bounds import int_key
from .errors import BadInput
from .search.batch import flat_step
from .search.curves import optimise_static
from .search.exact import LatencyFn, figures, node_probabilities, optimise, predict
from .tree import SCHEMA, Node, Tree

ENGINE_TOPK = 10  # Medusa's TOPK and PPD's candidate pool: ranks 0..9 per row
FORMATS = ("medusa", "ppd")


def constraints(tree: Tree, fmt: str) -> list[str]:
    """What `tree` uses that `fmt` cannot express (empty: it converts exactly)."""
    k = tree.num_prompt_tokens
    out = []
    if fmt == "medusa":
        if not tree.is_static:
            out.append(f"dynamic tree ({len(tree.states)} states); Medusa takes one static tree")
        elif tree.root_prompt_tokens != k or any(n.prompt_tokens != k
                                                 for ns in tree.states.values() for n in ns):
            out.append(f"nodes carry fewer than K={k} prompt tokens; every Medusa node reads "
                       "all heads")
        if tree.max_depth > k:
            out.append(f"depth {tree.max_depth} > {k} heads")
    elif fmt == "ppd":
        if tree.root_prompt_tokens != k:
            out.append(f"the root carries {tree.root_prompt_tokens} prompt tokens; PPD's root "
                       f"always carries N={k}")
    else:
        raise BadInput(f"unknown tree format {fmt!r} (known: {', '.join(FORMATS)})")
    if tree.rank_width > ENGINE_TOPK:
        out.append(f"rank {tree.rank_width - 1} ≥ the engine's top-{ENGINE_TOPK}")
    for name, chain in (("prompt-lookup", tree.lookup), ("cache", tree.cache)):
        if chain is not None:
            out.append(f"{name} chains ({len(chain.policy)} (state, match) entries): "
                       f"{fmt} has no such source; dropped")
    return out


def to_medusa(tree: Tree) -> list[list[int]]:
    """`medusa_choices`, sorted by (depth, path) as Medusa sorts them."""
    reasons = constraints(tree, "medusa")
    if reasons:
        raise BadInput("cannot write this tree as medusa: " + "; ".join(reasons))
    (nodes,) = tree.states.values()
    return [list(n.path) for n in nodes]


def to_ppd(tree: Tree, prob: dict | None = None) -> dict[str, list]:
    """The PPD dynamic sparse tree: per state k, [path, p_end, n] sorted by (depth, path);
    p_end (the probability that acceptance stops at the node; informational in PPD) is
    taken from `prob` (path → P(path)) where given, else 0."""
    reasons = constraints(tree, "ppd")
    if reasons:
        raise BadInput("cannot write this tree as ppd: " + "; ".join(reasons))
    out = {}
    for m, nodes in sorted(tree.states.items()):
        child: dict[tuple, float] = {}
        for n in nodes:
            child[n.path[:-1]] = child.get(n.path[:-1], 0.0) + (prob or {}).get(n.path, 0.0)
        out[str(m)] = [[list(n.path), round((prob or {}).get(n.path, 0.0)
                                            - child.get(n.path, 0.0), 8), n.prompt_tokens]
                       for n in nodes]
    return out


def from_medusa(choices, where: str = "medusa tree", heads: int | None = None) -> Tree:
    """A Medusa choices list as a static tree: K = `heads` (default: its depth), every
    node and the root K prompt tokens. Medusa's rules: non-empty integer paths, ranks < 10,
    depth ≤ heads, prefix-closed, no repeats."""
    if not isinstance(choices, list) or not choices:
        raise BadInput(f"{where}: medusa choices must be a non-empty list of rank paths")
    paths = []
    for p in choices:
        if not isinstance(p, list) or not p or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in p):
            raise BadInput(f"{where}: {p!r} is not a non-empty list of integer ranks")
        if any(not 0 <= r < ENGINE_TOPK for r in p):
            raise BadInput(f"{where}: path {p} has a rank outside 0..{ENGINE_TOPK - 1} "
                           f"(Medusa's top-{ENGINE_TOPK})")
        paths.append(tuple(p))
    depth = max(len(p) for p in paths)
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool)
                              or not depth <= heads):
        raise BadInput(f"{where}: heads={heads!r}, but the choices are {depth} deep")
    return Tree.static(paths, heads or depth, ENGINE_TOPK, {"imported": "medusa"})


def from_ppd(obj: dict, where: str = "ppd tree") -> Tree:
    """A PPD dynamic sparse tree {k: [[path, p_end, n], ...]} (keys 1..N); n > N counts
    as N, as PPD's runtime takes it."""
    keys = sorted(int_key(k) if int_key(k) is not None else -1 for k in obj)
    if not keys or keys != list(range(1, keys[-1] + 1)):
        raise BadInput(f"{where}: keys must be the states 1..N, got {keys}")
    k = keys[-1]
    states = {}
    for key, entries in obj.items():
        if not isinstance(entries, list):
            raise BadInput(f"{where}: state {key} must be a list of [path, p_end, n]")
        nodes = []
        for e in entries:
            if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], list)
                    and finite(e[1]) and -1e-6 <= e[1] <= 1 + 1e-6
                    and isinstance(e[2], int) and not isinstance(e[2], bool) and e[2] >= 1):
                raise BadInput(f"{where}: state {key}: {e!r} is not [path, p_end in [0, 1], "
                               "n ≥ 1]")
            if any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < ENGINE_TOPK
                   for r in e[0]):
                raise BadInput(f"{where}: state {key}: path {e[0]} has a rank outside "
                               f"0..{ENGINE_TOPK - 1}")
            nodes.append(Node(tuple(e[0]), min(e[2], k)))
        states[int(key)] = nodes
    return Tree(k, k, states, ENGINE_TOPK, {"imported": "ppd"})


def parse_tree(obj, where: str = "tree") -> Tree:
    """A tree from any supported JSON form (format detected)."""
    if isinstance(obj, list):
        return from_medusa(obj, f"{where} (medusa choices)")
    if isinstance(obj, dict):
        if obj.get("schema") == SCHEMA:
            return Tree.from_json(obj, where)
        if obj.get("format") == "medusa" and "choices" in obj:
            return from_medusa(obj["choices"], f"{where} (medusa choices)", obj.get("heads"))
        if obj.get("format") == "ppd" and isinstance(obj.get("tree"), dict):
            return from_ppd(obj["tree"], f"{where} (ppd tree)")
        if obj and all(int_key(k) is not None for k in obj):
            return from_ppd(obj, f"{where} (ppd tree)")
    raise BadInput(f"{where}: not a treeopt tree, a Medusa choices list or a PPD dynamic-tree "
                   "dict")


def load_tree(path) -> Tree:
    """A tree file in any supported format."""
    p = pathlib.Path(path)
    return parse_tree(read_json_any(p, "tree file"), f"tree file {p}")


# ---- the searched tree in an engine's format ------------------------------------------
def _export(fmt: str, tree: Tree, found: dict, lat: LatencyFn, max_input: int,
            hybrid: dict | None = None) -> dict:
    """One tree in `fmt`; `hybrid`: the tree's own figures where it has a lookup policy
    (the PPD-only prediction would understate it)."""
    acc, pp = found["acc"], found["path_prob"]
    k = tree.num_prompt_tokens
    reasons = constraints(tree, fmt)
    ppd_part = tree.ppd_part()
    out_tree = ppd_part
    if constraints(ppd_part, fmt) and fmt == "medusa":
        out_tree = optimise_static(acc, lat, k, max_input, pp, width_cap=ENGINE_TOPK).tree
    elif constraints(ppd_part, fmt):
        out_tree = optimise(acc, lat, k, max_input, pp, width_cap=ENGINE_TOPK, roots=[k]).tree
    pred = figures(predict(out_tree, acc, lat, pp), out_tree)
    body = {"choices": to_medusa(out_tree), "heads": k} if fmt == "medusa" else \
        {"tree": to_ppd(out_tree, node_probabilities(out_tree, acc, pp))}
    out = {"format": fmt, **body, "exact": not reasons, "predicted": pred}
    if reasons:
        out["not_expressible"] = reasons
        out["chosen_tree_predicted"] = {**hybrid, "input_length": tree.max_input_length} \
            if tree.has_chains and hybrid else figures(predict(tree, acc, lat, pp), tree)
    return out


def for_engine(fmt: str, found: dict, max_input: int, batch_rows: list[dict] | None = None
               ) -> dict:
    """The searched tree in an engine's format (:mod:`treeopt.export`). Where the format
    cannot express it, the best tree under the format's rules is searched again and both
    predictions are stated — never a silent substitute; a prompt-lookup policy, which no
    engine format carries, is dropped and named (the PPD part is written, and the chosen
    tree's figures are its replayed hybrid ones). With `batch_rows` (from
    :func:`per_batch`) also one export per batch size (null: plain decoding)."""
    hybrid = (found["meta"].get("replayed") or {}).get("hybrid")
    out = _export(fmt, found["solution"].tree, found, found["latency"], max_input, hybrid)
    if batch_rows:
        tab = found["solution"].tree.by_batch
        out["by_batch"] = {str(r["batch"]): None if r["plain"] else _export(
            fmt, tab[r["batch"]], found, found["latency"] if r["batch"] == 1 else
            (lambda L, t=r["step_seconds"]: t * flat_step(L)),
            max_input if r["batch"] == 1 else r["input_length"],
            hybrid if r["batch"] == 1 else figures(r, tab[r["batch"]]))
            for r in batch_rows}
    return out
