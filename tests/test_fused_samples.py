"""Gumbel-sigmoid's mask samples side by side in one forward (``sample_batching``): the same
masks as one forward per sample, a fall-back wherever a layer cannot take it, and the model
left as it was."""

from __future__ import annotations

import pytest
import torch
from _hf_models import gpt2, llama
from _util import assert_bit_exact, snapshot
from torch import nn

import subnet_interp as si
from subnet_interp import _fused
from subnet_interp.tasks import planted_mlp


def _run(model, loss_fn, data, mode, steps=8, init_logit=None, **kwargs):
    hparams = {} if init_logit is None else {"init_logit": init_logit}
    return si.find(
        model,
        si.methods.create("gumbel_sigmoid", **hparams),
        loss_fn,
        data,
        steps=steps,
        progress=False,
        log_every=1,
        sample_batching=mode,
        **kwargs,
    )


def _assert_same_run(a, b, atol=0.0):  # bit-identical scores
    for name, mask in a.subnetwork.masks.items():
        assert torch.equal(mask, b.subnetwork.masks[name]), name
        assert torch.allclose(a.scores[name], b.scores[name], atol=atol), name
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-4, abs=1e-6)


def _lm_loss(model, batch):
    logits = model(batch).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def _tokens(vocab=40, batch=8, seq=8, count=3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(count)]


def test_planted_mlp_fused_equals_sequential():
    task = planted_mlp()
    before = snapshot(task.model)
    runs = {
        mode: _run(task.model, task.loss_fn, task.batches(64), mode, steps=30, init_logit=0.1)
        for mode in ("sequential", "fused")
    }
    _assert_same_run(runs["sequential"], runs["fused"])
    assert runs["fused"].subnetwork.density() < 0.9  # the masks moved: the comparison bites
    assert_bit_exact(task.model, before)
    assert not any("forward" in vars(m) for m in task.model.modules())


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-conv1d", "llama-linear"])
def test_transformers_fused_equals_sequential(build):
    model = build()
    before = snapshot(model)
    data = _tokens()
    sequential = _run(model, _lm_loss, data, "sequential")
    fused = _run(model, _lm_loss, data, "fused")
    _assert_same_run(sequential, fused)
    recomputed = _run(model, _lm_loss, data, "fused", recompute_masks=True)
    _assert_same_run(fused, recomputed, atol=0)
    assert_bit_exact(model, before)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2-conv1d", "llama-linear"])
def test_weights_trained_with_the_mask_train_alike_in_lean_layers(build, monkeypatch):
    """Continuous sparsification trains the weights too: the lean layers (one rebuilt masked
    weight in backward) give the weights and masks of the parametrized layers, bit for bit."""
    from subnet_interp import _fused

    model = build()
    before = snapshot(model)
    data = _tokens()
    lean_calls = []
    original = _fused.SampleBatching.set_samples
    monkeypatch.setattr(
        _fused.SampleBatching,
        "set_samples",
        lambda self, *a, **k: lean_calls.append(1) or original(self, *a, **k),
    )
    method = si.methods.create("continuous_sparsification", num_rounds=1, rewind_fraction=1.0)
    runs = {}
    for mode in ("sequential", "auto"):
        runs[mode] = si.find(model, method, _lm_loss, data, steps=6, progress=False,
                             log_every=1, sample_batching=mode)  # fmt: skip
        assert bool(lean_calls) == (mode == "auto")
    _assert_same_run(runs["sequential"], runs["auto"])
    for name, weight in runs["auto"].weights.items():  # after 5 steps of training
        assert torch.equal(weight, runs["sequential"].weights[name]), name
    trained = si.find(model, method, _lm_loss, data, steps=1, progress=False).weights
    assert any(not torch.equal(trained[n], w) for n, w in runs["auto"].weights.items())
    assert_bit_exact(model, before)


def test_fused_under_autocast_equals_sequential():
    """Under bf16 autocast each part's product is cast as the layer's own is, and backward's
    bf16 output gradients give the fp32 input its gradient (the product is not written in place
    there: the dtypes differ)."""
    model = gpt2()

    def autocast_loss(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch).logits
        return _lm_loss(lambda _: type("Out", (), {"logits": logits.float()}), batch)

    data = _tokens()
    sequential = _run(model, autocast_loss, data, "sequential", steps=4)
    fused = _run(model, autocast_loss, data, "fused", steps=4)
    _assert_same_run(sequential, fused)
    assert (
        sequential.history["loss"] != _run(model, _lm_loss, data, "fused", steps=4).history["loss"]
    )


