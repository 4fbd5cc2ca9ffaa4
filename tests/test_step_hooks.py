"""Mask optimiser steps inside backward (``_step_hooks``): the same masks, scores and history as
stepping after backward, no full set of mask gradients held, and the plain path wherever the
method or the run does not allow it."""

from __future__ import annotations

import pytest
import torch
from _hf_models import gpt2
from _util import assert_bit_exact, snapshot
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import subnet_interp as si
from subnet_interp import _step_hooks
from subnet_interp.tasks import planted_mlp

SEPARABLE = [
    ("continuous_sparsification_lepori", {}),
    ("hard_concrete", {}),
    ("gumbel_sigmoid", {"clip_grad_norm": None}),  # 4 samples, one fused backward
    ("gumbel_sigmoid", {"clip_grad_norm": None, "mask_samples": 1}),
    ("continuous_sparsification", {}),  # trains the weights too: they step in backward as well
]


def _find(model, loss_fn, data, method, hparams, hooked, monkeypatch, steps=12, **kwargs):
    with monkeypatch.context() as patch:
        if not hooked:
            patch.setattr(_step_hooks, "eligible", lambda plan, run: False)
        return si.find(
            model,
            si.methods.create(method, **hparams),
            loss_fn,
            data,
            steps=steps,
            log_every=1,
            progress=False,
            **kwargs,
        )


def _assert_identical(a, b):
    for name, mask in a.subnetwork.masks.items():
        assert torch.equal(mask, b.subnetwork.masks[name]), name
        assert torch.equal(a.scores[name], b.scores[name]), name
    assert a.history["loss"] == b.history["loss"]
    assert a.history["penalty"] == pytest.approx(b.history["penalty"], rel=1e-6)


@pytest.mark.parametrize("method,hparams", SEPARABLE, ids=lambda v: str(v))
def test_steps_inside_backward_give_bit_identical_runs(method, hparams, monkeypatch):
    task = planted_mlp()
    data = task.batches(64)
    before = snapshot(task.model)
    plain = _find(task.model, task.loss_fn, data, method, hparams, False, monkeypatch)
    hooked = _find(task.model, task.loss_fn, data, method, hparams, True, monkeypatch)
    _assert_identical(plain, hooked)
    moved = [not torch.equal(s, plain.scores[n].flatten()[0].expand_as(s))
             for n, s in plain.scores.items()]  # fmt: skip
    assert any(moved)  # the masks trained: the comparison bites
    assert_bit_exact(task.model, before)


def test_gpt2_with_an_unreached_target_is_bit_identical(monkeypatch):
    """GPT-2 (Conv1D, fused layers), with one target the loss never reads: it is stepped after
    backward on its penalty alone, as the plain path does."""
    model = gpt2()
    data = [torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]  # fmt: skip

    def loss_fn(net, batch):  # the last block's MLP output never reaches the loss
        hidden = net.transformer(batch, output_hidden_states=True).hidden_states[-2]
        return net.lm_head(hidden).logsumexp(-1).mean()

    method, hparams = "continuous_sparsification_lepori", {}
    plain = _find(model, loss_fn, data, method, hparams, False, monkeypatch, steps=4)
    hooked = _find(model, loss_fn, data, method, hparams, True, monkeypatch, steps=4)
    _assert_identical(plain, hooked)


def test_no_full_set_of_mask_gradients_is_held(monkeypatch):
    """When a mask steps, no other mask holds a gradient: at most one target's gradient lives
    at a time."""
    task = planted_mlp()
    seen: list[int] = []
    original = _step_hooks.HookedSteps._step

    def spy(self, name, param):
        seen.append(sum(p.grad is not None for p in self.run.params.values()))
        original(self, name, param)

    monkeypatch.setattr(_step_hooks.HookedSteps, "_step", spy)
    si.find(task.model, "continuous_sparsification_lepori", task.loss_fn, task.batches(64),
            steps=3, progress=False)  # fmt: skip
    targets = len(si.targets(task.model))
    assert len(seen) == 3 * targets
    assert max(seen) == 1


