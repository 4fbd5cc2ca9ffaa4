"""Mean, resample and patch ablation on mixture-of-experts routers and fused experts (Mixtral,
Qwen2-MoE, Qwen3-MoE): each equals a reference written by hand from transformers' own modules,
and the model is bit-exactly restored."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from test_adapter_seq2seq_moe import SOURCE, VOCAB, build
from torch.nn import functional as F

import subnet_interp as si

pytest.importorskip("transformers")

LAYER, EXPERT = 1, 2
REFERENCE = [torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))]
TWIN = torch.randint(2, VOCAB, SOURCE.shape, generator=torch.Generator().manual_seed(7))


def filled(model, include, value=False):
    found = si.targets(model, include=include)
    return {name: torch.full(t.shape, value, dtype=torch.bool) for name, t in found.items()}


def zeros(model, include):
    return filled(model, include)


def logits(model, tokens=SOURCE):
    with torch.no_grad():
        return model(tokens).logits


def block_output(model, tokens):
    """The sparse-MoE block's output of layer LAYER on ``tokens``."""
    seen = []
    block = model.model.layers[LAYER].mlp
    handle = block.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        logits(model, tokens)
    finally:
        handle.remove()
    return seen[0]


def expert_out(experts, x):
    gate, up = F.linear(x, experts.gate_up_proj[EXPERT]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[EXPERT])


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_mean_ablated_expert_gives_its_mean_output_over_the_tokens_routed_to_it(kind):
    model = build(kind)
    before = snapshot(model)
    experts = model.model.layers[LAYER].mlp.experts
    masks = zeros(model, f"blocks.{LAYER}.mlp.experts.{EXPERT}.*")
    assert len(masks) == 3
    with torch.no_grad(), si.masked(model, masks, ablation=si.MeanAblation(REFERENCE)):
        got = logits(model)
    assert_bit_exact(model, before)
    assert not experts._forward_hooks and not experts.__dict__.get("_subnet_interp_moe_ablation")

    routed = []  # the expert's outputs on the reference tokens routed to it, by hand

    def record(module, args):
        hidden, index, _ = args
        routed.append(expert_out(experts, hidden[(index == EXPERT).any(-1)]))

    handle = experts.register_forward_pre_hook(record)
    logits(model, REFERENCE[0])
    handle.remove()
    mean = torch.cat(routed).mean(0)

    def swap(module, args, output):  # each routed token: the mean instead of the expert's output
        hidden, index, weights = args
        share = (weights * (index == EXPERT)).sum(-1, keepdim=True)
        return output + share * (mean - expert_out(experts, hidden))

    handle = experts.register_forward_hook(swap)
    with torch.no_grad():
        expected = logits(model)
    handle.remove()
    assert not torch.allclose(got, logits(model), atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mean_ablated_router_routes_every_token_as_the_mean_input(kind):
    model = build(kind)
    router = model.model.layers[LAYER].mlp.gate
    masks = zeros(model, f"blocks.{LAYER}.mlp.W_router")
    with torch.no_grad(), si.masked(model, masks, ablation=si.MeanAblation(REFERENCE)):
        got = logits(model)
    inputs = []
    handle = router.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    logits(model, REFERENCE[0])
    handle.remove()
    mean = torch.cat(inputs).mean(0)
    # the router's own softmax / top-k on W E[x]: every token routed as the mean input
    handle = router.register_forward_pre_hook(lambda module, args: (mean.expand_as(args[0]),))
    expected = logits(model)
    handle.remove()
    assert not torch.allclose(got, logits(model), atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_a_patched_moe_block_gives_its_output_in_the_twins_run(kind):
    model = build(kind)
    before = snapshot(model)
    twin = block_output(model, TWIN)
    ablation = si.PatchAblation(lambda m, batch: m(TWIN))
    # router, every expert and (Qwen2-MoE) the shared expert and its gate
    masks = zeros(model, f"blocks.{LAYER}.mlp.*")
    with si.masked(model, masks, ablation=ablation):
        ablation.record(SOURCE)
        got = block_output(model, SOURCE)
    assert_bit_exact(model, before)
    assert not torch.allclose(got, block_output(model, SOURCE), atol=1e-4)
    torch.testing.assert_close(got, twin, atol=1e-5, rtol=1e-5)


def test_a_resampled_moe_block_from_one_example_gives_its_output_on_that_example():
    model = build("qwen3_moe")
    example = TWIN[:1]
    reference = block_output(model, example)
    masks = zeros(model, f"blocks.{LAYER}.mlp.*")
    with si.masked(model, masks, ablation=si.ResampleAblation([example])):
        got = block_output(model, SOURCE)  # two examples, both resampled from the one
    torch.testing.assert_close(got, reference.expand_as(got), atol=1e-5, rtol=1e-5)


def test_all_ones_masks_under_input_ablations_leave_the_output_unchanged():
    model = build("mixtral")
    plain = logits(model)
    ones = filled(model, "blocks.*", True)
    for ablation in (si.MeanAblation(REFERENCE), si.ResampleAblation([TWIN])):
        with si.masked(model, ones, ablation=ablation):
            torch.testing.assert_close(logits(model), plain, atol=1e-6, rtol=1e-6)


def test_mean_ablation_trains_expert_and_router_masks():
    model = build("mixtral")
    before = snapshot(model)
    include = [f"blocks.{LAYER}.mlp.experts.*", f"blocks.{LAYER}.mlp.W_router"]

    def loss(m, batch):
        return F.cross_entropy(m(batch).logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    found = si.targets(model, include=include)
    ablation = si.MeanAblation(REFERENCE)
    data = [SOURCE.repeat(2, 1)]
    result = si.find(
        model,
        "gumbel_sigmoid",
        loss,
        data,
        targets=found,
        steps=2,
        progress=False,
        ablation=ablation,
    )
    assert_bit_exact(model, before)
    flat = [n for n, s in result.scores.items() if bool((s == s.flatten()[0]).all())]
    assert flat == []  # every expert matrix and the router received a gradient


def test_an_expert_the_reference_data_never_routes_to_is_named():
    model = build("mixtral")
    masks = zeros(model, f"blocks.{LAYER}.mlp.experts.*")
    one_token = [SOURCE[:1, :1]]  # routed to 2 of the 4 experts
    with pytest.raises(ValueError, match=r"routed no token to expert\(s\) \[.*\] of 'model"):
        with si.masked(model, masks, ablation=si.MeanAblation(one_token)):
            pass
    assert not model.model.layers[LAYER].mlp.experts._forward_hooks


def test_nested_input_ablations_of_one_experts_module_are_refused_and_leave_no_hooks():
    model = build("mixtral")
    before = snapshot(model)
    block = model.model.layers[LAYER].mlp
    masks = zeros(model, [f"blocks.{LAYER}.mlp.experts.0.*", f"blocks.{LAYER}.mlp.W_router"])
    with si.masked(model, masks, ablation=si.ResampleAblation([TWIN])):
        with pytest.raises(RuntimeError, match="nested mean / resample / patch ablations"):
            with si.masked(model, masks, ablation=si.MeanAblation(REFERENCE)):
                pass
        assert len(block.experts._forward_hooks) == 1 and len(block.gate._forward_hooks) == 1
    assert_bit_exact(model, before)
    assert not (
        block._forward_pre_hooks or block.gate._forward_hooks or block.experts._forward_hooks
    )


def test_nnsight_and_bridge_wrappers_compute_the_same_mean_ablation():
    nnsight = pytest.importorskip("nnsight")
    sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    model = build("mixtral")
    generator = torch.Generator().manual_seed(3)
    found = si.targets(model, include=[f"blocks.{LAYER}.mlp.*"])
    masks = {n: torch.rand(t.shape, generator=generator) < 0.5 for n, t in found.items()}
    with si.masked(model, masks, ablation=si.MeanAblation(REFERENCE)):
        expected = logits(model)
    wrapped = nnsight.NNsight(build("mixtral"))
    with torch.no_grad(), si.masked(wrapped, masks, ablation=si.MeanAblation(REFERENCE)):
        with wrapped.trace(SOURCE):
            saved = wrapped.output.save()
    torch.testing.assert_close(saved.logits, expected, atol=1e-6, rtol=1e-6)
    inner = build("mixtral")
    bridge = sources.build_bridge_from_module(inner, type(inner).__name__, hf_config=inner.config)
    with torch.no_grad(), si.masked(bridge.eval(), masks, ablation=si.MeanAblation(REFERENCE)):
        torch.testing.assert_close(bridge(SOURCE), expected, atol=1e-6, rtol=1e-6)


def test_a_router_of_an_unknown_kind_is_refused_by_name():
    model = build("mixtral")
    before = snapshot(model)
    gate = model.model.layers[LAYER].mlp.gate
    gate.__class__ = type("OtherTopKRouter", (type(gate),), {})  # a family not written for
    masks = zeros(model, f"blocks.{LAYER}.mlp.W_router")
    message = r"router 'model.layers.1.mlp.gate' \(OtherTopKRouter\).*zero or reinit"
    with pytest.raises(TypeError, match=message):
        with si.masked(model, masks, ablation=si.MeanAblation(REFERENCE)):
            pass
    assert_bit_exact(model, before)
    assert not gate._forward_hooks
