"""Hugging Face encoders (BERT, RoBERTa, ViT): canonical names, exact layouts, masking equals
hand-zeroed weights, exact restore."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp.analysis import edge_scores, head_scores, neuron_scores, top_heads

transformers = pytest.importorskip("transformers")
from _hf_models import (  # noqa: E402
    CHANNELS,
    D_HEAD,
    HEADS,
    IMAGE,
    LABELS,
    LAYERS,
    PATCH,
    PIXELS,
    VOCAB,
    D,
    random_masks,
)
from _hf_models import ENCODER_D_MLP as D_MLP  # noqa: E402
from _hf_models import ENCODER_KINDS as KINDS  # noqa: E402
from _hf_models import encoder as build  # noqa: E402
from einops import rearrange  # noqa: E402

N_CTX_VIT = (IMAGE // PATCH) ** 2 + 1
TOKENS = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
TOKEN_TYPES = torch.randint(0, 2, (2, 10), generator=torch.Generator().manual_seed(1))


def outputs(kind, model, batch=None):
    """Every output tensor of a forward pass, concatenated."""
    if kind.startswith("vit"):
        out = model(pixel_values=PIXELS if batch is None else batch)
    else:
        tokens = TOKENS if batch is None else batch
        out = model(input_ids=tokens, token_type_ids=TOKEN_TYPES[: len(tokens)])
    parts = [out[key] for key in ("last_hidden_state", "pooler_output", "logits") if key in out]
    return torch.cat([p.flatten() for p in parts if p is not None])


def first_row(kind, name):
    """The real row of canonical row 0: RoBERTa's positions start at padding_idx + 1 = 2 (its
    padding tokens read row 1), as the model's forward numbers them."""
    return 2 if kind.startswith("roberta") and name == "pos_embed.W_pos" else 0


