"""head_scores / neuron_scores / edge_scores of encoder-decoders (T5, BART): one
``[layer, unit]`` tensor per attention kind or MLP stack, keyed so that encoder, decoder
self-attention and cross-attention heads of the same (layer, head) are told apart."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import edge_scores, head_scores, neuron_scores, top_heads

transformers = pytest.importorskip("transformers")
from test_adapter_seq2seq_moe import HEADS, LAYERS, build  # noqa: E402

GROUPS = ("encoder.attn", "decoder.attn", "decoder.cross_attn")


def random_masks(model, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=gen) < density for n, t in si.targets(model).items()}


def ones(model):
    return {n: torch.ones(t.shape, dtype=torch.bool) for n, t in si.targets(model).items()}


def canonical(group, layer):
    stack, kind = group.split(".")
    return f"{stack}.blocks.{layer}.{kind}"


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_a_planted_cross_attention_head_gets_the_top_score(kind):
    model = build(kind)
    masks = random_masks(model)
    for letter in "QKVO":
        masks[f"decoder.blocks.1.cross_attn.W_{letter}"][2] = True  # head 2, whole
    scores = head_scores(model, si.Subnetwork(masks))
    assert set(scores) == set(GROUPS)
    assert all(s.shape == (LAYERS, HEADS) for s in scores.values())
    assert top_heads(scores, 1) == [("decoder.cross_attn", 1, 2, 1.0)]
    assert float(scores["encoder.attn"][1, 2]) < 0.7 and float(scores["decoder.attn"][1, 2]) < 0.7


@pytest.mark.parametrize("group", GROUPS)
def test_a_removed_head_scores_zero_in_its_own_attention_kind_only(group):
    model = build("t5")
    masks = ones(model)
    for letter in "QKVO":
        masks[f"{canonical(group, 0)}.W_{letter}"][1] = False
    scores = head_scores(model, si.Subnetwork(masks), count_zeros=True)
    for other, matrix in scores.items():
        expected = torch.ones(LAYERS, HEADS)
        if other == group:
            expected[0, 1] = 0
        assert torch.equal(matrix, expected), other


def _hand_neuron_scores(model, kind, masks):
    """Weighted kept fraction per neuron, read from the transformers modules: each neuron's
    input rows (``wi_0`` / ``wi_1`` or ``fc1``) and output column (``wo`` or ``fc2``)."""
    expected = {}
    for stack in ("encoder", "decoder"):
        rows = []
        for layer in range(LAYERS):
            if kind == "t5":
                dense = getattr(model, stack).block[layer].layer[-1].DenseReluDense
                inputs = {"W_gate": dense.wi_0, "W_in": dense.wi_1}
                output = dense.wo
            else:
                block = getattr(model.model, stack).layers[layer]
                inputs, output = {"W_in": block.fc1}, block.fc2
            name = f"{stack}.blocks.{layer}.mlp"
            kept = sum(
                (linear.weight.abs() * masks[f"{name}.{w}"].T).sum(1)
                for w, linear in inputs.items()
            )
            total = sum(linear.weight.abs().sum(1) for linear in inputs.values())
            kept = kept + (output.weight.abs() * masks[f"{name}.W_out"].T).sum(0)
            total = total + output.weight.abs().sum(0)
            rows.append((kept / total).detach())
        expected[f"{stack}.mlp"] = torch.stack(rows)
    return expected


@pytest.mark.parametrize("kind", ["t5", "bart"])  # T5's gated MLP (W_gate, W_in), BART's plain
def test_neuron_scores_weigh_each_neuron_s_rows_and_column_in_each_stack(kind):
    model = build(kind)
    masks = random_masks(model, seed=3)
    masks["decoder.blocks.1.mlp.W_out"][5] = False  # neuron 5 writes nothing
    scores = neuron_scores(model, si.Subnetwork(masks), weighted=True)
    expected = _hand_neuron_scores(model, kind, masks)
    assert set(scores) == set(expected)
    for group, matrix in expected.items():
        torch.testing.assert_close(scores[group], matrix.float(), atol=1e-5, rtol=1e-5)
    assert float(scores["decoder.mlp"][1, 5]) < float(scores["encoder.mlp"][1, 5])


def test_edge_scores_pair_the_heads_that_read_each_other_s_stream():
    model = build("bart")
    masks = random_masks(model, density=0.7, seed=1)
    masks["encoder.blocks.1.attn.W_O"][3] = False  # encoder head 1.3 writes nothing
    sub = si.Subnetwork(masks)
    by_kind = {kind: edge_scores(model, sub, kind) for kind in "qkv"}
    assert set(by_kind["q"]) == {
        ("encoder.attn", "encoder.attn"), ("decoder.attn", "decoder.attn"),
        ("decoder.attn", "decoder.cross_attn"), ("decoder.cross_attn", "decoder.attn"),
        ("decoder.cross_attn", "decoder.cross_attn"),
    }  # fmt: skip
    assert ("encoder.attn", "decoder.cross_attn") in by_kind["k"]
    assert ("decoder.attn", "decoder.cross_attn") not in by_kind["k"]
    into_cross = by_kind["k"][("encoder.attn", "decoder.cross_attn")]
    assert torch.all(into_cross[1, 3] == 0) and torch.all(into_cross[0] > 0)
    self_then_cross = by_kind["q"][("decoder.attn", "decoder.cross_attn")]
    assert not torch.isnan(self_then_cross[1, :, 1]).any()  # same block: self-attention first
    assert torch.isnan(self_then_cross[1, :, 0]).all()

    def weight(name, letter):
        target = si.targets(model)[f"{name}.W_{letter}"]
        real = model.get_submodule(target.module).weight
        return target.layout.to_canonical(real).detach().double() * masks[f"{name}.W_{letter}"]

    source, reader = "encoder.blocks.0.attn", "decoder.blocks.1.cross_attn"
    for a, b in ((0, 1), (2, 3)):
        ov = weight(source, "V")[a] @ weight(source, "O")[a]
        qk = weight(reader, "Q")[b] @ weight(reader, "K")[b].T
        expected = torch.linalg.norm(ov @ qk.T) / (torch.linalg.norm(ov) * torch.linalg.norm(qk))
        assert float(into_cross[0, a, 1, b]) == pytest.approx(float(expected), rel=1e-4)


def test_graph_edge_scores_refuse_an_encoder_decoder_and_say_what_to_use():
    with pytest.raises(ValueError, match=r"two, with the attention kinds .*edge_scores\(model"):
        si.analysis.graph_edge_scores(build("t5"), None)


def test_the_bridge_scores_heads_as_the_transformers_model_does():
    sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    hf, wrapped = build("t5"), build("t5")
    bridge = sources.build_bridge_from_module(
        wrapped, type(wrapped).__name__, hf_config=wrapped.config
    )
    sub = si.Subnetwork(random_masks(hf, seed=4))
    on_hf, on_bridge = head_scores(hf, sub), head_scores(bridge, sub)
    assert list(on_bridge) == list(on_hf)
    assert all(torch.equal(on_bridge[g], on_hf[g]) for g in on_hf)


def test_the_html_report_shows_each_attention_kind_and_stack():
    model = build("t5")
    page = si.analysis.html_report(model, si.Subnetwork(random_masks(model)))
    for group in GROUPS:
        assert f"kept fraction of each {group} head" in page
    assert "each encoder.mlp MLP neuron" in page and "each decoder.mlp MLP neuron" in page


def test_the_head_density_plot_has_one_panel_per_attention_kind():
    plt = pytest.importorskip("matplotlib.pyplot")
    model = build("bart")
    figure = si.analysis.plot_densities(model, si.Subnetwork(random_masks(model)), by="head")
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    plt.close(figure)
    assert titles == [f"kept fraction per {group} head" for group in GROUPS]


def test_compare_to_circuit_refuses_the_per_kind_dict_and_names_the_key_to_pass():
    """A circuit's heads (``blocks.L.attn.head.H``) name no stack: the dict is refused with its
    keys and the tensor to pass instead, which compares as any ``[layer, head]`` tensor does."""
    model = build("t5")
    masks = ones(model)
    for letter in "QKVO":
        masks[f"decoder.blocks.1.attn.W_{letter}"][2] = False
    scores = head_scores(model, si.Subnetwork(masks), count_zeros=True)
    circuit = si.analysis.Circuit.from_heads([(1, 2)])
    with pytest.raises(
        TypeError, match=r"keyed by sub-layer kind.*'decoder\.cross_attn'.*scores\["
    ):
        si.analysis.compare_to_circuit(scores, circuit)
    result = si.analysis.compare_to_circuit(-scores["decoder.attn"], circuit, k=1)
    assert result.auc == 1.0 and result.overlap == 1
