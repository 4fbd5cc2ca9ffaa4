"""Hugging Face encoder-decoders (T5, mT5, BART, mBART) and mixtures of experts (Mixtral, Qwen2-MoE,
Qwen3-MoE): canonical names, exact layouts, masking equals hand-zeroed weights, whole heads and
whole experts, exact restore, si.find trains through every target."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

transformers = pytest.importorskip("transformers")
from einops import rearrange  # noqa: E402

VOCAB, D, HEADS, LAYERS, D_MLP = 40, 32, 4, 2, 48
D_HEAD = D // HEADS
EXPERTS, D_EXPERT, D_SHARED = 4, 16, 20
SEQ2SEQ = ["t5", "t5_relu", "mt5", "bart", "mbart"]
T5_KINDS, GATED = ("t5", "t5_relu", "mt5"), ("t5", "mt5")  # the rest: BART's module names
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
KINDS = SEQ2SEQ + MOE
SOURCE = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
TARGET = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
ATTN = dict(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS)
MOE_SIZES = dict(ATTN, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16)


def build(kind):
    torch.manual_seed(0)
    if kind in T5_KINDS:
        config, model = (
            (transformers.MT5Config, transformers.MT5ForConditionalGeneration)
            if kind == "mt5"
            else (transformers.T5Config, transformers.T5ForConditionalGeneration)
        )
        cfg = config(
            vocab_size=VOCAB, d_model=D, d_kv=D_HEAD, d_ff=D_MLP, num_layers=LAYERS,
            num_heads=HEADS, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
            feed_forward_proj="relu" if kind == "t5_relu" else "gated-gelu",
        )  # fmt: skip
        return model(cfg).eval()
    if kind in ("bart", "mbart"):
        config, model = (
            (transformers.MBartConfig, transformers.MBartForConditionalGeneration)
            if kind == "mbart"
            else (transformers.BartConfig, transformers.BartForConditionalGeneration)
        )
        cfg = config(
            vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=D_MLP,
            decoder_ffn_dim=D_MLP, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0,
            init_std=0.2,
        )  # fmt: skip
        return model(cfg).eval()
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(
            intermediate_size=D_EXPERT, num_local_experts=EXPERTS, num_experts_per_tok=2,
            **MOE_SIZES,
        )  # fmt: skip
        return transformers.MixtralForCausalLM(cfg).eval()
    common = dict(
        intermediate_size=D_MLP, moe_intermediate_size=D_EXPERT, num_experts=EXPERTS,
        num_experts_per_tok=2, mlp_only_layers=[0], **MOE_SIZES,
    )  # fmt: skip
    if kind == "qwen2_moe":  # layer 0 dense, layer 1 sparse with a shared expert
        cfg = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=D_SHARED, **common)
        return transformers.Qwen2MoeForCausalLM(cfg).eval()
    cfg = transformers.Qwen3MoeConfig(head_dim=D_HEAD, **common)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def outputs(kind, model, source=SOURCE, target=TARGET):
    if kind in SEQ2SEQ:
        return model(input_ids=source, decoder_input_ids=target).logits
    return model(source).logits


def seq2seq_loss(model, batch):
    source, target = batch
    return model(input_ids=source, labels=target).loss


def next_token_loss(model, batch):
    logits = model(batch).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
    )


QKV, OUT, W_IN, W_OUT = "h d e -> (h e) d", "h e d -> d (h e)", "d n -> n d", "n d -> d n"


def real_locations(kind, model):
    """Canonical name -> (module path, attribute, index into the real tensor, einops pattern
    canonical -> indexed real), written from the models' module trees independently of the
    adapter's Layout code."""
    found = {}
    if kind in SEQ2SEQ:
        t5 = kind in T5_KINDS
        base = "" if t5 else "model."
        found["unembed.W_U"] = ("lm_head", "weight", (), "d v -> v d")
        for stack in ("encoder", "decoder"):
            path = f"{base}{stack}.embed_tokens"
            found[f"{stack}.embed.W_E"] = (path, "weight", (), "v d -> v d")
            for layer in range(LAYERS):
                name = f"{stack}.blocks.{layer}"
                if t5:
                    block = f"{stack}.block.{layer}.layer"
                    attns = {"attn": f"{block}.0.SelfAttention"}
                    if stack == "decoder":
                        attns["cross_attn"] = f"{block}.1.EncDecAttention"
                    dense = f"{block}.{len(attns)}.DenseReluDense"
                    letters = dict(zip("QKVO", "qkvo", strict=True))
                    mlp = {"W_out": f"{dense}.wo"}
                    if kind in GATED:
                        mlp |= {"W_gate": f"{dense}.wi_0", "W_in": f"{dense}.wi_1"}
                    else:
                        mlp["W_in"] = f"{dense}.wi"
                else:
                    block = f"{base}{stack}.layers.{layer}"
                    attns = {"attn": f"{block}.self_attn"}
                    if stack == "decoder":
                        attns["cross_attn"] = f"{block}.encoder_attn"
                    letters = dict(
                        zip("QKVO", ("q_proj", "k_proj", "v_proj", "out_proj"), strict=True)
                    )
                    mlp = {"W_in": f"{block}.fc1", "W_out": f"{block}.fc2"}
                for kind_name, path in attns.items():
                    for letter, proj in letters.items():
                        pattern = OUT if letter == "O" else QKV
                        found[f"{name}.{kind_name}.W_{letter}"] = (
                            f"{path}.{proj}", "weight", (), pattern,
                        )  # fmt: skip
                for canonical, path in mlp.items():
                    pattern = W_OUT if canonical == "W_out" else W_IN
                    found[f"{name}.mlp.{canonical}"] = (path, "weight", (), pattern)
            if t5:
                path = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
                found[f"{stack}.pos_embed.W_rel_bias"] = (path, "weight", (), "b h -> b h")
            else:
                path = f"{base}{stack}.embed_positions"  # position p reads row p + 2
                found[f"{stack}.pos_embed.W_pos"] = (path, "weight", slice(2, None), "n d -> n d")
        return found
    found["embed.W_E"] = ("model.embed_tokens", "weight", (), "v d -> v d")
    found["unembed.W_U"] = ("lm_head", "weight", (), "d v -> v d")
    for layer in range(LAYERS):
        block = f"model.layers.{layer}"
        for letter in "QKVO":
            pattern = OUT if letter == "O" else QKV
            path = f"{block}.self_attn.{letter.lower()}_proj"
            found[f"blocks.{layer}.attn.W_{letter}"] = (path, "weight", (), pattern)
        dense = {"W_gate": "gate_proj", "W_in": "up_proj", "W_out": "down_proj"}
        if kind != "mixtral" and layer == 0:  # mlp_only_layers=[0]
            for canonical, proj in dense.items():
                pattern = W_OUT if canonical == "W_out" else W_IN
                found[f"blocks.0.mlp.{canonical}"] = (f"{block}.mlp.{proj}", "weight", (), pattern)
            continue
        experts = f"{block}.mlp.experts"
        for e in range(EXPERTS):
            name = f"blocks.{layer}.mlp.experts.{e}"
            found[f"{name}.W_gate"] = (experts, "gate_up_proj", (e, slice(0, D_EXPERT)), W_IN)
            found[f"{name}.W_in"] = (experts, "gate_up_proj", (e, slice(D_EXPERT, None)), W_IN)
            found[f"{name}.W_out"] = (experts, "down_proj", (e,), W_OUT)
        found[f"blocks.{layer}.mlp.W_router"] = (f"{block}.mlp.gate", "weight", (), "d e -> e d")
        if kind == "qwen2_moe":
            for canonical, proj in dense.items():
                pattern = W_OUT if canonical == "W_out" else W_IN
                path = f"{block}.mlp.shared_expert.{proj}"
                found[f"blocks.{layer}.mlp.shared_expert.{canonical}"] = (
                    path,
                    "weight",
                    (),
                    pattern,
                )
            path = f"{block}.mlp.shared_expert_gate"
            found[f"blocks.{layer}.mlp.W_shared_gate"] = (path, "weight", (), "d g -> g d")
    return found


