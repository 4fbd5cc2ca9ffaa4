"""Opt-in bias and norm-weight targets (``si.targets(model, biases=True)``) of every Hugging
Face family: each passes the conformance kit, covers every bias / norm parameter of the
blocks, and GPT-NeoX's interleaved biases and Gemma's ``(1 + w)`` norms are what they say."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si

transformers = pytest.importorskip("transformers")
import test_adapter_seq2seq_moe as seq2seq_moe  # noqa: E402
from _hf_models import D_HEAD, HEADS, PIXELS, TOKENS, VOCAB, decoder, encoder, neox  # noqa: E402

from subnet_interp.adapters.hf import BIAS_FAMILIES, FAMILIES  # noqa: E402

ENCODER_TOKENS = TOKENS % (VOCAB - 2) + 2  # off BERT's and RoBERTa's special ids


def randomized(model):
    """``model`` with random biases and norm weights (transformers sets them to constants), so
    that masks on them change the output."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name or "norm" in name.lower():
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def seq2seq_forward(model, batch):
    return model(input_ids=batch[0], decoder_input_ids=batch[1]).logits


def vit_forward(model, batch):
    return model(pixel_values=batch).logits


# kind -> (build, inputs, forward, names that must be targets, names that must not)
CASES = {
    "neox": (neox, TOKENS, None, ["blocks.0.attn.b_K", "blocks.1.mlp.b_in", "ln_final.b"], []),
    "opt": (
        lambda: decoder("opt"),
        TOKENS,
        None,
        ["blocks.0.attn.b_V", "blocks.1.mlp.b_out", "blocks.0.ln2.b", "ln_final.w"],
        [],
    ),
    "phi3": (lambda: decoder("phi3"), TOKENS, None, ["blocks.0.ln1.w"], ["blocks.0.attn.b_Q"]),
    "gemma": (lambda: decoder("gemma"), TOKENS, None, ["blocks.1.ln2.w", "ln_final.w"], []),
    "gemma2": (
        lambda: decoder("gemma2"),
        TOKENS,
        None,
        ["blocks.0.ln1_post.w", "blocks.0.ln2.w", "blocks.1.ln2_post.w"],
        ["blocks.0.ln1.b"],
    ),
    "bert": (
        lambda: encoder("bert_mlm"),
        ENCODER_TOKENS,
        None,
        ["blocks.0.attn.b_O", "blocks.1.ln2.b", "embed.ln.w"],
        [],
    ),
    "roberta": (
        lambda: encoder("roberta_cls"),
        ENCODER_TOKENS,
        None,
        ["blocks.1.attn.b_Q", "blocks.0.ln1.w"],
        [],
    ),
    "vit": (
        lambda: encoder("vit_cls"),
        PIXELS,
        vit_forward,
        ["blocks.0.mlp.b_in", "blocks.1.ln1.b", "ln_final.w"],
        [],
    ),
    "t5": (
        lambda: seq2seq_moe.build("t5"),
        (seq2seq_moe.SOURCE, seq2seq_moe.TARGET),
        seq2seq_forward,
        ["encoder.blocks.0.ln2.w", "decoder.blocks.1.ln_cross.w", "decoder.ln_final.w"],
        ["encoder.blocks.0.attn.b_Q", "decoder.blocks.0.ln1.b"],
    ),
    "bart": (
        lambda: seq2seq_moe.build("bart"),
        (seq2seq_moe.SOURCE, seq2seq_moe.TARGET),
        seq2seq_forward,
        ["decoder.blocks.0.cross_attn.b_K", "decoder.blocks.1.ln_cross.b", "encoder.embed.ln.w"],
        [],
    ),
    "mbart": (
        lambda: seq2seq_moe.build("mbart"),
        (seq2seq_moe.SOURCE, seq2seq_moe.TARGET),
        seq2seq_forward,
        ["encoder.blocks.0.ln1.b", "encoder.ln_final.w", "decoder.ln_final.b"],
        [],
    ),
    "mixtral": (lambda: seq2seq_moe.build("mixtral"), TOKENS, None, ["blocks.1.ln2.w"], []),
    "qwen2_moe": (
        lambda: seq2seq_moe.build("qwen2_moe"),
        TOKENS,
        None,
        ["blocks.1.attn.b_K", "ln_final.w"],
        [],
    ),
    "qwen3_moe": (
        lambda: seq2seq_moe.build("qwen3_moe"),
        TOKENS,
        None,
        ["blocks.0.attn.q_norm.w", "blocks.1.attn.k_norm.w"],
        [],
    ),
}

# bias / norm parameters that are not block or final-norm targets: read-outs, T5's
# relative-position tables (an embedding target), ViT's patch projection
NOT_TARGETS = ("cls.", "classifier.", "lm_head", "pooler.", "relative_attention_bias", "patch_")


def test_every_registered_family_has_bias_targets():
    assert set(BIAS_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("kind", list(CASES))
def test_bias_and_norm_targets_pass_the_conformance_kit(kind):
    build, inputs, forward, present, absent = CASES[kind]
    model = randomized(build())
    report = si.testing.check_adapter(model, inputs, forward=forward, biases=True)
    names = set(report.targets)
    assert set(present) <= names
    assert not set(absent) & names
    assert report.passed[-1] == "find"


@pytest.mark.parametrize(
    "kind", ["neox", "opt", "gemma2", "bert", "vit", "t5", "bart", "mbart", "qwen3_moe"]
)
def test_every_bias_and_norm_parameter_of_the_blocks_is_a_target(kind):
    model = CASES[kind][0]()
    targets = si.targets(model, biases=True)
    covered = {(t.module, t.attribute) for t in targets.values() if t.kind in ("bias", "norm")}
    expected = set()
    for name, _ in model.named_parameters():
        module, attribute = name.rsplit(".", 1)
        is_norm = "norm" in module.lower() and attribute in ("weight", "bias")
        if (attribute == "bias" or is_norm) and not any(s in name for s in NOT_TARGETS):
            expected.add((module, attribute))
    assert expected and covered == expected


def test_neox_bias_targets_are_the_interleaved_per_head_slices():
    model = randomized(neox())
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    original = qkv.bias.detach().clone()
    targets = si.targets(model, include="blocks.0.attn.b_*", biases=True)
    # the forward splits the fused output per head as [q | k | v], each D_HEAD wide
    for index, letter in enumerate("QKV"):
        view = targets[f"blocks.0.attn.b_{letter}"].layout.to_canonical(qkv.bias.data)
        assert view.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
        for head in range(HEADS):
            start = (head * 3 + index) * D_HEAD
            assert torch.equal(view[head], original[start : start + D_HEAD])
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in targets.items()}
    masks["blocks.0.attn.b_K"][2] = False  # key bias of head 2
    expected = original.clone()
    expected[(2 * 3 + 1) * D_HEAD : (2 * 3 + 2) * D_HEAD] = 0
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        assert torch.equal(qkv.bias, expected)
    assert torch.equal(qkv.bias, original)


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_a_zeroed_gemma_norm_weight_scales_by_one(kind):
    model = decoder(kind)
    norm = model.model.layers[0].input_layernorm
    hidden = torch.randn(2, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(3))
    plain = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.eps)
    targets = si.targets(model, include="blocks.0.ln1.w", biases=True)
    zeros = si.Subnetwork(
        {"blocks.0.ln1.w": torch.zeros(targets["blocks.0.ln1.w"].shape, dtype=torch.bool)}
    )
    with torch.no_grad():
        before = norm(hidden)
        with si.masked(model, zeros):
            masked = norm(hidden)
    assert not torch.allclose(before, plain, atol=1e-3)  # the random weight scales
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
