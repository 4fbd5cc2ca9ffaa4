"""Opt-in bias and norm-weight targets (``si.targets(model, biases=True)``) of a TransformerLens 4
``TransformerBridge``: the Hugging Face adapter's names, shapes and axes for the model the bridge
wraps, on the tensors the bridge computes with, so a bias mask found on the transformers model
gives the same logits on the bridge, also with hooks and caches, and restores exactly."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp.adapters import OPTIONAL_KINDS

pytest.importorskip("transformers")
sources = pytest.importorskip("transformer_lens.model_bridge.sources")

import test_adapter_encoders as encoders  # noqa: E402
import test_adapter_seq2seq_moe as seq2seq_moe  # noqa: E402
from _hf_models import (  # noqa: E402
    BUILDERS,
    DECODER_CLASSES,
    TOKENS,
    decoder,
    encoder,
    hand_zeroed_biases,
)
from test_adapter_biases_all import randomized  # noqa: E402

from subnet_interp._fingerprint import read_canonical  # noqa: E402

SEQ2SEQ = ("t5", "bart")
KINDS = [*BUILDERS, *DECODER_CLASSES, "mixtral", "qwen2_moe", "qwen3_moe", *SEQ2SEQ]
# families whose reference is hand_zeroed_biases (written from the transformers forward)
HAND_ZEROED = ["gpt2", "neox", "llama", "qwen2", "gemma", "gemma2", "opt"]


def build(kind):
    """A tiny ``kind`` model with random biases and norm weights (so masks on them show)."""
    if kind in BUILDERS:
        return randomized(BUILDERS[kind]())
    if kind in DECODER_CLASSES:
        return decoder(kind)
    if kind == "bert":
        return randomized(encoder("bert_mlm"))
    return randomized(seq2seq_moe.build(kind))


def bridge_of(model):
    return sources.build_bridge_from_module(
        model, type(model).__name__, hf_config=model.config
    ).eval()


def logits(kind, model):
    """Logits of a transformers model or a bridge (an encoder-decoder's bridge takes
    ``decoder_input``)."""
    if kind in SEQ2SEQ:
        source, target = seq2seq_moe.SOURCE, seq2seq_moe.TARGET
        if "original_model" in model.__dict__:  # a bridge
            return model(source, decoder_input=target)
        return model(input_ids=source, decoder_input_ids=target).logits
    out = model(encoders.TOKENS if kind == "bert" else TOKENS)
    return out.logits if hasattr(out, "logits") else out


def bias_targets(model):
    return {n: t for n, t in si.targets(model, biases=True).items() if t.kind in OPTIONAL_KINDS}


def random_bias_masks(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    targets = bias_targets(model)
    return {n: torch.rand(t.shape, generator=gen) < 0.6 for n, t in targets.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_the_bridge_has_the_hf_bias_names_layouts_and_values(kind):
    """Same names in the same order, shapes, axes and kinds as on the transformers model; each
    canonical tensor of the bridge equals the transformers model's (same weights), is a view of
    the bridge's real tensor and writes back to it exactly; biases stay out of the default
    selection and of the fingerprint."""
    bridge, hf = bridge_of(build(kind)), build(kind)
    ours, theirs = bias_targets(bridge), bias_targets(hf)
    assert ours and list(ours) == list(theirs)
    describe = lambda t: (t.shape, t.axes, t.kind, t.default)  # noqa: E731
    assert {n: describe(t) for n, t in ours.items()} == {n: describe(t) for n, t in theirs.items()}
    root = si.adapters.resolve(bridge).root(bridge)
    for name, target in ours.items():
        real = si.adapters.real_tensor(root.get_submodule(target.module), target.attribute)
        view = target.layout.to_canonical(real)
        assert view.untyped_storage().data_ptr() == real.untyped_storage().data_ptr(), name
        assert torch.equal(view, read_canonical(hf, theirs[name])), name
        written = target.layout.write_real(view.detach().clone(), torch.zeros_like(real))
        assert torch.equal(written, real), name
    assert not set(ours) & set(si.targets(bridge))
    assert si.fingerprint(bridge) == si.fingerprint(hf)


@pytest.mark.parametrize("kind", HAND_ZEROED)
def test_a_random_bias_mask_on_the_bridge_is_the_hand_zeroed_model_with_hooks_and_cache(kind):
    """A random mask over every bias and norm target: the masked bridge's logits, its cache
    (queries, a norm's output) and a run with a user hook are those of a bridge of the same
    model with the entries zeroed by hand (``hand_zeroed_biases``, written from the
    transformers forward); every parameter and buffer is bit-exact afterwards."""
    bridge = bridge_of(build(kind))
    masks = si.Subnetwork(random_bias_masks(bridge))
    names = ["blocks.1.attn.hook_q", "blocks.1.ln1.hook_out", "ln_final.hook_out"]

    def halve(value, hook):
        return value * 0.5

    hooks = [("blocks.0.mlp.hook_out", halve)]
    before = snapshot(bridge)
    with torch.no_grad():
        plain = logits(kind, bridge)
        with si.masked(bridge, masks):
            got = logits(kind, bridge)
            _, cache = bridge.run_with_cache(TOKENS, names_filter=names)
            hooked = bridge.run_with_hooks(TOKENS, fwd_hooks=hooks)
    assert_bit_exact(bridge, before)
    reference = build(kind)
    hand_zeroed_biases(kind, reference, masks.masks)
    with torch.no_grad():
        expected = logits(kind, reference)
        reference_bridge = bridge_of(reference)
        _, expected_cache = reference_bridge.run_with_cache(TOKENS, names_filter=names)
        expected_hooked = reference_bridge.run_with_hooks(TOKENS, fwd_hooks=hooks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(cache[name], expected_cache[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, expected_hooked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the mask did act


@pytest.mark.parametrize("kind", KINDS)
def test_a_bias_mask_found_on_the_hf_model_gives_its_logits_on_the_bridge(kind):
    """A magnitude mask found on the transformers model over its bias and norm targets (its
    meta carries that model's fingerprint) is accepted by the bridge and gives the masked
    transformers model's logits."""
    hf = build(kind)
    targets = bias_targets(hf)
    data = [None]  # magnitude reads the weights only
    method = si.methods.create("magnitude", density=0.5)
    found = si.find(hf, method, lambda m, b: None, data, targets=targets, progress=False)
    bridge = bridge_of(build(kind))
    with torch.no_grad():
        with si.masked(hf, found.subnetwork):
            expected = logits(kind, hf)
        with si.masked(bridge, found.subnetwork):
            got = logits(kind, bridge)
        plain = logits(kind, bridge)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_the_bridge_bias_targets_pass_the_conformance_kit(kind):
    """Round trip, all-ones / all-zeros, a random mask equal to zeroing the real tensors' entries
    by hand, restore also after an exception, fingerprint and ``si.find`` training through the
    bridge, on the bias and norm targets only."""
    bridge = bridge_of(build(kind))

    def forward(model, inputs):
        return logits(kind, model)

    names = list(bias_targets(bridge))
    report = si.testing.check_adapter(bridge, TOKENS, forward=forward, include=names, biases=True)
    assert list(report.targets) == names
    assert report.passed[-1] == "find"


def test_a_bert_bridge_has_the_hf_bias_targets_and_their_masked_logits():
    """BERT (whose weight targets test_adapter_bridge_encoders checks): its bias and norm
    targets, the embedding LayerNorm ``embed.ln`` (the bridge's ``embed_ln``) included, are the
    HF model's, and one random mask over them gives the masked HF model's logits."""
    bridge, hf = bridge_of(build("bert")), build("bert")
    ours, theirs = bias_targets(bridge), bias_targets(hf)
    assert "embed.ln.w" in ours and list(ours) == list(theirs)
    assert [(t.shape, t.axes) for t in ours.values()] == [
        (t.shape, t.axes) for t in theirs.values()
    ]
    masks = random_bias_masks(hf)
    with torch.no_grad():
        with si.masked(hf, masks):
            expected = logits("bert", hf)
        with si.masked(bridge, masks):
            got = logits("bert", bridge)
        plain = logits("bert", bridge)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)