def random_masks(model, include="*", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(target.shape, generator=gen) < 0.6
        for name, target in si.targets(model, include=include).items()
    }


def hand_zeroed(kind, model, masks):
    """A copy of ``model`` with the masked weights zeroed by hand (tied weights untied)."""
    reference = copy.deepcopy(model)
    locations = real_locations(kind, reference)
    owned = {}
    with torch.no_grad():
        for name, mask in masks.items():
            path, attribute, index, pattern = locations[name]
            module = reference.get_submodule(path)
            if (path, attribute) not in owned:  # a masked unembedding leaves W_E alone
                owned[path, attribute] = torch.nn.Parameter(getattr(module, attribute).clone())
                setattr(module, attribute, owned[path, attribute])
            owned[path, attribute][index].mul_(rearrange(mask.float(), pattern))
    return reference


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_names_axes_and_exact_round_trip(kind):
    model = build(kind)
    found = si.targets(model, include="*")
    locations = real_locations(kind, model)
    assert sorted(found) == sorted(locations)
    not_default = {n for n, t in found.items() if not t.default}
    expected = {n for n in found if "embed." in n}  # embed, unembed, pos_embed
    expected |= {n for n in found if n.endswith(("W_router", "W_shared_gate"))}
    assert not_default == expected
    for name, target in found.items():
        path, attribute, index, pattern = locations[name]
        assert (target.module, target.attribute) == (path, attribute), name
        real = getattr(model.get_submodule(path), attribute).detach()
        canonical = target.layout.to_canonical(real)
        left, right = pattern.split(" -> ")
        lengths = {"h": canonical.shape[0]} if "(h e)" in right else {}
        assert torch.equal(canonical, rearrange(real[index], f"{right} -> {left}", **lengths)), name
        assert tuple(canonical.shape) == target.shape, name
        if ".attn." in name or ".cross_attn." in name:
            head = "kv_head" if name[-1] in "KV" and kind in MOE else "head"
            axes = (
                (head, "d_head", "d_model") if name.endswith("W_O") else (head, "d_model", "d_head")
            )
            assert target.axes == axes, name
        rebuilt = target.layout.write_real(canonical.clone(), torch.zeros_like(real))
        assert torch.equal(rebuilt[index], real[index]), name


