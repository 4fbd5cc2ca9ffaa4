"""Legacy HookedTransformer (transformer-lens < 4), run by .ci/run in a second environment."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

pytest.importorskip("transformers")
try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
except ImportError:  # transformer-lens >= 4 removed HookedTransformer
    pytest.skip("needs transformer-lens < 4 (HookedTransformer)", allow_module_level=True)

from _hf_models import D_HEAD, HEADS, LAYERS, TOKENS, VOCAB, D, gpt2, hand_zeroed, random_masks  # noqa: E402


def hooked_from(hf) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=LAYERS,
        d_model=D,
        n_heads=HEADS,
        d_head=D_HEAD,
        d_mlp=4 * D,
        d_vocab=VOCAB,
        n_ctx=16,
        act_fn="gelu_new",
        normalization_type="LN",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return model.eval()


def test_canonical_targets_are_the_hooked_parameters():
    model = hooked_from(gpt2())
    found = si.targets(model, include="*")
    assert found["blocks.0.attn.W_Q"].shape == (HEADS, D, D_HEAD)
    assert found["blocks.1.attn.W_O"].shape == (HEADS, D_HEAD, D)
    assert found["blocks.0.mlp.W_in"].shape == (D, 4 * D)
    assert found["unembed.W_U"].shape == (D, VOCAB)
    assert list(si.targets(model)) == list(si.targets(gpt2()))
    assert si.fingerprint(model) == si.fingerprint(gpt2())


def test_same_logits_as_hf_and_hand_zeroed_reference():
    masks = si.Subnetwork(random_masks(gpt2()))
    model = hooked_from(gpt2())
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS)
        _, cache = model.run_with_cache(TOKENS)
    assert_bit_exact(model, before)
    reference = gpt2()
    hand_zeroed("gpt2", reference, masks.masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
        _, expected_cache = hooked_from(reference).run_with_cache(TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache["blocks.1.attn.hook_z"], expected_cache["blocks.1.attn.hook_z"], atol=1e-5, rtol=1e-5
    )


def test_whole_head_mask_equals_hook_z_ablation():
    model = hooked_from(gpt2())
    layer, head = 1, 2
    masks = {}
    for letter in "QKVO":
        mask = torch.ones(
            si.targets(model)[f"blocks.{layer}.attn.W_{letter}"].shape, dtype=torch.bool
        )
        mask[head] = False
        masks[f"blocks.{layer}.attn.W_{letter}"] = mask
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS)

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        expected = model.run_with_hooks(
            TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)]
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_find_trains_on_hooked_transformer():
    model = hooked_from(gpt2())
    before = snapshot(model)

    def next_token_loss(m, batch):
        return m(batch, return_type="loss")

    result = si.find(
        model,
        "gumbel_sigmoid",
        next_token_loss,
        [torch.cat([TOKENS, TOKENS])],
        steps=3,
        progress=False,
    )
    assert result.subnetwork.meta["family"] == "transformer_lens.HookedTransformer"
    assert_bit_exact(model, before)


def test_blocks_block_output_and_reinitialize_are_the_hooked_transformers_own():
    import copy

    from subnet_interp import adapters
    from subnet_interp.probing import read_hidden

    model = hooked_from(gpt2())
    adapter = adapters.resolve(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == LAYERS and all(a is b for a, b in zip(blocks, model.blocks, strict=True))
    assert adapter.block_output(model, blocks[0]) is model.blocks[0].hook_resid_post
    assert adapter.inner(model) is model
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
        torch.testing.assert_close(read_hidden(model, 0, TOKENS), cache["blocks.0.hook_resid_post"])

    def reinitialized(seed):
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            adapter.reinitialize(fresh)
        return snapshot(fresh)

    first, same, other = reinitialized(1), reinitialized(1), reinitialized(2)
    assert all(torch.equal(first[k], same[k]) for k in first)  # deterministic under a seed
    assert not torch.equal(first["blocks.0.attn.W_Q"], model.blocks[0].attn.W_Q)
    assert not torch.equal(first["blocks.0.attn.W_Q"], other["blocks.0.attn.W_Q"])


def test_hooked_transformer_passes_the_conformance_kit():
    report = si.testing.check_adapter(hooked_from(gpt2()), TOKENS)
    assert report.targets == tuple(si.targets(gpt2())) and report.passed[-1] == "find"
