"""Analysis on tiny GPT-2s: Hugging Face (fused c_attn) and TransformerBridge."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp.analysis import ablation_effect, kl_to_full, overlap_test

pytest.importorskip("transformers")
from _hf_models import BUILDERS, TOKENS, random_masks  # noqa: E402


def last_logits(model, batch):
    out = model(batch)
    return (out.logits if hasattr(out, "logits") else out)[:, -1]


def test_mean_ablation_on_fused_qkv_gives_the_mean_input_term():
    model = BUILDERS["gpt2"]()
    layer = model.transformer.h[0].attn.c_attn
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("in", i[0]) or None)
    with torch.no_grad():
        model(TOKENS)
    handle.remove()
    mean_in = captured["in"].reshape(-1, captured["in"].shape[-1]).mean(0)
    masks = {
        f"blocks.0.attn.W_{x}": torch.zeros(
            si.targets(model)[f"blocks.0.attn.W_{x}"].shape, dtype=torch.bool
        )
        for x in "QKV"
    }
    with torch.no_grad(), si.masked(model, masks, ablation=si.MeanAblation([TOKENS])):
        # registered after the ablation's own hook, so it sees the ablated output
        handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o) or None)
        try:
            model(TOKENS)
        finally:
            handle.remove()
    expected = mean_in @ layer.weight + layer.bias
    torch.testing.assert_close(
        captured["out"], expected.expand_as(captured["out"]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("wrapper", ["hf", "bridge"])
def test_ablation_effect_runs_on_gpt2(wrapper):
    model = BUILDERS["gpt2"]()
    if wrapper == "bridge":
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        model = build_bridge_from_module(model, "GPT2LMHeadModel", hf_config=model.config).eval()
    gen = torch.Generator().manual_seed(0)
    sub = si.Subnetwork(
        {n: torch.rand(t.shape, generator=gen) < 0.9 for n, t in si.targets(model).items()}
    )
    before = snapshot(model)
    report = ablation_effect(
        model,
        sub,
        kl_to_full(last_logits),
        [TOKENS],
        controls=3,
        ablation=si.MeanAblation([TOKENS]),
    )
    assert report.full == pytest.approx(0.0, abs=1e-6)
    assert report.kept < report.removed
    assert_bit_exact(model, before)


def test_overlap_test_between_random_gpt2_masks_is_not_significant():
    a = si.Subnetwork(random_masks(BUILDERS["gpt2"](), seed=1))
    b = si.Subnetwork(random_masks(BUILDERS["gpt2"](), seed=2))
    assert overlap_test(a, b).p_value > 0.01
    assert overlap_test(a, a).p_value < 1e-12
