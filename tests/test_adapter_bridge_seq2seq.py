"""TransformerLens 4 ``TransformerBridge`` of T5 (gated and plain MLP) and BART: the Hugging Face
adapter's targets on the ``nn.Linear`` layers the bridge computes with, so masks give the same
logits on the bridge as on an identical transformers model, restore exactly and train."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from test_adapter_seq2seq_moe import (
    LAYERS,
    SEQ2SEQ,
    SOURCE,
    TARGET,
    build,
    outputs,
    random_masks,
)

import subnet_interp as si
from subnet_interp import adapters
from subnet_interp._fingerprint import read_canonical
from subnet_interp._hidden import read_hidden

sources = pytest.importorskip("transformer_lens.model_bridge.sources")


def bridge_and_twin(kind):
    """A bridge of ``build(kind)`` and a second, identical transformers model (the bridge takes
    over the model it wraps, replacing its modules by its components)."""
    hf = build(kind)
    bridge = sources.build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config)
    return bridge.eval(), build(kind)


def logits(model, source=SOURCE, target=TARGET):
    """Decoder logits of an encoder-decoder: the bridge takes ``decoder_input``."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "encoder_blocks"):
        return model(source, decoder_input=target)
    return outputs("t5", model, source, target)


def description(target):
    return target.shape, target.axes, target.layout, target.default, target.kind, target.unit_axes


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_the_bridge_has_the_hf_targets_layouts_and_fingerprint(kind):
    bridge, hf = bridge_and_twin(kind)
    for include in (None, "*"):
        on_bridge, on_hf = si.targets(bridge, include=include), si.targets(hf, include=include)
        assert list(on_bridge) == list(on_hf)
        assert {n: description(t) for n, t in on_bridge.items()} == {
            n: description(t) for n, t in on_hf.items()
        }
    root = adapters.resolve(bridge).root(bridge)
    for name, target in si.targets(bridge, include="*").items():
        canonical = read_canonical(root, target)
        assert torch.equal(canonical, read_canonical(hf, si.targets(hf, include="*")[name]))
    assert si.fingerprint(bridge) == si.fingerprint(hf)
    blocks = adapters.resolve(bridge).blocks(bridge)
    assert blocks == [*bridge.encoder_blocks, *bridge.decoder_blocks]


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_a_random_mask_gives_the_same_logits_on_the_bridge_and_hf(kind):
    bridge, hf = bridge_and_twin(kind)
    masks = si.Subnetwork(random_masks(hf))
    with torch.no_grad():
        unmasked = logits(bridge)
        torch.testing.assert_close(unmasked, logits(hf), atol=1e-6, rtol=1e-6)
        with si.masked(bridge, masks), si.masked(hf, masks):
            on_bridge, on_hf = logits(bridge), logits(hf)
    assert not torch.allclose(on_bridge, unmasked, atol=1e-3)
    torch.testing.assert_close(on_bridge, on_hf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "mt5", "bart", "mbart"])