def test_weights_trained_with_the_mask_step_one_at_a_time(monkeypatch):
    """Continuous sparsification trains the weights too: each weight steps as its gradient
    completes, while no other weight holds one, and the model is left as it was."""
    task = planted_mlp()
    before = snapshot(task.model)
    seen: list[int] = []
    original = _step_hooks.HookedSteps._weight_hook

    def spy(self, param):
        weights = [p for g in self.run.weight_optimizer.param_groups for p in g["params"]]
        seen.append(sum(p.grad is not None for p in weights))
        original(self, param)

    monkeypatch.setattr(_step_hooks.HookedSteps, "_weight_hook", spy)
    si.find(task.model, "continuous_sparsification", task.loss_fn, task.batches(64), steps=3,
            progress=False)  # fmt: skip
    trained = [p for p in task.model.parameters() if p.requires_grad]
    assert len(seen) == 3 * len(trained)
    assert max(seen) == 1
    assert_bit_exact(task.model, before)


def test_each_step_in_backward_shows_its_optimiser_one_parameter():
    """A step taken in a hook passes over its own parameter only, not over every target's
    (which made a backward pass quadratic in the number of targets); the run is unchanged."""
    task = planted_mlp()
    sizes: list[int] = []

    def count(optimizer, args, kwargs):
        sizes.append(sum(len(group["params"]) for group in optimizer.param_groups))

    handle = register_optimizer_step_pre_hook(count)
    try:
        result = si.find(task.model, "continuous_sparsification", task.loss_fn,
                         task.batches(64), steps=3, progress=False)  # fmt: skip
    finally:
        handle.remove()
    masks = len(result.subnetwork.masks)
    weights = sum(p.requires_grad for p in task.model.parameters())
    assert sizes == [1] * (3 * (masks + weights))


@pytest.mark.parametrize(
    "method,hparams,why",
    [
        ("gumbel_sigmoid", {}, "global gradient clipping"),
        ("hard_concrete", {"target_density": 0.5}, "the Lagrangian couples the targets"),
    ],
)
def test_runs_that_need_every_gradient_step_after_backward(method, hparams, why, monkeypatch):
    task = planted_mlp()
    calls: list[str] = []
    monkeypatch.setattr(
        _step_hooks.HookedSteps, "_step", lambda self, name, param: calls.append(name)
    )
    si.find(task.model, si.methods.create(method, **hparams), task.loss_fn, task.batches(64),
            steps=2, progress=False)  # fmt: skip
    assert calls == [], why


def test_a_non_finite_loss_still_keeps_the_last_good_mask():
    """The in-backward steps skip on the device after a non-finite loss, as the plain path."""
    task = planted_mlp()
    data = task.batches(64)
    poisoned = [data[0], data[1], (data[2][0] * float("nan"), data[2][1])]
    good = si.find(task.model, "continuous_sparsification_lepori", task.loss_fn, data[:2],
                   steps=2, progress=False)  # fmt: skip
    with pytest.raises(si.NonFiniteLossError) as caught:
        si.find(task.model, "continuous_sparsification_lepori", task.loss_fn, poisoned,
                steps=6, log_every=5, progress=False)  # fmt: skip
    for name, mask in good.subnetwork.masks.items():
        assert torch.equal(caught.value.subnetwork.masks[name], mask), name


def test_sequential_samples_fall_back_to_stepping_after_backward(monkeypatch):
    """Several mask samples one after another are several backward passes: the masks step
    after the last, with the same result as the fused single pass."""
    task = planted_mlp()
    data = task.batches(64)
    hparams = {"clip_grad_norm": None}
    fused = _find(task.model, task.loss_fn, data, "gumbel_sigmoid", hparams, True, monkeypatch)
    sequential = _find(task.model, task.loss_fn, data, "gumbel_sigmoid", hparams, True,
                       monkeypatch, sample_batching="sequential")  # fmt: skip
    for name, mask in fused.subnetwork.masks.items():
        assert torch.equal(mask, sequential.subnetwork.masks[name]), name
    assert isinstance(task.model, nn.Module)