@pytest.mark.parametrize("kind", KINDS)
def test_masked_outputs_equal_hand_zeroed_weights(kind):
    model = build(kind)
    masks = random_masks(model)
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = outputs(kind, model)
    assert_bit_exact(model, before)
    with torch.no_grad():
        expected = outputs(kind, hand_zeroed(kind, model, masks))
        unmasked = outputs(kind, model)
    assert not torch.allclose(got, unmasked, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind", ["t5", "mt5", "bart", "mbart", "mixtral", "qwen2_moe", "qwen3_moe"]
)
def test_every_target_is_a_weight_the_forward_reads(kind):
    model = build(kind)
    with torch.no_grad():
        unmasked = outputs(kind, model)
        unread = []
        for name, target in si.targets(model, include="*").items():
            with si.masked(model, {name: torch.zeros(target.shape, dtype=torch.bool)}):
                if torch.equal(outputs(kind, model), unmasked):
                    unread.append(name)
    assert unread == []


HEAD_CASES = [
    ("t5", "encoder", "attn"), ("t5", "decoder", "attn"), ("t5", "decoder", "cross_attn"),
    ("bart", "encoder", "attn"), ("bart", "decoder", "cross_attn"), ("mixtral", None, "attn"),
    ("mt5", "decoder", "cross_attn"), ("mbart", "decoder", "attn"),
    ("mbart", "decoder", "cross_attn"),
]  # fmt: skip