def test_a_cross_attention_head_mask_is_the_same_on_the_bridge_and_hf(kind):
    bridge, hf = bridge_and_twin(kind)
    layer, head = 1, 2
    masks = {}
    for letter in "QKVO":
        target = si.targets(hf)[f"decoder.blocks.{layer}.cross_attn.W_{letter}"]
        masks[target.name] = torch.ones(target.shape, dtype=torch.bool)
        masks[target.name][head] = False
    with torch.no_grad():
        unmasked = logits(bridge)
        with si.masked(bridge, masks), si.masked(hf, masks):
            on_bridge, on_hf = logits(bridge), logits(hf)
    assert not torch.allclose(on_bridge, unmasked, atol=1e-4)
    torch.testing.assert_close(on_bridge, on_hf, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_the_bridge_is_restored_bit_exactly_also_on_exception(kind):
    bridge, hf = bridge_and_twin(kind)
    before = snapshot(bridge)
    parameters = dict(bridge.named_parameters())
    sub = si.Subnetwork(random_masks(hf))
    with torch.no_grad(), si.masked(bridge, sub):
        logits(bridge)
    assert_bit_exact(bridge, before)
    with pytest.raises(RuntimeError, match="boom"), si.masked(bridge, sub):
        raise RuntimeError("boom")
    assert_bit_exact(bridge, before)
    after = dict(bridge.named_parameters())
    assert list(after) == list(parameters) and all(after[n] is p for n, p in parameters.items())


@pytest.mark.parametrize("kind", ["t5_relu", "bart"])
def test_the_bridge_passes_the_conformance_kit(kind):
    # every target, the tied token embeddings and unembedding too (each masked at its own read)
    bridge, _ = bridge_and_twin(kind)
    report = si.testing.check_adapter(
        bridge, (SOURCE, TARGET), include="*",
        forward=lambda model, batch: logits(model, *batch),
    )  # fmt: skip
    assert report.passed[-1] == "find"


def next_token_loss(model, batch):
    source, target = batch
    scores = logits(model, source, target)[:, :-1]
    return torch.nn.functional.cross_entropy(scores.flatten(0, 1), target[:, 1:].flatten())


@pytest.mark.parametrize("kind", ["t5", "mbart"])  # mT5 has T5's layout
def test_find_trains_through_the_bridge_as_through_hf(kind):
    bridge, hf = bridge_and_twin(kind)
    before = snapshot(bridge)
    data = [(SOURCE.repeat(2, 1), TARGET.repeat(2, 1))]  # gumbel_sigmoid splits the batch in 4
    results = [
        si.find(
            model,
            "gumbel_sigmoid",
            next_token_loss,
            data,
            steps=2,
            progress=False,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        for model in (bridge, hf)
    ]
    assert_bit_exact(bridge, before)
    on_bridge, on_hf = (result.scores for result in results)
    assert list(on_bridge) == list(si.targets(hf))
    # the penalty moves every score alike; only the loss's gradient makes a target's scores differ
    assert [n for n, s in on_bridge.items() if bool((s == s.flatten()[0]).all())] == []
    for name, score in on_bridge.items():
        torch.testing.assert_close(score, on_hf[name], atol=1e-5, rtol=1e-5)


def test_a_renamed_module_inside_the_bridge_is_named_in_the_error():
    bridge, _ = bridge_and_twin("t5")
    bridge.decoder_blocks[1].cross_attn.k = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration \(inside a TransformerLens"):
        si.targets(bridge)


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_block_indices_name_the_same_hidden_states_on_the_bridge_and_hf(kind):
    # both adapters list the encoder's blocks, then the decoder's: index L reads the same state
    bridge, hf = bridge_and_twin(kind)
    blocks = adapters.resolve(hf).blocks(hf)
    assert len(blocks) == len(adapters.resolve(bridge).blocks(bridge)) == 2 * LAYERS
    with torch.no_grad():
        for layer in range(len(blocks)):
            on_hf = read_hidden(hf, layer, {"input_ids": SOURCE, "decoder_input_ids": TARGET})
            on_bridge = read_hidden(bridge, layer, {"input": SOURCE, "decoder_input": TARGET})
            assert on_hf.shape[1] == (SOURCE if layer < LAYERS else TARGET).shape[1]
            torch.testing.assert_close(on_bridge, on_hf, atol=1e-6, rtol=1e-6)


def test_a_probe_at_a_decoder_block_index_masks_the_encoder_and_the_decoder_up_to_it():
    from subnet_interp._types import stack_position
    from subnet_interp.probing import subnetwork_probe

    bridge, hf = bridge_and_twin("t5")
    labels = torch.randint(0, 3, (4, TARGET.shape[1]), generator=torch.Generator().manual_seed(0))
    masked = []
    for model, keys in (
        (hf, ("input_ids", "decoder_input_ids")),
        (bridge, ("input", "decoder_input")),
    ):
        inputs = dict(zip(keys, (SOURCE.repeat(2, 1), TARGET.repeat(2, 1)), strict=True))
        result = subnetwork_probe(model, LAYERS, [(inputs, labels)], 3, steps=2, progress=False)
        masked.append({stack_position(name)[:2] for name in result.subnetwork.names})
    # block index LAYERS is the decoder's first block, which reads every encoder block
    assert masked == [{("encoder", 0), ("encoder", 1), ("decoder", 0)}] * 2