def real_locations(kind, model):
    """Canonical name -> (module path, attribute, einops pattern canonical -> real), written
    from the models' module trees, independently of the adapter's Layout code."""
    family = kind.split("_")[0]
    base = f"{family}." if "_" in kind else ""
    qkv, out, w_in, w_out = "h d e -> (h e) d", "h e d -> d (h e)", "d n -> n d", "n d -> d n"
    readout = "i o -> o i"
    found = {}
    if family == "vit":
        embeddings = f"{base}embeddings"
        found["embed.W_patch"] = (
            f"{embeddings}.patch_embeddings.projection",
            "weight",
            "c h w d -> d c h w",
        )
        found["embed.W_cls"] = (embeddings, "cls_token", "d -> 1 1 d")
        found["pos_embed.W_pos"] = (embeddings, "position_embeddings", "n d -> 1 n d")
        if hasattr(model.get_submodule(base.rstrip(".")), "layers"):  # transformers 5
            block, names = f"{base}layers", ("attention.q_proj", "attention.k_proj")
            names += ("attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
        else:
            block = f"{base}encoder.layer"
            names = tuple(f"attention.attention.{x}" for x in ("query", "key", "value"))
            names += ("attention.output.dense", "intermediate.dense", "output.dense")
        if kind == "vit":
            found["pooler.W"] = ("pooler.dense", "weight", readout)
        else:
            found["classifier.W"] = ("classifier", "weight", readout)
    else:
        embeddings = f"{base}embeddings"
        found["embed.W_E"] = (f"{embeddings}.word_embeddings", "weight", "v d -> v d")
        found["pos_embed.W_pos"] = (f"{embeddings}.position_embeddings", "weight", "n d -> n d")
        found["token_type_embed.W_token_type"] = (
            f"{embeddings}.token_type_embeddings",
            "weight",
            "t d -> t d",
        )
        block = f"{base}encoder.layer"
        names = tuple(f"attention.self.{x}" for x in ("query", "key", "value"))
        names += ("attention.output.dense", "intermediate.dense", "output.dense")
        head = "cls.predictions" if family == "bert" else "lm_head"
        transform = "cls.predictions.transform.dense" if family == "bert" else "lm_head.dense"
        if kind.endswith("_mlm"):
            found["mlm_head.W"] = (transform, "weight", readout)
            found["unembed.W_U"] = (f"{head}.decoder", "weight", readout)
        elif kind == "bert_cls":
            found["pooler.W"] = ("bert.pooler.dense", "weight", readout)
            found["classifier.W"] = ("classifier", "weight", readout)
        elif kind == "roberta_cls":
            found["classifier.W_dense"] = ("classifier.dense", "weight", readout)
            found["classifier.W"] = ("classifier.out_proj", "weight", readout)
        else:
            found["pooler.W"] = ("pooler.dense", "weight", readout)
    for layer in range(LAYERS):
        paths = [f"{block}.{layer}.{name}" for name in names]
        for letter, path in zip("QKV", paths[:3], strict=True):
            found[f"blocks.{layer}.attn.W_{letter}"] = (path, "weight", qkv)
        found[f"blocks.{layer}.attn.W_O"] = (paths[3], "weight", out)
        found[f"blocks.{layer}.mlp.W_in"] = (paths[4], "weight", w_in)
        found[f"blocks.{layer}.mlp.W_out"] = (paths[5], "weight", w_out)
    return found


def expected_shapes(kind):
    shapes = {
        "attn.W_Q": ((HEADS, D, D_HEAD), ("head", "d_model", "d_head")),
        "attn.W_K": ((HEADS, D, D_HEAD), ("head", "d_model", "d_head")),
        "attn.W_V": ((HEADS, D, D_HEAD), ("head", "d_model", "d_head")),
        "attn.W_O": ((HEADS, D_HEAD, D), ("head", "d_head", "d_model")),
        "mlp.W_in": ((D, D_MLP), ("d_model", "neuron")),
        "mlp.W_out": ((D_MLP, D), ("neuron", "d_model")),
    }
    found = {f"blocks.{L}.{k}": v for L in range(LAYERS) for k, v in shapes.items()}
    if kind.startswith("vit"):
        found["embed.W_patch"] = (
            (CHANNELS, PATCH, PATCH, D),
            ("channel", "patch_h", "patch_w", "d_model"),
        )
        found["embed.W_cls"] = ((D,), ("d_model",))
        found["pos_embed.W_pos"] = ((N_CTX_VIT, D), ("n_ctx", "d_model"))
    else:
        found["embed.W_E"] = ((VOCAB, D), ("d_vocab", "d_model"))
        found["pos_embed.W_pos"] = (
            (16 - first_row(kind, "pos_embed.W_pos"), D),
            ("n_ctx", "d_model"),
        )
        found["token_type_embed.W_token_type"] = ((2, D), ("token_type", "d_model"))
    if kind.endswith("_mlm"):
        found["mlm_head.W"] = ((D, D), ("d_model", "mlm_hidden"))
        found["unembed.W_U"] = ((D, VOCAB), ("d_model", "d_vocab"))
    elif kind == "roberta_cls":
        found["classifier.W_dense"] = ((D, D), ("d_model", "classifier_hidden"))
        found["classifier.W"] = ((D, LABELS), ("classifier_hidden", "label"))
    elif kind.endswith("_cls"):
        found["classifier.W"] = ((D, LABELS), ("d_model", "label"))
    if kind in ("bert", "roberta", "vit", "bert_cls"):
        found["pooler.W"] = ((D, D), ("d_model", "pooled"))
    return found


def hand_zeroed(kind, model, masks):
    """A copy of ``model`` with the masked weights zeroed by hand (tied weights untied)."""
    reference = copy.deepcopy(model)
    locations = real_locations(kind, reference)
    with torch.no_grad():
        for name, mask in masks.items():
            path, attribute, pattern = locations[name]
            module = reference.get_submodule(path)
            own = torch.nn.Parameter(getattr(module, attribute).detach().clone())
            setattr(module, attribute, own)  # a masked unembedding leaves W_E alone
            own[first_row(kind, name) :].mul_(rearrange(mask.float(), pattern))
    return reference


def out_projection(kind, model, layer):
    locations = real_locations(kind, model)
    return model.get_submodule(locations[f"blocks.{layer}.attn.W_O"][0])


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_names_axes_and_exact_round_trip(kind):
    model = build(kind)
    found = si.targets(model, include="*")
    expected = expected_shapes(kind)
    assert sorted(found) == sorted(expected)
    defaults = {n for n, t in found.items() if t.default}
    assert defaults == {n for n in found if n.startswith("blocks.")}  # no embeddings, read-outs
    assert list(si.targets(model)) == [n for n in found if n in defaults]
    locations = real_locations(kind, model)
    for name, target in found.items():
        assert (target.shape, target.axes) == expected[name], name
        path, attribute, pattern = locations[name]
        assert (target.module, target.attribute) == (path, attribute), name
        whole = getattr(model.get_submodule(path), attribute).detach()
        start = first_row(kind, name)
        real = whole[start:]
        canonical = target.layout.to_canonical(whole)
        assert tuple(canonical.shape) == target.shape, name
        left, right = pattern.split(" -> ")
        lengths = {"h": HEADS} if "(h e)" in right else {}
        assert torch.equal(canonical, rearrange(real, f"{right} -> {left}", **lengths)), name
        rebuilt = target.layout.write_real(canonical.clone(), torch.zeros_like(whole))
        assert rebuilt[start:].numpy().tobytes() == real.numpy().tobytes(), name
        assert not rebuilt[:start].any(), name  # the padding rows are no target's


@pytest.mark.parametrize("kind", KINDS)
def test_masked_outputs_equal_hand_zeroed_weights(kind):
    model = build(kind)
    masks = random_masks(model, include="*")
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = outputs(kind, model)
    assert_bit_exact(model, before)
    with torch.no_grad():
        expected = outputs(kind, hand_zeroed(kind, model, masks))
        unmasked = outputs(kind, model)
    assert not torch.allclose(got, unmasked, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_head_mask_equals_zeroing_the_head_at_the_output_projection(kind):
    model = build(kind)
    layer, head = 1, 2
    masks = {}
    for letter in "QKVO":
        target = si.targets(model)[f"blocks.{layer}.attn.W_{letter}"]
        masks[target.name] = torch.ones(target.shape, dtype=torch.bool)
        masks[target.name][head] = False
    with torch.no_grad(), si.masked(model, masks):
        got = outputs(kind, model)

    def zero_head(module, args):
        hidden = args[0].clone()
        hidden[..., head * D_HEAD : (head + 1) * D_HEAD] = 0
        return (hidden, *args[1:])

    handle = out_projection(kind, model, layer).register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            expected = outputs(kind, model)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_restores_exactly_also_on_exception(kind):
    model = build(kind)
    before = snapshot(model)
    parameters = dict(model.named_parameters())
    sub = si.Subnetwork(random_masks(model, include="*"))
    with si.masked(model, sub):
        outputs(kind, model)
    assert_bit_exact(model, before)
    with pytest.raises(RuntimeError, match="boom"), si.masked(model, sub):
        raise RuntimeError("boom")
    assert_bit_exact(model, before)
    after = dict(model.named_parameters())
    assert list(after) == list(parameters)
    assert all(after[n] is p for n, p in parameters.items())
    if kind.endswith("_mlm"):  # still tied
        family = kind.split("_")[0]
        decoder = model.cls.predictions.decoder if family == "bert" else model.lm_head.decoder
        assert decoder.weight is model.get_submodule(family).embeddings.word_embeddings.weight


@pytest.mark.parametrize("kind", ["bert_cls", "roberta_mlm", "vit_cls"])  # one per family
def test_find_runs_and_leaves_the_model_unchanged(kind):
    model = build(kind)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def loss_fn(m, batch):
        return outputs(kind, m, batch).pow(2).mean()

    data = [PIXELS if kind.startswith("vit") else TOKENS]
    result = si.find(
        model, "continuous_sparsification_lepori", loss_fn, data, steps=3, progress=False
    )
    assert set(result.subnetwork.names) == set(si.targets(model))
    assert_bit_exact(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    with si.masked(model, result.subnetwork):
        pass


def only(model, layer, keep):
    """Keep index ``keep`` of the head / neuron axis of layer ``layer``'s targets, nothing else."""
    masks = {}
    for name, target in si.targets(model).items():
        mask = torch.zeros(target.shape, dtype=torch.bool)
        axis = "head" if ".attn." in name else "neuron"
        if name.startswith(f"blocks.{layer}.") and axis in target.axes:
            mask.select(target.axes.index(axis), keep).fill_(True)
        masks[name] = mask
    return si.Subnetwork(masks)


@pytest.mark.parametrize("kind", KINDS)
def test_head_and_neuron_scores_rank_the_kept_unit_first(kind):
    model = build(kind)
    sub = only(model, 1, 3)
    scores = head_scores(model, sub)
    assert scores.shape == (LAYERS, HEADS)
    assert top_heads(scores, 1)[0] == (1, 3, 1.0)
    assert float(scores.sum()) == 1.0
    neurons = neuron_scores(model, sub)
    assert neurons.shape == (LAYERS, D_MLP)
    assert float(neurons[1, 3]) == 1.0 and float(neurons.sum()) == 1.0
    composition = edge_scores(model, sub, "v")
    assert composition.shape == (LAYERS, HEADS, LAYERS, HEADS)


def test_unmatched_encoder_layout_names_what_it_looked_for():
    model = build("bert")
    model.encoder.layer[0].attention.self.query = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query"):
        si.targets(model)


@pytest.mark.parametrize("kind", ["bert_mlm", "roberta_cls", "vit_cls"])
def test_encoders_pass_the_conformance_kit(kind):
    report = si.testing.check_adapter(
        build(kind), PIXELS if kind.startswith("vit") else TOKENS,
        forward=lambda model, batch: outputs(kind, model, batch),
    )  # fmt: skip
    assert "blocks.1.attn.W_O" in report.targets and report.passed[-1] == "find"