@pytest.mark.parametrize("kind,stack,attn", HEAD_CASES)
def test_whole_head_mask_equals_zeroing_the_head_at_the_output_projection(kind, stack, attn):
    model = build(kind)
    layer, head = 1, 2
    prefix = f"{stack}.blocks.{layer}.{attn}" if stack else f"blocks.{layer}.{attn}"
    masks = {}
    for letter in "QKVO" if kind != "mixtral" else "QO":  # Mixtral's K / V are shared (GQA)
        target = si.targets(model)[f"{prefix}.W_{letter}"]
        masks[target.name] = torch.ones(target.shape, dtype=torch.bool)
        masks[target.name][head] = False
    with torch.no_grad(), si.masked(model, masks):
        got = outputs(kind, model)

    def zero_head(module, args):
        hidden = args[0].clone()
        hidden[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return (hidden, *args[1:])

    path = real_locations(kind, model)[f"{prefix}.W_O"][0]
    handle = model.get_submodule(path).register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = outputs(kind, model)
    finally:
        handle.remove()
    with torch.no_grad():
        unmasked = outputs(kind, model)
    assert not torch.allclose(got, unmasked, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MOE)
def test_whole_expert_mask_equals_zeroing_the_expert(kind):
    model = build(kind)
    layer, expert = 1, 2
    masks = {}
    for w in ("W_gate", "W_in", "W_out"):
        target = si.targets(model)[f"blocks.{layer}.mlp.experts.{expert}.{w}"]
        masks[target.name] = torch.zeros(target.shape, dtype=torch.bool)
    with torch.no_grad(), si.masked(model, masks):
        got = outputs(kind, model)
    reference = copy.deepcopy(model)
    experts = reference.model.layers[layer].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[expert].zero_()
        experts.down_proj[expert].zero_()
        by_hand = outputs(kind, reference)

    def drop_expert(module, args):  # routing unchanged, the expert's routed share removed
        hidden, top_k_index, top_k_weights = args
        return hidden, top_k_index, top_k_weights.masked_fill(top_k_index == expert, 0.0)

    handle = model.model.layers[layer].mlp.experts.register_forward_pre_hook(drop_expert)
    try:
        with torch.no_grad():
            unrouted = outputs(kind, model)
    finally:
        handle.remove()
    with torch.no_grad():
        unmasked = outputs(kind, model)
    assert not torch.allclose(got, unmasked, atol=1e-4)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, unrouted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_restores_exactly_also_on_exception(kind):
    model = build(kind)
    before = snapshot(model)
    parameters = dict(model.named_parameters())
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    sub = si.Subnetwork(random_masks(model))
    with torch.no_grad(), si.masked(model, sub):
        outputs(kind, model)
    assert_bit_exact(model, before)
    with pytest.raises(RuntimeError, match="boom"), si.masked(model, sub):
        raise RuntimeError("boom")
    assert_bit_exact(model, before)
    after = dict(model.named_parameters())
    assert list(after) == list(parameters)
    assert all(after[n] is p for n, p in parameters.items())
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("kind", ["t5", "mt5", "mbart", "mixtral"])  # BART: the conformance kit
def test_find_trains_every_target_and_leaves_the_model_unchanged(kind):
    model = build(kind)
    before = snapshot(model)
    if kind in SEQ2SEQ:  # gumbel_sigmoid splits a batch among 4 mask samples
        data, loss = [(SOURCE.repeat(2, 1), TARGET.repeat(2, 1))], seq2seq_loss
    else:
        data, loss = [SOURCE.repeat(2, 1)], next_token_loss
    result = si.find(model, "gumbel_sigmoid", loss, data, steps=2, progress=False)
    assert set(result.subnetwork.names) == set(si.targets(model))
    assert_bit_exact(model, before)
    # the penalty moves every score alike; only the loss's gradient makes a target's scores differ
    flat = [
        name for name, score in result.scores.items() if bool((score == score.flatten()[0]).all())
    ]
    assert flat == []


@pytest.mark.parametrize("kind", ["t5_relu", "bart", "qwen2_moe"])
def test_seq2seq_and_moe_pass_the_conformance_kit(kind):
    # every target, the tied token embeddings and unembedding too (each masked at its own read)
    report = si.testing.check_adapter(
        build(kind), (SOURCE, TARGET), include="*",
        forward=lambda model, batch: outputs(kind, model, *batch),
    )  # fmt: skip
    assert report.passed[-1] == "find"


def test_a_renamed_module_or_unfused_experts_are_named_in_the_error():
    t5 = build("t5")
    t5.decoder.block[1].layer[1].EncDecAttention.k = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"no nn\.Linear at 'decoder\.block\.1\.layer\.1\."):
        si.targets(t5)
    mixtral = build("mixtral")
    experts = mixtral.model.layers[0].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().transpose(1, 2).clone())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj has shape"):
        si.targets(mixtral)
    mixtral.model.layers[0].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(D, D)])
    with pytest.raises(ValueError, match=r"not stored as transformers 5 fuses"):
        si.targets(mixtral)


