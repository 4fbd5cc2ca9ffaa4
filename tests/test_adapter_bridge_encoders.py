"""TransformerBridge of BERT, RoBERTa and ViT: the Hugging Face adapter's targets (names, order,
shapes, axes, fingerprint), and one mask gives the masked transformers model's outputs."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

pytest.importorskip("transformers")
sources = pytest.importorskip("transformer_lens.model_bridge.sources")
from _hf_models import PIXELS, TOKENS, VOCAB, encoder, random_masks  # noqa: E402

# the encoder classes transformer-lens 4.3 builds a bridge of (not BertModel, RobertaModel or
# the sequence classifiers: "Unsupported architecture")
KINDS = ["bert_mlm", "roberta_mlm", "vit", "vit_cls"]


def bridge_of(model):
    return sources.build_bridge_from_module(
        model, type(model).__name__, hf_config=model.config
    ).eval()


def outputs(kind, model):
    """Logits (last hidden state of a ViTModel) of a transformers model or a bridge."""
    inputs = PIXELS if kind.startswith("vit") else TOKENS % (VOCAB - 2) + 2
    out = model(inputs)
    if isinstance(out, torch.Tensor):  # a bridge
        return out
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_the_bridge_has_the_hf_targets_and_fingerprint(kind):
    """Every target (the non-default embeddings and read-outs, ``token_type_embed`` and
    ``mlm_head`` of BERT, ``embed.W_patch`` / ``embed.W_cls`` of ViT, the biases and norms
    included) has the transformers model's name, place in the order, shape and axes."""
    hf, bridge = encoder(kind), bridge_of(encoder(kind))
    ours = si.targets(bridge, include="*", biases=True)
    theirs = si.targets(hf, include="*", biases=True)
    assert list(ours) == list(theirs)
    assert [(t.shape, t.axes, t.default) for t in ours.values()] == [
        (t.shape, t.axes, t.default) for t in theirs.values()
    ]
    assert si.fingerprint(bridge) == si.fingerprint(hf)


@pytest.mark.parametrize("kind", KINDS)
def test_one_mask_gives_the_masked_hf_outputs_and_restores_the_bridge(kind):
    hf, bridge = encoder(kind), bridge_of(encoder(kind))
    masks = si.Subnetwork(random_masks(hf, include="*"))
    before = snapshot(bridge)
    with torch.no_grad():
        with si.masked(hf, masks):
            expected = outputs(kind, hf)
        with si.masked(bridge, masks):
            got = outputs(kind, bridge)
        plain = outputs(kind, bridge)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert_bit_exact(bridge, before)
