"""Torch's own composite layers and opt-in bias / norm targets: ``nn.MultiheadAttention`` as
canonical ``W_Q|W_K|W_V|W_O`` heads, ``nn.LSTM`` / ``nn.GRU`` per-gate targets, and the
``biases=True`` targets of plain layers and Hugging Face GPT-2 / Llama (the other families:
``test_adapter_biases_all.py``). References are written
from the layers' documented maths (einops / einsum), not from the adapter's layouts."""

from __future__ import annotations

import copy
import math
import unittest.mock

import pytest
import torch
from _util import assert_bit_exact, snapshot
from einops import rearrange
from torch import nn

import subnet_interp as si

E, H = 16, 4  # embed dim, heads
DH = E // H
GEN = torch.Generator().manual_seed(0)
X = torch.randn(2, 5, E, generator=GEN)  # [batch, pos, d_model]
KV = torch.randn(2, 7, 6, generator=GEN)  # a memory of another width (kdim = vdim = 6)
SEQ = torch.randn(6, 2, 3, generator=GEN)  # [pos, batch, input] for the RNNs


class SelfAttention(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        with torch.no_grad():  # torch initialises both biases to zero: make them matter
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class CrossAttention(nn.Module):
    """Key / value of another width: separate ``q|k|v_proj_weight``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=6, vdim=6)
        with torch.no_grad():  # zero at torch's init
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, inputs):
        x, memory = inputs
        return self.attn(x, memory, memory, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        torch.manual_seed(2)
        self.rnn = getattr(nn, cell)(3, 5, num_layers=2, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


def random_masks(found, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=gen) < 0.6 for n, t in found.items()}


# ------------------------------------------------------------------ nn.MultiheadAttention
def canonical_by_hand(attn: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """``W_Q|K|V`` ``[head, d_model, d_head]``, ``W_O``, biases, read from torch's storage as
    ``F.multi_head_attention_forward`` uses it (rows ``[q; k; v]``, each head-major)."""
    if attn._qkv_same_embed_dim:
        q, k, v = attn.in_proj_weight.detach().chunk(3)
    else:
        q, k, v = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
    split = lambda w: rearrange(w.detach(), "(h e) d -> h d e", h=H)  # noqa: E731
    found = {"W_Q": split(q), "W_K": split(k), "W_V": split(v)}
    found["W_O"] = rearrange(attn.out_proj.weight.detach(), "d (h e) -> h e d", h=H)
    if attn.in_proj_bias is not None:
        for letter, b in zip("QKV", attn.in_proj_bias.detach().chunk(3), strict=True):
            found[f"b_{letter}"] = rearrange(b, "(h e) -> h e", h=H)
        found["b_O"] = attn.out_proj.bias.detach()
    return found


def attention_by_hand(weights, x, memory=None):
    """Multi-head attention from canonical weights (Vaswani et al. 2017, eq. 1 and 5)."""
    memory = x if memory is None else memory
    zero = torch.zeros(H, DH)
    q = torch.einsum("bpd,hde->bhpe", x, weights["W_Q"]) + weights.get("b_Q", zero)[:, None]
    k = torch.einsum("bpd,hde->bhpe", memory, weights["W_K"]) + weights.get("b_K", zero)[:, None]
    v = torch.einsum("bpd,hde->bhpe", memory, weights["W_V"]) + weights.get("b_V", zero)[:, None]
    pattern = (torch.einsum("bhpe,bhqe->bhpq", q, k) / math.sqrt(DH)).softmax(-1)
    z = torch.einsum("bhpq,bhqe->bhpe", pattern, v)
    return torch.einsum("bhpe,hed->bpd", z, weights["W_O"]) + weights.get("b_O", 0.0)


def test_mha_canonical_views_are_torchs_heads():
    model = SelfAttention()
    found = si.targets(model, include="attn.*", biases=True)
    assert list(found) == [f"attn.W_{x}" for x in "QKVO"] + [f"attn.b_{x}" for x in "QKVO"]
    assert found["attn.W_Q"].axes == ("head", "d_model", "d_head")
    assert found["attn.W_O"].axes == ("head", "d_head", "d_model")
    bias = found["attn.b_Q"]  # one unit per entry; a head gate covers the head's entries
    assert bias.gate_shape("neuron") == (H, DH) and bias.gate_shape("head") == (H, 1)
    assert "attn.out_proj.weight" not in si.targets(model, include="*")  # named W_O instead
    by_hand = canonical_by_hand(model.attn)
    for name, target in found.items():
        real = getattr(model.get_submodule(target.module), target.attribute)
        view = target.layout.to_canonical(real)
        same_storage = view.untyped_storage().data_ptr() == real.untyped_storage().data_ptr()
        assert same_storage, name  # a view into the real tensor, not a copy
        assert torch.equal(view, by_hand[name.split(".")[-1]]), name
    cross = si.targets(CrossAttention())
    assert cross["attn.W_K"].shape == (H, 6, DH) and cross["attn.W_K"].attribute == "k_proj_weight"


@pytest.mark.parametrize("mode", ["train", "eval_fast_path"])
def test_mha_mask_equals_attention_written_by_hand(mode):
    model = SelfAttention().train(mode == "train")
    found = si.targets(model, biases=True, include="attn.*")
    masks = random_masks(found)
    by_hand = canonical_by_hand(model.attn)
    expected = attention_by_hand({k: w * masks[f"attn.{k}"] for k, w in by_hand.items()}, X)
    fast = torch._native_multi_head_attention
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fast(*args, **kwargs)

    before = snapshot(model)
    with unittest.mock.patch.object(torch, "_native_multi_head_attention", spy):
        with torch.set_grad_enabled(mode == "train"), si.masked(model, si.Subnetwork(masks)):
            got = model(X)
    assert bool(calls) == (mode != "train")  # the inference fast path ran, and was masked too
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert_bit_exact(model, before)


def test_cross_attention_mask_equals_attention_written_by_hand():
    model = CrossAttention()
    masks = random_masks(si.targets(model))  # the weights; the biases stay as they are
    weights = {n: w * masks.get(f"attn.{n}", 1) for n, w in canonical_by_hand(model.attn).items()}
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = model((X, KV))
    with torch.no_grad():
        expected = attention_by_hand(weights, X, KV)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("letter", ["Q", "V", "O"])
def test_mha_whole_head_mask_equals_zeroing_that_heads_slice(letter):
    head = 2
    model = SelfAttention().eval()
    target = si.targets(model)[f"attn.W_{letter}"]
    mask = torch.ones(target.shape, dtype=torch.bool)
    mask[head] = False
    reference = copy.deepcopy(model)
    with torch.no_grad():
        rows = slice(head * DH, (head + 1) * DH)
        if letter == "O":  # the o-projection's input columns of that head
            reference.attn.out_proj.weight[:, rows] = 0
        else:
            offset = "QKV".index(letter) * E
            reference.attn.in_proj_weight[offset + rows.start : offset + rows.stop] = 0
        expected = reference(X)
        with si.masked(model, si.Subnetwork({f"attn.W_{letter}": mask})):
            got = model(X)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, model(X).detach(), atol=1e-4)


def test_mha_mask_applies_in_the_transformer_encoder_layers_fast_path():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    masks = random_masks(si.targets(layer))
    fused = torch._transformer_encoder_layer_fwd
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    with torch.no_grad(), si.masked(layer, si.Subnetwork(masks)):
        with unittest.mock.patch.object(torch, "_transformer_encoder_layer_fwd", spy):
            fast = layer(X)
        slow = layer.train()(X)  # the same masked layer, module by module
    assert calls and torch.allclose(fast, slow, atol=1e-5)


def test_mha_refuses_input_based_ablations_and_stays_unchanged():
    model = SelfAttention()
    before = snapshot(model)
    masks = {"attn.W_O": torch.zeros(H, DH, E, dtype=torch.bool)}
    with pytest.raises(TypeError, match="nn.MultiheadAttention.*never.*out_proj") as error:
        with si.masked(model, masks, ablation=si.MeanAblation([X])):
            pass
    assert "zero ablation" in str(error.value)
    assert_bit_exact(model, before)
    assert not any("parametrizations" in k for k in model.state_dict())


# ------------------------------------------------------------------ nn.LSTM / nn.GRU
def gates_by_hand(rnn: nn.RNNBase, weights) -> torch.Tensor:
    """The RNN's output computed from per-gate weights ``weights[(parameter, gate)]``, written
    from torch's documented equations (LSTM gates i, f, g, o; GRU r, z, n)."""
    lstm = isinstance(rnn, nn.LSTM)
    gates = "ifgo" if lstm else "rzn"
    x, steps = SEQ, SEQ.shape[0]
    for layer in range(rnn.num_layers):
        outputs = []
        for suffix in ("", "_reverse"):
            p = {
                kind: {g: weights[(f"{kind}_l{layer}{suffix}", g)] for g in gates}
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            }
            h = torch.zeros(x.shape[1], rnn.hidden_size)
            c = torch.zeros_like(h)
            seq = [h] * steps
            for t in reversed(range(steps)) if suffix else range(steps):
                ih = {g: x[t] @ p["weight_ih"][g].T + p["bias_ih"][g] for g in gates}
                hh = {g: h @ p["weight_hh"][g].T + p["bias_hh"][g] for g in gates}
                if lstm:
                    i, f, g, o = (ih[k] + hh[k] for k in gates)
                    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h = o.sigmoid() * c.tanh()
                else:
                    r, z = ((ih[k] + hh[k]).sigmoid() for k in "rz")
                    n = (ih["n"] + r * hh["n"]).tanh()
                    h = (1 - z) * n + z * h
                seq[t] = h
            outputs.append(torch.stack(seq))
        x = torch.cat(outputs, dim=-1)
    return x


def per_gate(rnn: nn.RNNBase, gates: str, masks=None):
    """``(parameter, gate) -> the gate's rows`` (times the mask of that target, if given)."""
    found = {}
    for parameter, value in rnn.named_parameters():
        for gate, rows in zip(gates, value.detach().chunk(len(gates)), strict=True):
            found[(parameter, gate)] = rows * (
                1 if masks is None else masks[f"rnn.{parameter}.{gate}"]
            )
    return found


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_rnn_gate_mask_equals_the_recurrence_written_by_hand(cell):
    model = Recurrent(cell)
    gates = "ifgo" if cell == "LSTM" else "rzn"
    found = si.targets(model, biases=True)
    assert len(found) == 2 * 2 * 4 * len(gates)  # layers x directions x (w, b) x (ih, hh) x gates
    assert found[f"rnn.weight_hh_l1_reverse.{gates[1]}"].shape == (5, 5)
    assert found["rnn.weight_ih_l1.n" if cell == "GRU" else "rnn.weight_ih_l1.g"].shape == (5, 10)
    masks = random_masks(found)
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = model(SEQ)
    expected = gates_by_hand(model.rnn, per_gate(model.rnn, gates, masks))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_bit_exact(model, before)
    # the RNN reads its parameters again, not the masked copies its last forward kept
    names, flat = model.rnn._flat_weights_names, model.rnn._flat_weights
    assert all(w is getattr(model.rnn, n) for w, n in zip(flat, names, strict=True))
    with torch.no_grad():
        unmasked = gates_by_hand(model.rnn, per_gate(model.rnn, gates))
        torch.testing.assert_close(model(SEQ), unmasked, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize(
    "build, inputs",
    [
        (SelfAttention, X),
        (CrossAttention, (X, KV)),
        (lambda: Recurrent("LSTM"), SEQ),
        (lambda: Recurrent("GRU"), SEQ),
    ],
    ids=["mha", "mha_cross", "lstm", "gru"],
)
def test_torch_layers_pass_check_adapter_with_biases(build, inputs):
    model = build()
    report = si.testing.check_adapter(model, inputs, biases=True)
    assert {"layouts", "by_hand", "restore", "restore_on_error", "find"} <= set(report.passed)
    assert any(".b_" in n or ".bias_" in n for n in report.targets)


@pytest.mark.parametrize("build, inputs", [(SelfAttention, X), (lambda: Recurrent("LSTM"), SEQ)])
def test_find_trains_gumbel_sigmoid_through_heads_and_gates(build, inputs):
    model = build()
    before = snapshot(model)
    projection = torch.randn(model(inputs).shape, generator=torch.Generator().manual_seed(5))
    loss = lambda m, batch: (m(batch) * projection).sum()  # noqa: E731
    method = si.methods.create("gumbel_sigmoid", lr=0.5, init_logit=0.5, mask_samples=1)
    result = si.find(model, method, loss, [inputs] * 3, steps=3, progress=False)
    assert set(result.scores) == set(si.targets(model))
    start = torch.sigmoid(torch.tensor(0.5))
    moved = [n for n, s in result.scores.items() if not torch.allclose(s, start)]
    assert moved == list(result.scores)  # every head / gate target received gradients
    assert_bit_exact(model, before)


def test_nnsight_wrapper_names_masks_and_fingerprints_the_same_weights():
    nnsight = pytest.importorskip("nnsight")
    model = SelfAttention().eval()
    wrapped = nnsight.NNsight(model)
    assert si.targets(wrapped, biases=True) == si.targets(model, biases=True)
    assert si.fingerprint(wrapped) == si.fingerprint(model)
    masks = si.Subnetwork(random_masks(si.targets(model, biases=True)))
    with torch.no_grad():
        with si.masked(model, masks):
            bare = model(X)
        with si.masked(wrapped, masks):
            through_wrapper = model(X)
    assert torch.equal(bare, through_wrapper)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        with si.masked(wrapped, masks, ablation=si.ResampleAblation([X])):
            pass


# ------------------------------------------------------------------ opt-in biases and norms
class Planted(nn.Module):
    """``y = LayerNorm(W x + b)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)

    def forward(self, x):
        return self.ln(self.fc(x))


def test_biases_and_norms_are_opt_in_and_outside_the_fingerprint():
    model = Planted()
    assert list(si.targets(model)) == ["fc.weight"]
    assert list(si.targets(model, include="*")) == ["fc.weight"]
    assert list(si.targets(model, biases=True)) == ["fc.weight", "fc.bias", "ln.weight", "ln.bias"]
    found = si.targets(model, include="*.bias", biases=True)
    assert [t.kind for t in found.values()] == ["bias", "norm"]
    assert all(not t.default for t in found.values())
    with pytest.raises(KeyError, match=r"'fc\.bias' matches only bias / norm .*biases=True"):
        si.targets(model, include="fc.bias")
    with pytest.raises(KeyError, match="biases=True"):
        si.find(model, "magnitude", lambda m, b: m(b).sum(), [X[0, :, :8]], targets="fc.bias")
    printed = si.fingerprint(model)
    with torch.no_grad():
        model.fc.bias.add_(1.0)
        model.ln.weight.mul_(2.0)
    assert si.fingerprint(model) == printed  # only some wrappers name biases
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert si.fingerprint(model) != printed


def test_bias_masks_reject_input_based_ablations_clearly():
    model = Planted()
    masks = {"fc.bias": torch.zeros(6, dtype=torch.bool)}
    with pytest.raises(TypeError, match=r"'fc'\.bias .*Zero ablation"):
        with si.masked(model, masks, ablation=si.MeanAblation([torch.randn(4, 8)])):
            pass
    with torch.no_grad(), si.masked(model, masks):
        torch.testing.assert_close(model(X[0, :, :8]), model.ln(X[0, :, :8] @ model.fc.weight.T))


def test_find_recovers_a_planted_bias_subnetwork():
    """The data were made by the same layer with some bias entries zero (the planted
    subnetwork); masking only the bias, Gumbel-sigmoid recovers exactly those entries."""
    model = Planted()
    planted = torch.tensor([True, False, True, True, False, True])
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([0.5, 3.0, -0.5, 0.8, -3.0, -0.7]))
        inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
        goal = model.ln(inputs @ model.fc.weight.T + model.fc.bias * planted)
    targets = si.targets(model, include="fc.bias", biases=True)
    method = si.methods.create("gumbel_sigmoid", lr=0.1, alpha=0.0, mask_samples=1)
    loss = lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).mean()  # noqa: E731
    result = si.find(model, method, loss, [(inputs, goal)], targets=targets, steps=150,
                     progress=False, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(result.subnetwork["fc.bias"], planted)
    with torch.no_grad(), si.masked(model, result.subnetwork):
        torch.testing.assert_close(model(inputs), goal)


# ------------------------------------------------------------------ Hugging Face GPT-2 / Llama
def hf_with_biases(kind):
    """A tiny GPT-2, or a Llama with ``attention_bias`` and ``mlp_bias``, whose biases and norm
    weights are random (transformers initialises them to 0 and 1)."""
    pytest.importorskip("transformers")
    from _hf_models import gpt2, llama

    model = gpt2() if kind == "gpt2" else llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.normal_(1.0 if "norm" in name or ".ln_" in name else 0.0, 0.5)
    return model


def test_hf_bias_and_norm_targets_are_views_of_the_real_tensors():
    from _hf_models import LAYERS, D

    gpt2 = hf_with_biases("gpt2")
    found = si.targets(gpt2, biases=True, include=["blocks.*.attn.b_*", "*.w", "*.b", "*mlp.b_*"])
    per_block = {"attn.b_Q", "attn.b_K", "attn.b_V", "attn.b_O", "mlp.b_in", "mlp.b_out",
                 "ln1.w", "ln1.b", "ln2.w", "ln2.b"}  # fmt: skip
    expected = {f"blocks.{i}.{c}" for i in range(LAYERS) for c in per_block}
    assert set(found) == expected | {"ln_final.w", "ln_final.b"}
    block = gpt2.transformer.h[1]
    by_hand = {
        "blocks.1.attn.b_K": rearrange(block.attn.c_attn.bias[D : 2 * D], "(h e) -> h e", h=4),
        "blocks.1.mlp.b_in": block.mlp.c_fc.bias,
        "blocks.1.ln2.b": block.ln_2.bias,
        "ln_final.w": gpt2.transformer.ln_f.weight,
    }
    llama = hf_with_biases("llama")
    found_llama = si.targets(llama, biases=True, include=["*.b_*", "*.w"])
    layer = llama.model.layers[0]
    by_hand_llama = {
        "blocks.0.attn.b_K": rearrange(layer.self_attn.k_proj.bias, "(h e) -> h e", h=2),
        "blocks.0.mlp.b_gate": layer.mlp.gate_proj.bias,
        "blocks.0.ln2.w": layer.post_attention_layernorm.weight,
        "ln_final.w": llama.model.norm.weight,
    }
    assert found_llama["blocks.0.attn.b_K"].axes == ("kv_head", "d_head")
    for model, targets, expected_views in (
        (gpt2, found, by_hand),
        (llama, found_llama, by_hand_llama),
    ):
        for name, tensor in expected_views.items():
            target = targets[name]
            real = getattr(model.get_submodule(target.module), target.attribute)
            assert torch.equal(target.layout.to_canonical(real), tensor), name
            assert not target.default and target.kind in ("bias", "norm")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_bias_and_norm_targets_pass_check_adapter(kind):
    from _hf_models import TOKENS

    model = hf_with_biases(kind)
    printed = si.fingerprint(model)
    report = si.testing.check_adapter(
        model, TOKENS, include=["*.b_*", "*.w", "blocks.0.attn.W_Q"], biases=True
    )
    assert {"by_hand", "restore", "restore_on_error", "find"} <= set(report.passed)
    assert "blocks.0.ln1.w" in report.targets and "blocks.1.attn.b_V" in report.targets
    assert si.fingerprint(model) == printed