class _SequenceFirst(nn.Module):
    """A linear layer fed ``[seq, batch, d]``: its rows are not grouped by example."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):  # x: [batch, seq, d]
        hidden = torch.relu(self.inner(x.transpose(0, 1))).transpose(0, 1)
        return self.out(hidden).sum(dim=(1, 2))


class _ReadsWeight(nn.Module):
    """Uses one layer's weight directly instead of calling the layer."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        hidden = torch.relu(nn.functional.linear(x, self.inner.weight, self.inner.bias))
        return self.out(hidden).sum(dim=(1, 2))


def _regression_data(batch=8):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, 5, 6, generator=gen)
    return [(inputs, inputs.sum(dim=(1, 2)))]


def _mse(model, batch):
    inputs, targets = batch
    return nn.functional.mse_loss(model(inputs), targets)


@pytest.mark.parametrize(
    ("build", "reason"),
    [(_SequenceFirst, "leading dimension"), (_ReadsWeight, "read outside")],
    ids=["sequence-first", "reads-weight"],
)
def test_auto_falls_back_to_the_sequential_run_and_fused_refuses(build, reason):
    torch.manual_seed(0)
    model = build()
    before = snapshot(model)
    data = _regression_data()
    auto = _run(model, _mse, data, "auto", steps=10)
    _assert_same_run(_run(model, _mse, data, "sequential", steps=10), auto, atol=0)
    with pytest.raises(ValueError, match=reason) as error:
        _run(model, _mse, data, "fused", steps=10)
    assert "sample_batching='auto'" in str(error.value)
    assert_bit_exact(model, before)
    assert not any("forward" in vars(m) for m in model.modules())


def test_batches_that_do_not_split_evenly_are_fused_too(monkeypatch):
    """50 and 12 examples split into parts of 13/13/12/12 and 3/3/3/3 on both paths; the fused
    path takes every step (no switch of the loss's meaning between steps), and a mean loss
    gives the sequential run's masks: there each part's loss weighs its share of the
    examples."""
    task = planted_mlp()
    data = task.batches(50)
    assert sorted({len(x) for x, _ in data}) == [12, 50]
    sequential = _run(task.model, task.loss_fn, data, "sequential", steps=12, init_logit=0.1)
    calls = []
    original = _fused.fused_loss
    monkeypatch.setattr(_fused, "fused_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused = _run(task.model, task.loss_fn, data, "fused", steps=12, init_logit=0.1)
    assert len(calls) == 12
    _assert_same_run(sequential, fused, atol=1e-5)
    assert fused.subnetwork.density() < 0.95  # the masks moved: the comparison bites


def test_fused_refuses_owners_that_are_not_linear_layers_before_touching_the_model():
    class Convolution(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(5, 5, kernel_size=1)

        def forward(self, x):  # [batch, channels=5, length=6]
            return self.conv(x).sum(dim=(1, 2))

    model = Convolution()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not the weight of a plain nn.Linear"):
        _run(model, _mse, _regression_data(), "fused", steps=2)
    assert_bit_exact(model, before)
    assert not hasattr(model, "parametrizations")
    _run(model, _mse, _regression_data(), "auto", steps=2)  # auto: one sample at a time


def test_an_error_in_the_loss_leaves_no_fused_forward_behind():
    task = planted_mlp()
    before = snapshot(task.model)
    calls = []

    def failing(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("user error")
        return task.loss_fn(model, batch)

    with pytest.raises(KeyError, match="user error"):
        _run(task.model, failing, task.batches(64), "fused", steps=5)
    assert_bit_exact(task.model, before)
    assert not any("forward" in vars(m) for m in task.model.modules())


def test_unknown_sample_batching_is_refused():
    task = planted_mlp()
    with pytest.raises(ValueError, match="'auto', 'fused', 'sequential'.*'batched'"):
        _run(task.model, task.loss_fn, task.batches(64), "batched", steps=2)


@pytest.mark.parametrize(
    ("rows", "tiles"),
    [([(0, 3), (3, 3)], True), ([(0, 4), (2, 4)], False), ([(0, 3)], False)],
    ids=["tiling", "overlapping", "gap"],
)
def test_a_tensor_is_only_left_unfilled_where_its_targets_tile_it(rows, tiles):
    from subnet_interp._ablations import ZERO
    from subnet_interp._attach import _Location, _Masking, _Slot, _tiles
    from subnet_interp._types import Layout, Target

    layer = nn.Linear(4, 6)
    targets = [
        Target(
            f"part{i}",
            "",
            "weight",
            (size, 4),
            ("row", "col"),
            Layout((("narrow", 0, start, size),)),
        )
        for i, (start, size) in enumerate(rows)
    ]
    slot = _Slot(ZERO, ("", "weight"))
    location = _Location(layer, "weight", targets, slot, _Masking(slot), None)
    assert _tiles(location, layer.weight) is tiles
