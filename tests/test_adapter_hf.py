"""Hugging Face adapter: canonical names, exact layouts, masking equals hand-zeroed weights."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

transformers = pytest.importorskip("transformers")

from _hf_models import (  # noqa: E402
    BUILDERS,
    D_HEAD,
    HEADS,
    LAYERS,
    TOKENS,
    VOCAB,
    D,
    gpt2,
    hand_zeroed,
    random_masks,
)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_canonical_names_shapes_and_defaults(kind):
    model = BUILDERS[kind]()
    found = si.targets(model)
    expected_mlp = {"W_in", "W_out"} | ({"W_gate"} if kind == "llama" else set())
    for layer in range(LAYERS):
        for x in "QKVO":
            assert f"blocks.{layer}.attn.W_{x}" in found
        for w in expected_mlp:
            assert f"blocks.{layer}.mlp.{w}" in found
    assert found["blocks.0.attn.W_Q"].shape == (HEADS, D, D_HEAD)
    assert found["blocks.0.attn.W_O"].shape == (HEADS, D_HEAD, D)
    kv = 2 if kind == "llama" else HEADS
    assert found["blocks.1.attn.W_K"].shape == (kv, D, D_HEAD)
    assert "embed.W_E" not in found and "unembed.W_U" not in found  # not default targets
    everything = si.targets(model, include="*")
    assert everything["embed.W_E"].shape == (VOCAB, D)
    assert everything["unembed.W_U"].shape == (D, VOCAB)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_masked_logits_equal_hand_zeroed_weights(kind):
    model = BUILDERS[kind]()
    masks = random_masks(model)
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = model(TOKENS).logits
    assert_bit_exact(model, before)
    reference = BUILDERS[kind]()
    hand_zeroed(kind, reference, masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_canonical_round_trip_is_exact(kind):
    model = BUILDERS[kind]()
    root_params = dict(model.named_parameters())
    for name, target in si.targets(model, include="*").items():
        real = model.get_submodule(target.module).weight
        canonical = target.layout.to_canonical(real)
        assert tuple(canonical.shape) == target.shape, name
        buffer = torch.zeros_like(real)
        rebuilt = (
            target.layout.write_real(canonical, buffer)
            if not target.layout.is_identity
            else canonical
        )
        region = target.layout.to_canonical(rebuilt)
        assert torch.equal(region, canonical), name
    assert dict(model.named_parameters()).keys() == root_params.keys()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_whole_head_mask_equals_zero_ablating_the_head(kind):
    model = BUILDERS[kind]()
    layer, head = 1, 2
    masks = {}
    for x in "QKVO":
        target = si.targets(model)[f"blocks.{layer}.attn.W_{x}"]
        mask = torch.ones(target.shape, dtype=torch.bool)
        if x in "QO" or kind != "llama":
            mask[head] = False
        else:  # grouped-query attention: K/V of head 2 are shared; V's zeroing is covered by O
            pass
        masks[f"blocks.{layer}.attn.W_{x}"] = mask
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS).logits
    out_proj = {
        "gpt2": lambda m: m.transformer.h[layer].attn.c_proj,
        "neox": lambda m: m.gpt_neox.layers[layer].attention.dense,
        "llama": lambda m: m.model.layers[layer].self_attn.o_proj,
    }[kind](model)

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return (z,)

    handle = out_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = model(TOKENS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tied_unembedding_is_masked_separately_from_embedding():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = snapshot(model)
    w_u = torch.ones(D, VOCAB, dtype=torch.bool)
    w_u[:, 3] = False  # token 3 can never be predicted above 0
    with torch.no_grad(), si.masked(model, {"unembed.W_U": w_u}):
        logits = model(TOKENS).logits
        assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])
    assert torch.all(logits[..., 3] == 0)
    assert_bit_exact(model, before)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_mask_found_on_hf_model_trains_and_restores():
    model = gpt2()
    before = snapshot(model)

    def next_token_loss(m, batch):
        logits = m(batch).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )

    result = si.find(
        model,
        "continuous_sparsification_lepori",
        next_token_loss,
        [TOKENS],
        steps=5,
        progress=False,
    )
    assert set(result.subnetwork.names) == set(si.targets(model))
    assert_bit_exact(model, before)
    with si.masked(model, result.subnetwork):
        pass


def test_unknown_hf_architecture_falls_back_to_parameter_names():
    cfg = transformers.GPTJConfig(
        n_layer=1, n_head=2, n_embd=8, rotary_dim=4, vocab_size=20, n_positions=16
    )
    model = transformers.GPTJModel(cfg)
    names = list(si.targets(model))
    assert "h.0.attn.q_proj.weight" in names
    with pytest.raises(KeyError, match="plain nn.Module"):
        si.targets(model, include="blocks.*.attn.W_Q")


@pytest.mark.parametrize("name", ["gumbel_sigmoid", "hard_concrete"])
def test_head_granularity_gives_one_decision_per_head(name):
    model = gpt2()

    def next_token_loss(m, batch):
        logits = m(batch).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )

    method = si.methods.create(name, granularity="head")
    batch = torch.cat([TOKENS, TOKENS])  # gumbel_sigmoid splits a batch among 4 mask samples
    result = si.find(
        model, method, next_token_loss, [batch], targets="blocks.*.attn.*", steps=3, progress=False
    )
    for mask in result.subnetwork.masks.values():
        per_head = mask.flatten(1)
        assert (per_head.all(dim=1) | (~per_head).all(dim=1)).all()
    assert result.subnetwork.density() > 0
