"""Hugging Face Qwen2, Mistral, Gemma, Gemma-2, Phi-3 and OPT: canonical names, exact views,
masking equals hand-zeroed weights, exact restore, training, the same mask in every wrapper."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

transformers = pytest.importorskip("transformers")

from _hf_models import (  # noqa: E402
    D_MLP,
    DECODER_CLASSES,
    GEMMA_D_HEAD,
    HEADS,
    KV_HEADS,
    LAYERS,
    TOKENS,
    VOCAB,
    D,
    decoder,
    decoder_layer,
    hand_zeroed_decoder,
)

KINDS = list(DECODER_CLASSES)
GATED = {"qwen2", "mistral", "gemma", "gemma2", "phi3"}


def d_head(kind):
    return GEMMA_D_HEAD if kind.startswith("gemma") else D // HEADS


def masks_for(model, kind, seed=1):
    """Random masks on the default targets and, for OPT, the offset positional embedding."""
    include = ["blocks.*", "pos_embed.W_pos"] if kind == "opt" else None
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(t.shape, generator=gen) < 0.6
        for n, t in si.targets(model, include=include).items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_names_shapes_and_defaults(kind):
    model = decoder(kind)
    found = si.targets(model)
    mlp = {"W_gate", "W_in", "W_out"} if kind in GATED else {"W_in", "W_out"}
    expected = {f"blocks.{L}.attn.W_{x}" for L in range(LAYERS) for x in "QKVO"}
    expected |= {f"blocks.{L}.mlp.{w}" for L in range(LAYERS) for w in mlp}
    assert set(found) == expected
    kv = HEADS if kind == "opt" else KV_HEADS
    assert found["blocks.1.attn.W_Q"].shape == (HEADS, D, d_head(kind))
    assert found["blocks.1.attn.W_K"].shape == (kv, D, d_head(kind))
    assert found["blocks.1.attn.W_V"].axes[0] == ("head" if kind == "opt" else "kv_head")
    assert found["blocks.1.attn.W_O"].shape == (HEADS, d_head(kind), D)
    assert found["blocks.1.mlp.W_in"].shape == (D, D_MLP)
    assert found["blocks.1.mlp.W_out"].shape == (D_MLP, D)
    everything = si.targets(model, include="*")
    assert everything["embed.W_E"].shape == (VOCAB, D)
    assert everything["unembed.W_U"].shape == (D, VOCAB)
    assert ("pos_embed.W_pos" in everything) == (kind == "opt")


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_views_are_exact_and_tile_the_real_tensors(kind):
    model = decoder(kind)
    coverage = {}
    for name, target in si.targets(model, include="*").items():
        real = model.get_submodule(target.module).weight
        canonical = target.layout.to_canonical(real)
        assert tuple(canonical.shape) == target.shape, name
        assert canonical.untyped_storage().data_ptr() == real.untyped_storage().data_ptr(), name
        rebuilt = target.layout.write_real(canonical.detach(), torch.zeros_like(real))
        assert torch.equal(target.layout.to_canonical(rebuilt), canonical), name
        count = coverage.setdefault(target.location, torch.zeros(real.shape, dtype=torch.int32))
        target.layout.to_canonical(count).add_(1)
    for (module, _), count in coverage.items():
        if module.endswith("embed_positions"):  # row 1 (padding) and row 0 are never targets
            assert count[:2].eq(0).all() and count[2:].eq(1).all()
        else:  # every weight of the fused qkv_proj / gate_up_proj belongs to one target
            assert count.eq(1).all(), module


def test_phi3_fused_views_follow_the_forwards_order():
    model = decoder("phi3")
    found = si.targets(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    size = d_head("phi3")
    hidden = torch.randn(3, D, generator=torch.Generator().manual_seed(0))

    def canonical(name):
        target = found[name]
        return target.layout.to_canonical(model.get_submodule(target.module).weight)

    with torch.no_grad():
        qkv = attn.qkv_proj(hidden)  # the forward slices q, k, v from its output in this order
        gate, up = mlp.gate_up_proj(hidden).chunk(2, dim=-1)  # and chunks gate, up
        starts = {"Q": 0, "K": HEADS * size, "V": (HEADS + KV_HEADS) * size}
        for letter, start in starts.items():
            w = canonical(f"blocks.0.attn.W_{letter}")
            per_head = torch.einsum("bd,hde->bhe", hidden, w).flatten(1)
            torch.testing.assert_close(per_head, qkv[:, start : start + per_head.shape[1]])
        torch.testing.assert_close(hidden @ canonical("blocks.0.mlp.W_gate"), gate)
        torch.testing.assert_close(hidden @ canonical("blocks.0.mlp.W_in"), up)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_logits_equal_hand_zeroed_weights_and_restore(kind):
    model = decoder(kind)
    masks = masks_for(model, kind)
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = model(TOKENS).logits
    assert_bit_exact(model, before)
    with torch.no_grad():
        unmasked = model(TOKENS).logits
    reference = decoder(kind)
    hand_zeroed_decoder(kind, reference, masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
    assert not torch.allclose(got, unmasked, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if kind == "gemma2":  # final soft-capping is on: tanh bounds the logits by the cap
        assert got.abs().max() < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_whole_head_mask_equals_zeroing_the_heads_o_proj_input(kind):
    model = decoder(kind)
    layer, head, size = 1, 2, d_head(kind)
    masks = {}
    for x in "QKVO":
        name = f"blocks.{layer}.attn.W_{x}"
        mask = torch.ones(si.targets(model)[name].shape, dtype=torch.bool)
        if x in "QO" or kind == "opt":  # grouped K/V heads are shared with other query heads
            mask[head] = False
        masks[name] = mask
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS).logits
    attn = decoder_layer(kind, model, layer).self_attn
    out_proj = attn.out_proj if kind == "opt" else attn.o_proj

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head * size : (head + 1) * size] = 0
        return (z,)

    handle = out_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = model(TOKENS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gumbel_sigmoid_trains_every_target(kind):
    model = decoder(kind)
    before = snapshot(model)

    def next_token_loss(m, batch):
        logits = m(batch).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )

    method = si.methods.create("gumbel_sigmoid")
    batch = torch.cat([TOKENS, TOKENS])  # gumbel_sigmoid splits a batch among 4 mask samples
    result = si.find(model, method, next_token_loss, [batch], steps=3, progress=False)
    assert set(result.subnetwork.names) == set(si.targets(model))
    for name, scores in result.scores.items():
        assert (scores != method.init_logit).any(), f"{name} received no gradient"
    assert_bit_exact(model, before)


@pytest.mark.parametrize("kind", KINDS)
def test_conformance_checks_pass(kind):
    report = si.testing.check_adapter(decoder(kind), TOKENS)
    assert "by_hand" in report.passed and "find" in report.passed


def test_tied_unembedding_is_masked_separately_from_embedding():
    model = decoder("opt")
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    before = snapshot(model)
    w_u = torch.ones(D, VOCAB, dtype=torch.bool)
    w_u[:, 3] = False  # token 3's logit is the unembedding's column 3 alone: 0
    with torch.no_grad(), si.masked(model, {"unembed.W_U": w_u}):
        logits = model(TOKENS).logits
        embedding = model.model.decoder.embed_tokens.weight
        assert torch.equal(embedding, before["model.decoder.embed_tokens.weight"])
    assert torch.all(logits[..., 3] == 0)
    assert_bit_exact(model, before)


def test_opt_word_embedding_projections_are_non_default_targets():
    model = decoder("opt", num_hidden_layers=1, word_embed_proj_dim=16)
    everything = si.targets(model, include="*")
    assert everything["embed.W_in_proj"].shape == (16, D)
    assert everything["unembed.W_out_proj"].shape == (D, 16)
    assert everything["embed.W_E"].shape == (VOCAB, 16)
    assert "embed.W_in_proj" not in si.targets(model)
    masks = {"embed.W_in_proj": torch.zeros(16, D, dtype=torch.bool)}
    with torch.no_grad(), si.masked(model, masks):
        removed = model(TOKENS).logits
    with torch.no_grad():
        model.model.decoder.project_in.weight.zero_()
        expected = model(TOKENS).logits
    torch.testing.assert_close(removed, expected)


def bridge(kind, hf=None):
    """A TransformerLens 4 ``TransformerBridge`` around a :func:`decoder` model."""
    sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    hf = hf if hf is not None else decoder(kind)
    return sources.build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_same_targets_and_fingerprint_in_hf_bridge_and_nnsight(kind):
    nnsight = pytest.importorskip("nnsight")
    hf, tl, wrapped = decoder(kind), bridge(kind), nnsight.NNsight(decoder(kind))
    shapes = {n: t.shape for n, t in si.targets(hf, include="*").items()}
    assert {n: t.shape for n, t in si.targets(tl, include="*").items()} == shapes
    assert list(si.targets(tl)) == list(si.targets(hf))
    assert si.fingerprint(tl) == si.fingerprint(hf) == si.fingerprint(wrapped)


@pytest.mark.parametrize("kind", KINDS)
def test_one_mask_same_logits_in_hf_bridge_nnsight_and_reference(kind):
    nnsight = pytest.importorskip("nnsight")
    masks = si.Subnetwork(masks_for(decoder(kind), kind))
    results = {}
    hf = decoder(kind)
    with torch.no_grad(), si.masked(hf, masks):
        results["hf"] = hf(TOKENS).logits
    tl = bridge(kind)
    before = snapshot(tl)
    with torch.no_grad(), si.masked(tl, masks):
        results["bridge"] = tl(TOKENS)
    assert_bit_exact(tl, before)
    wrapped = nnsight.NNsight(decoder(kind))
    with torch.no_grad(), si.masked(wrapped, masks):
        with wrapped.trace(TOKENS):
            saved = wrapped.output.save()
    results["nnsight"] = saved.logits
    reference = decoder(kind)
    hand_zeroed_decoder(kind, reference, masks.masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
    for name, got in results.items():
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{kind}/{name}")


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_opt_in_bias_and_norm_targets_pass_the_conformance_checks(kind):
    report = si.testing.check_adapter(decoder(kind), TOKENS, biases=True)
    names = set(report.targets)
    assert {"blocks.0.ln1.w", "ln_final.w"} <= names
    assert ("blocks.0.attn.b_Q" in names) == (kind == "qwen2")  # Qwen2's Q/K/V biases
    assert "by_hand" in report.passed and "restore" in report.passed
