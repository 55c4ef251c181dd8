"""Trees in other engines' formats."""
from __future__ import annotations

from .tree import Tree


def export_medusa(tree: Tree) -> list[list[int]]:
    """`medusa_choices`: the static tree's rank paths (largest state for dynamic trees)."""
    nodes = tree.states[max(tree.states)]
    return [list(n.path) for n in nodes]


def export_vllm(tree: Tree) -> list[tuple[int, ...]]:
    """vLLM `speculative_token_tree`: a list of rank tuples, parents before children."""
    return [tuple(p) for p in export_medusa(tree)]
