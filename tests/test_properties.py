"""Property tests (hypothesis): set-algebra laws, exact canonical <-> real layouts on random
transformer configs, exact restore after ``si.masked`` on random models, packed storage."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
import transformers
from _hf_models import hand_zeroed
from _util import assert_bit_exact, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import subnet_interp as si

FAST = settings(max_examples=20, deadline=None, database=None)
VOCAB = 40
TOKENS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------- set algebra
shapes = st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=3)


@st.composite
def subnetworks(draw, count: int) -> list[si.Subnetwork]:
    """``count`` subnetworks over the same random targets, with arbitrary bits."""
    drawn = draw(shapes)
    result = []
    for _ in range(count):
        masks = {}
        for index, shape in enumerate(drawn):
            bits = draw(
                st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape))
            )
            masks[f"t{index}"] = torch.tensor(bits, dtype=torch.bool).view(shape)
        result.append(si.Subnetwork(masks))
    return result


@FAST
@given(subnetworks(2))
def test_and_or_xor_commute(pair):
    a, b = pair
    assert a & b == b & a
    assert a | b == b | a
    assert a ^ b == b ^ a


@FAST
@given(subnetworks(3))
def test_and_or_xor_associate_and_distribute(triple):
    a, b, c = triple
    assert (a & b) & c == a & (b & c)
    assert (a | b) | c == a | (b | c)
    assert (a ^ b) ^ c == a ^ (b ^ c)
    assert a & (b | c) == (a & b) | (a & c)


@FAST
@given(subnetworks(2))
def test_de_morgan_difference_and_double_complement(pair):
    a, b = pair
    assert ~(a & b) == ~a | ~b
    assert ~(a | b) == ~a & ~b
    assert a - b == a & ~b
    assert a ^ b == (a | b) - (a & b)
    assert ~~a == a
    assert (a | b).kept() == a.kept() + b.kept() - (a & b).kept()
    assert a.kept() + (~a).kept() == a.numel()


@FAST
@given(subnetworks(1), st.booleans())
def test_save_load_is_exact(single, packed):
    (sub,) = single
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sub.safetensors")
        sub.save(path, packed=packed)
        assert si.Subnetwork.load(path) == sub


# ------------------------------------------------------ transformer layouts
@st.composite
def transformers_models(draw, n_layers: int | None = None):
    """A tiny random GPT-2, GPT-NeoX or Llama with random head counts and sizes."""
    family = draw(st.sampled_from(["gpt2", "neox", "llama"]))
    heads = draw(st.integers(1, 4))
    d_head = draw(st.sampled_from([2, 4, 6]))
    n_layers = n_layers or draw(st.integers(1, 2))
    d_mlp = draw(st.integers(1, 9))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=n_layers,
            n_head=heads,
            n_embd=heads * d_head,
            n_inner=d_mlp,
            n_positions=8,
            **common,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif family == "neox":
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            hidden_size=heads * d_head,
            intermediate_size=d_mlp,
            max_position_embeddings=8,
            **common,
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    else:
        kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
        cfg = transformers.LlamaConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            hidden_size=heads * d_head,
            intermediate_size=d_mlp,
            max_position_embeddings=8,
            **common,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return family, model.eval()


def by_location(targets):
    groups = {}
    for target in targets.values():
        groups.setdefault(target.location, []).append(target)
    return groups


def real(model, target):
    return getattr(model.get_submodule(target.module), target.attribute).detach()


@FAST
@given(transformers_models())
def test_canonical_views_tile_each_real_tensor_exactly_once(drawn):
    _, model = drawn
    for members in by_location(si.targets(model, include="*")).values():
        tensor = real(model, members[0])
        rebuilt = torch.zeros_like(tensor)
        cover = torch.zeros(tensor.shape, dtype=torch.int64)
        for target in members:
            canonical = target.layout.to_canonical(tensor)
            assert tuple(canonical.shape) == target.shape
            rebuilt = target.layout.write_real(canonical, rebuilt)
            ones = torch.ones(target.shape, dtype=torch.int64)
            cover += target.layout.write_real(ones, torch.zeros_like(cover))
        assert torch.equal(rebuilt, tensor)
        assert torch.equal(cover, torch.ones_like(cover))


@FAST
@given(transformers_models(), st.integers(0, 2**16))
def test_masks_written_to_real_layout_read_back_exactly(drawn, seed):
    _, model = drawn
    gen = torch.Generator().manual_seed(seed)
    for members in by_location(si.targets(model, include="*")).values():
        shape = real(model, members[0]).shape
        masks = {t.name: torch.rand(t.shape, generator=gen) < 0.5 for t in members}
        buffer = torch.zeros(shape, dtype=torch.bool)
        for target in members:
            buffer = target.layout.write_real(masks[target.name], buffer)
        for target in members:
            assert torch.equal(target.layout.to_canonical(buffer), masks[target.name])


def assert_restored(model, before, parameters):
    assert_bit_exact(model, before)
    assert dict(model.named_parameters()).keys() == parameters.keys()
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@FAST
@given(transformers_models(n_layers=2), st.integers(0, 2**16))  # hand_zeroed: 2 layers
def test_masked_transformer_equals_hand_zeroed_and_restores(drawn, seed):
    family, model = drawn
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.6 for n, t in si.targets(model).items()}
    reference = copy.deepcopy(model)
    hand_zeroed(family, reference, masks)
    before, parameters = snapshot(model), dict(model.named_parameters())
    with torch.no_grad(), si.masked(model, masks):
        inside = model(TOKENS).logits
    assert torch.equal(inside, reference(TOKENS).logits.detach())
    assert_restored(model, before, parameters)


# --------------------------------------------------------- plain modules
@st.composite
def plain_models(draw):
    """A random small stack of Linear / Conv1d / Conv2d layers (with a random input)."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    layers, bias = [], draw(st.booleans())
    for fan_in, fan_out in zip(widths, widths[1:], strict=False):
        kernel = draw(st.sampled_from([1, 3]))  # odd: padding="same" needs no copy
        if kind == "linear":
            layers.append(torch.nn.Linear(fan_in, fan_out, bias=bias))
        elif kind == "conv1d":
            layers.append(torch.nn.Conv1d(fan_in, fan_out, kernel, padding="same", bias=bias))
        else:
            layers.append(torch.nn.Conv2d(fan_in, fan_out, kernel, padding="same", bias=bias))
        layers.append(torch.nn.Tanh())
    spatial = {"linear": (), "conv1d": (5,), "conv2d": (4, 3)}[kind]
    return torch.nn.Sequential(*layers), torch.randn(3, widths[0], *spatial)


@FAST
@given(plain_models(), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_masked_plain_module_equals_zeroing_and_restores(drawn, seed, density):
    model, inputs = drawn
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(t.shape, generator=gen) < density for n, t in si.targets(model).items()}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    before, parameters = snapshot(model), dict(model.named_parameters())
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        inside = model(inputs)
    assert torch.equal(inside, reference(inputs))
    assert_restored(model, before, parameters)
