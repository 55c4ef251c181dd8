import os
import random
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# every output of the suite goes to a temporary $TREEOPT_HOME, never into the repository
# or the user's own folder (subprocesses inherit it)
os.environ["TREEOPT_HOME"] = tempfile.mkdtemp(prefix="treeopt-test-home-")

from treeopt.models import Loaded  # noqa: E402
from treeopt.prompt_tokens import PromptTokens  # noqa: E402
from treeopt.tree import Node, Tree  # noqa: E402


def tiny_loaded(vocab: int = 24, seed: int = 0, dtype=torch.float64, layers: int = 2) -> Loaded:
    """A random-init Llama small enough for property tests (float64: no near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    return Loaded(model, None, "tiny-llama", "", torch.device("cpu"), dtype)


def random_prompt_tokens(lm: Loaded, k: int, seed: int = 0) -> PromptTokens:
    g = torch.Generator().manual_seed(seed)
    hidden = lm.model.config.hidden_size
    return PromptTokens(torch.randn(k, hidden, generator=g) * 0.5)


def random_tree(rng: random.Random, k: int, topk: int, max_nodes: int = 12) -> Tree:
    """A random valid dynamic tree: every state 1..k, prefix-closed, random counts."""
    states = {}
    for m in range(1, k + 1):
        paths = set()
        for _ in range(rng.randint(0, max_nodes)):
            parents = [()] + [p for p in paths if len(p) < m]
            parent = rng.choice(parents)
            used = {p[-1] for p in paths if len(p) == len(parent) + 1 and p[:-1] == parent}
            free = [r for r in range(topk) if r not in used]
            if free:
                paths.add(parent + (rng.choice(free),))
        states[m] = [Node(p, rng.randint(1, k)) for p in paths]
    return Tree(k, rng.randint(1, k), states, topk)


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model in float32 (converted once into the user cache)."""
    from treeopt import models

    return models.load(None, dtype="float32", device="cpu")
