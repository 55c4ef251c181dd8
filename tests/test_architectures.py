"""Any Hugging Face causal LM: PPD greedy == plain greedy (our loop and HF `generate`) in
float32 on tiny random models of several architectures, including sliding-window ones
(window 16, so prompts and outputs cross it) and final-logit softcapping."""
import random

import pytest
import torch
import transformers as T

from treeopt.models import Loaded
from treeopt.runtime import Decoder

from conftest import random_prompt_tokens, random_tree

SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
WINDOW = 16
CONFIGS = {
    "llama": lambda: T.LlamaConfig(num_hidden_layers=2, **SMALL),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=2, **SMALL),
    "mistral": lambda: T.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **SMALL),
    "gemma3": lambda: T.Gemma3TextConfig(
        num_hidden_layers=4, head_dim=8, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, **SMALL),
    "gemma2": lambda: T.Gemma2Config(num_hidden_layers=2, head_dim=8, sliding_window=WINDOW,
                                     final_logit_softcapping=5.0, **SMALL),
    "phi3": lambda: T.Phi3Config(num_hidden_layers=2, **SMALL),
}


def tiny_model(name: str, dtype=torch.float32) -> Loaded:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[name]()).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.requires_grad_(False)
    return Loaded(model, None, f"tiny-{name}", "", torch.device("cpu"), dtype)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lossless_across_architectures(name):
    lm = tiny_model(name)
    rng = random.Random(3)
    pt = random_prompt_tokens(lm, 3)
    for prompt_len in (5, 3 * WINDOW):  # shorter and longer than the window
        for _ in range(3):
            tree = random_tree(rng, 3, 6, max_nodes=10)
            dec = Decoder(lm, pt, tree)
            ids = [rng.randrange(32) for _ in range(prompt_len)]
            ref = dec.hf_generate(ids, 2 * WINDOW).output_ids
            assert dec.baseline(ids, 2 * WINDOW).output_ids == ref
            assert dec.ppd(ids, 2 * WINDOW).output_ids == ref, (name, prompt_len)


def test_sliding_masks_hide_what_the_window_excludes():
    """The tree step's sliding-layer mask equals a per-query recompute: key visible iff
    allowed by the tree and q_pos − k_pos < window."""
    from treeopt.runtime import attention_masks

    lm = tiny_model("gemma3")
    dec = Decoder(lm, random_prompt_tokens(lm, 3), random_tree(random.Random(4), 3, 6))
    ctx = 40
    for buf in dec.buffers.values():
        masks = dec.tree_mask(ctx, buf)
        assert set(masks) == {"sliding_attention", "full_attention"}
        q_pos = (ctx + buf.positions).tolist()
        k_pos = list(range(ctx)) + q_pos
        for kind, window in (("full_attention", None), ("sliding_attention", WINDOW)):
            m = masks[kind][0, 0]
            for i, q in enumerate(q_pos):
                for j, k in enumerate(k_pos):
                    tree_ok = j < ctx or bool(buf.allowed[i, j - ctx])
                    want = tree_ok and (window is None or q - k < window)
                    assert (m[i, j] == 0).item() == want, (kind, i, j)
    one = attention_masks(T.LlamaConfig(), torch.ones(2, 3, dtype=torch.bool),
                          torch.tensor([5, 6]), torch.tensor([4, 5, 6]), torch.float32)
    assert torch.is_tensor(one) and one.shape == (1, 1, 2, 3) and (one == 0).all()
