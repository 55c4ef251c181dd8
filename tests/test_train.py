import json
import random

import pytest
import torch

from treeopt import distill
from treeopt.errors import BadInput
from treeopt.prompt_tokens import PromptTokens
from treeopt.training import distill_loss

from treeopt.tiny import random_prompt_tokens

from conftest import run_cli, tiny_loaded


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(vocab=32, layers=2)


def test_multi_insertion_equals_one_group_at_a_time(tiny):
    rng = random.Random(0)
    ids = [rng.randrange(32) for _ in range(20)]
    table = random_prompt_tokens(tiny, 3).embeddings.double()
    kv, _ = distill.prefix_pass(tiny, ids)
    at = torch.tensor([0, 4, 5, 11, 17])
    many = distill.group_logits(tiny, kv, len(ids), at, table)
    for g, t in enumerate(at.tolist()):
        one = distill.group_logits(tiny, kv, len(ids), torch.tensor([t]), table)[0]
        torch.testing.assert_close(many[g], one, rtol=1e-10, atol=1e-10)
        # and equal to plainly appending the prompt tokens after the prefix 0..t
        emb = torch.cat([tiny.model.get_input_embeddings()(torch.tensor(ids[: t + 1])), table])
        h = tiny.model.get_decoder()(inputs_embeds=emb[None]).last_hidden_state[0]
        ref = tiny.model.get_output_embeddings()(h[t + 1:])
        torch.testing.assert_close(many[g], ref, rtol=1e-9, atol=1e-9)


def test_true_ranks_against_brute_force(tiny):
    rng = random.Random(1)
    ids = [rng.randrange(32) for _ in range(15)]
    table = random_prompt_tokens(tiny, 3, seed=4).embeddings.double()
    kv, _ = distill.prefix_pass(tiny, ids)
    at = torch.arange(0, 13)
    ranks = distill.true_ranks(distill.group_logits(tiny, kv, len(ids), at, table),
                               torch.tensor(ids), at, 10)
    for g, t in enumerate(at.tolist()):
        emb = torch.cat([tiny.model.get_input_embeddings()(torch.tensor(ids[: t + 1])), table])
        h = tiny.model.get_decoder()(inputs_embeds=emb[None]).last_hidden_state[0]
        logits = tiny.model.get_output_embeddings()(h[t + 1:])
        for i in range(3):
            target = t + 2 + i
            if target >= len(ids):
                assert ranks[g, i] == -1
                continue
            order = torch.argsort(logits[i], descending=True).tolist()
            r = order.index(ids[target])
            assert ranks[g, i] == (r if r < 10 else 10)


def test_training_loss_decreases(tiny):
    rng = random.Random(2)
    lm = tiny
    samples = []
    for _ in range(4):
        ids = [rng.randrange(32) for _ in range(24)]
        _, logits = distill.prefix_pass(lm, ids)
        lp, idx = torch.topk(torch.log_softmax(logits, -1), 8, dim=-1)
        samples.append(distill.Sample(ids, 4, idx.int(), lp.half()))
    table = torch.nn.Parameter(random_prompt_tokens(lm, 3).embeddings.double())
    opt = torch.optim.Adam([table], lr=0.3)
    kvs = [distill.prefix_pass(lm, s.ids)[0] for s in samples]
    at = torch.arange(3, 21)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        total = 0.0
        for s, kv in zip(samples, kvs):
            loss, _ = distill_loss(distill.group_logits(lm, kv, 24, at, table), s, at)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_formats_roundtrip(tmp_path):
    emb = torch.randn(3, 16)
    pt = PromptTokens(emb, {"model": "m"})
    pt.save(tmp_path / "ours")
    assert torch.equal(PromptTokens.load(tmp_path / "ours").embeddings, emb)
    pt.save_peft(tmp_path / "peft", "base/model")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["num_virtual_tokens"] == 3 and cfg["token_dim"] == 16
    assert cfg["virtual_tokens_per_special_token"] == 1
    back = PromptTokens.load(tmp_path / "peft")
    assert torch.equal(back.embeddings, emb) and back.meta["model"] == "base/model"
    # a .bin PEFT folder (as the PPD authors published)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save({"prompt_embeddings": emb}, tmp_path / "bin" / "adapter_model.bin")
    assert torch.equal(PromptTokens.load(tmp_path / "bin").embeddings, emb)


def test_peft_rejections(tmp_path):
    pt = PromptTokens(torch.randn(6, 16))
    pt.save_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["virtual_tokens_per_special_token"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="virtual_tokens_per_special_token=2"):
        PromptTokens.load(tmp_path)


def test_hidden_size_mismatch(tiny):
    with pytest.raises(BadInput, match="hidden size 16, the model has 32"):
        PromptTokens(torch.randn(3, 16)).check_model(tiny.model)


def test_hidden_size_mismatch_cli(tmp_path):
    from test_cli import assert_bad

    PromptTokens(torch.randn(3, 100)).save_peft(tmp_path)
    assert_bad(run_cli("run", "--prompt-tokens", str(tmp_path), "--max-new-tokens", "2"),
               "hidden size 100, the model has 576")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_distillation_forward_is_the_runtimes(arch):
    """Multi-insertion logits equal the runtime's prompt-slot logits after the prefix —
    softcapped for a softcapping model (Gemma 2), window-masked for a sliding one (Gemma 3;
    the prefix crosses its window of 16)."""
    from treeopt.tiny import tiny_model

    from treeopt.runtime import Decoder
    from treeopt.tree import Tree

    lm = tiny_model(arch, torch.float64)
    if lm.model.config.final_logit_softcapping:
        lm.model.config.final_logit_softcapping = 0.1  # below this tiny model's raw logits
    pt = random_prompt_tokens(lm, 3)
    table = pt.embeddings.double()
    rng = random.Random(5)
    ids = [rng.randrange(32) for _ in range(40)]
    kv, full = distill.prefix_pass(lm, ids)
    at = torch.tensor([2, 17, 30, 37])
    many = distill.group_logits(lm, kv, len(ids), at, table)
    dec = Decoder(lm, pt, Tree.chain(3, 3))
    cap = lm.model.config.final_logit_softcapping
    for g, t in enumerate(at.tolist()):
        _, ref = dec.prefill(ids[: t + 1], table)  # the runtime's own prefill + prompt slots
        # (Gemma 2's eager attention takes its softmax in float32: 1e-6, not 1e-9)
        torch.testing.assert_close(many[g], ref[t + 1:], rtol=1e-6, atol=1e-6)
    if cap:
        assert many.abs().max() <= cap and full.abs().max() <= cap
        raw = lm.model.get_output_embeddings()(
            lm.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0])
        assert raw.abs().max() > cap  # the cap really bites on this model