def test_a_decoder_alone_has_no_cross_attention_targets():
    cfg = build("bart").config
    decoder_only = transformers.BartForCausalLM(cfg).eval()
    found = si.targets(decoder_only, include="*")
    assert not any(".cross_attn." in n or n.startswith("encoder.") for n in found)
    assert "decoder.blocks.1.attn.W_O" in found and "decoder.embed.W_E" in found


@pytest.mark.parametrize("kind", ["t5", "mixtral"])
def test_an_nnsight_wrapper_has_the_same_targets_fingerprint_and_masked_output(kind):
    nnsight = pytest.importorskip("nnsight")
    model, wrapped = build(kind), nnsight.NNsight(build(kind))
    assert si.fingerprint(wrapped) == si.fingerprint(model)
    assert list(si.targets(wrapped, include="*")) == list(si.targets(model, include="*"))
    masks = si.Subnetwork(random_masks(model))
    with torch.no_grad(), si.masked(model, masks):
        expected = outputs(kind, model)
    with torch.no_grad(), si.masked(wrapped, masks):
        inputs = {"input_ids": SOURCE} | ({"decoder_input_ids": TARGET} if kind == "t5" else {})
        with wrapped.trace(**inputs):
            saved = wrapped.output.save()
    assert torch.equal(saved.logits, expected)


@pytest.mark.parametrize("kind", MOE)
def test_a_bridge_of_an_moe_model_names_experts_and_router_as_hugging_face_does(kind):
    from transformer_lens.model_bridge import sources

    hf, wrapped = build(kind), build(kind)  # the bridge takes over the model it wraps
    bridge = sources.build_bridge_from_module(
        wrapped, type(wrapped).__name__, hf_config=wrapped.config
    )
    bridge.eval()
    assert list(si.targets(bridge)) == list(si.targets(hf))  # the router is no W_gate
    assert si.fingerprint(bridge) == si.fingerprint(hf)
    ours = si.targets(bridge, include="*")
    shared = {n: t for n, t in si.targets(hf, include="*").items() if n in ours}
    assert "blocks.1.mlp.W_router" in shared and not shared["blocks.1.mlp.W_router"].default
    gen = torch.Generator().manual_seed(3)
    sub = si.Subnetwork({n: torch.rand(t.shape, generator=gen) < 0.7 for n, t in shared.items()})
    tokens = torch.randint(0, 40, (2, 6), generator=gen)
    before = snapshot(bridge)
    with torch.no_grad():
        with si.masked(hf, sub):
            expected = hf(tokens).logits
        with si.masked(bridge, sub):
            got = bridge(tokens)
        unmasked = bridge(tokens)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(unmasked, expected, atol=1e-3)
    assert_bit_exact(bridge, before)
