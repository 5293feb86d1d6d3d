"""The packed decode layout (packed.py, decode_layout.py): it replaces the plain weights, changes nothing but speed,
and never lets a changed weight go unseen. References: the plain model on the same weights, and transformers.
(The fused layout is test_fused_decode.py's; which layout is chosen, test_kernel_choice.py's.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_pair, tiny_config
from safetensors.torch import save_file
from torch import nn

import mistral_tutorial as mt
from mistral_tutorial.packed import PackedLinear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing needs mkldnn")

CONFIGS = [dict(sliding_window=4), dict(sliding_window=None, tie_embeddings=True),
           dict(sliding_window=6, n_experts=4, experts_per_token=2)]
CONFIG_IDS = ["window", "tied", "moe"]


def random_model(**overrides) -> mt.Transformer:
    model = mt.Transformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def matrix_names(model: mt.Transformer) -> list[str]:
    """Every state-dict key the fast layout packs: the projections, the MoE router and the head."""
    return [name + ".weight" for name, m in model.named_modules() if isinstance(m, nn.Linear | PackedLinear)]


@pytest.mark.parametrize("overrides", CONFIGS, ids=CONFIG_IDS)
def test_layout_changes_nothing_but_speed(overrides):
    model = random_model(**overrides)
    tokens = torch.randint(0, model.config.vocab_size, (2, 19))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = model.num_parameters()
    with torch.no_grad():
        logits = model(tokens)
    greedy = mt.generate(model, tokens, max_new_tokens=24, fast=False)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())     # fast=False left it alone

    mt.pack_for_decode(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())        # replaced, not kept beside
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)             # packing is exact; unpacking too
    assert model.num_parameters() == n_params
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits, atol=1e-5, rtol=0)
    assert torch.equal(mt.generate(model, tokens, max_new_tokens=24), greedy)


def test_generate_packs_by_default_and_from_pretrained_too(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL_TUTORIAL_LAYOUT", "packed")             # where packed is the layout chosen
    model = random_model(sliding_window=4)
    mt.generate(model, [1, 2, 3], max_new_tokens=2)
    assert isinstance(model.layers[0].attention.wq, PackedLinear)
    (tmp_path / "params.json").write_text(json.dumps(model.config.to_params()))
    save_file(mt.loading.ours_to_reference(model.state_dict(), model.config), str(tmp_path / "consolidated.safetensors"))
    assert isinstance(mt.Transformer.from_pretrained(tmp_path).layers[1].feed_forward.w2, PackedLinear)
    plain = mt.Transformer.from_pretrained(tmp_path, fast=False)
    assert isinstance(plain.layers[1].feed_forward.w2, nn.Linear) and plain.output.weight.requires_grad


@pytest.mark.parametrize("overrides", CONFIGS, ids=CONFIG_IDS)
def test_packed_against_transformers(overrides):
    hf, ours = build_pair(tiny_config(**overrides))
    mt.pack_for_decode(ours)
    tokens = torch.randint(0, ours.config.vocab_size, (1, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_training_fails_clearly_then_works_after_unpack():
    model = mt.pack_for_decode(random_model(sliding_window=5))
    tokens = torch.randint(0, model.config.vocab_size, (1, 13))
    with torch.no_grad():
        reference = model(tokens)
    with pytest.raises(RuntimeError, match="unpack"):
        model.train()
    model.tok_embeddings.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="gradients.*unpack"):
        model(tokens)
    with pytest.raises(RuntimeError, match="unpack"):
        model.to(torch.float64)
    assert model.to("cpu") is model and model.to(torch.float32) is model     # where it already is: nothing to do

    mt.unpack(model).train()
    assert all(isinstance(m, nn.Linear) for m in (model.layers[0].attention.wq, model.output))
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", CONFIGS, ids=CONFIG_IDS)
def test_a_changed_weight_is_never_ignored(overrides):
    """Every matrix, every way of changing it: it raises, or the model computes with the new value."""
    model = mt.pack_for_decode(random_model(**overrides))
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    names = matrix_names(model)
    assert len(names) >= model.config.n_layers * 3 + 1
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        weight = module.weight
        for write in (lambda w: setattr(w, "data", torch.zeros_like(w)), lambda w: w.copy_(torch.zeros_like(w)),
                      lambda w: w.data.mul_(2), lambda w: w.detach().zero_(), lambda w: w.__setitem__(0, 1.0)):
            with pytest.raises(RuntimeError, match="would not change the model"):
                write(weight)

        # load_state_dict repacks: the result equals a plain model given the same state dict
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[name] = torch.randn_like(state[name])
        model.load_state_dict(state)
        plain = mt.Transformer(model.config).eval()
        plain.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=0, msg=name)


def test_optimizer_step_cannot_silently_miss_the_packed_weights():
    model = mt.pack_for_decode(random_model(sliding_window=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert all(not p.requires_grad for p in model.parameters())            # frozen: nothing an optimizer could step
    with pytest.raises(RuntimeError, match="unpack"):
        model.train()
    optimizer.step()                                                        # no gradients: changes nothing
    tokens = torch.randint(0, model.config.vocab_size, (1, 5))
    with pytest.raises(RuntimeError, match="unpack"):
        with torch.enable_grad():
            model.tok_embeddings.weight.requires_grad_(True)
            model(tokens)


def test_tied_head_follows_the_embedding():
    model = mt.pack_for_decode(random_model(sliding_window=None, tie_embeddings=True))
    tokens = torch.randint(0, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(1.5)                             # in place, on the one real Parameter
        plain = mt.Transformer(model.config).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=0)
        model.tok_embeddings.weight = nn.Parameter(torch.randn_like(model.tok_embeddings.weight), requires_grad=False)
        model.output.matrix.tied_to = model.tok_embeddings.weight      # re-tying by hand is the user's to do
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=0)


def test_read_copies_can_be_read_and_copied_from():
    model = mt.pack_for_decode(random_model(sliding_window=4))
    plain = mt.Transformer(model.config).eval()
    with torch.no_grad():
        for name in matrix_names(model):
            target = plain.get_submodule(name.rsplit(".", 1)[0]).weight
            target.copy_(model.get_submodule(name.rsplit(".", 1)[0]).weight)   # into a plain tensor: allowed
            assert torch.equal(target, model.state_dict()[name])
    doubled = model.layers[0].feed_forward.w2.weight * 2                        # a new tensor: the caller's own
    doubled.add_(1)
    assert mt.upcycle(mt.unpack(model), n_experts=2).config.n_experts == 2
