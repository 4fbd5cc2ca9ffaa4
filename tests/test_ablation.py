"""Ablation types against hand formulas; ablation_effect against a planted subnetwork."""

from __future__ import annotations

import math

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp.analysis import ablation_effect, kl_to_full, loss
from subnet_interp.tasks import planted_mlp


def linear_setup():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    data = [torch.randn(8, 5) + 2.0 for _ in range(3)]
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    return layer, data, mask


def test_mean_ablation_of_a_linear_layer_matches_formula():
    layer, data, mask = linear_setup()
    x = torch.randn(4, 5)
    mean_x = torch.cat(data).mean(0)
    W, b = layer.weight.detach(), layer.bias.detach()
    expected = x @ (mask * W).T + ((~mask) * W) @ mean_x + b
    before = snapshot(layer)
    with torch.no_grad(), si.masked(layer, {"weight": mask}, ablation=si.MeanAblation(data)):
        got = layer(x)
    torch.testing.assert_close(got, expected)
    assert_bit_exact(layer, before)
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_resample_ablation_uses_another_examples_input():
    layer, _, mask = linear_setup()
    reference = torch.randn(1, 5)
    x = torch.randn(6, 5)
    W, b = layer.weight.detach(), layer.bias.detach()
    expected = x @ (mask * W).T + reference @ ((~mask) * W).T + b
    with (
        torch.no_grad(),
        si.masked(layer, {"weight": mask}, ablation=si.ResampleAblation([reference])),
    ):
        got = layer(x)
    torch.testing.assert_close(got, expected)


def test_resample_ablation_explains_shape_mismatch():
    layer, _, mask = linear_setup()
    seq_layer_input = [torch.randn(2, 7, 5)]
    with pytest.raises(
        ValueError,
        match=r"reference inputs have shape \(7, 5\) per example but the model now gets \(3, 5\)",
    ):
        with (
            torch.no_grad(),
            si.masked(layer, {"weight": mask}, ablation=si.ResampleAblation(seq_layer_input)),
        ):
            layer(torch.randn(2, 3, 5))


def test_reinit_ablation_draws_from_the_init_distribution():
    layer = torch.nn.Linear(400, 50)
    mask = torch.zeros(50, 400, dtype=torch.bool)
    mask[:, :200] = True
    with (
        torch.no_grad(),
        si.masked(
            layer, {"weight": mask}, ablation=si.ReinitAblation(torch.Generator().manual_seed(0))
        ),
    ):
        effective = layer.weight.clone()
        original = layer.parametrizations.weight.original
    assert torch.equal(effective[:, :200], original[:, :200])
    fresh = effective[:, 200:]
    bound = 1 / math.sqrt(400)
    assert float(fresh.abs().max()) <= bound and not torch.equal(fresh, original[:, 200:])
    assert float(fresh.var()) == pytest.approx(bound**2 / 3, rel=0.05)  # U(-b, b)


def test_mean_ablation_on_a_conv_layer_is_refused_clearly():
    conv = torch.nn.Conv1d(2, 2, 3)
    with pytest.raises(
        TypeError, match="MeanAblation needs each target to be the weight of an nn.Linear"
    ):
        with si.masked(
            conv,
            {"weight": torch.ones(2, 2, 3, dtype=torch.bool)},
            ablation=si.MeanAblation([torch.randn(1, 2, 5)]),
        ):
            pass
    assert not hasattr(conv, "parametrizations")


@pytest.fixture(scope="module")
def planted():
    task = planted_mlp()
    return task


def test_ablation_effect_on_the_planted_subnetwork(planted):
    report = ablation_effect(
        planted.model, planted.planted, loss(planted.loss_fn), planted.batches(128), controls=10
    )
    assert report.full == pytest.approx(0.0, abs=1e-6) and report.kept == pytest.approx(
        0.0, abs=1e-6
    )
    assert report.removed > 1.0 and report.empty > 1.0
    assert report.faithfulness == pytest.approx(1.0)
    assert report.percentile == 1.0 and report.p_value == pytest.approx(1 / 11)
    assert float(report.controls.min()) > report.kept
    assert "faithfulness" in str(report)


def test_complement_controls_avoid_the_subnetwork(planted):
    gen = torch.Generator().manual_seed(0)
    control = si.random_like(planted.planted, gen, within=~planted.planted)
    assert (control & planted.planted).kept() == 0
    assert control.densities() == pytest.approx(planted.planted.densities())
    report = ablation_effect(
        planted.model,
        planted.planted,
        loss(planted.loss_fn),
        planted.batches(256),
        controls=3,
        control_kind="complement",
    )
    assert report.control_kind == "complement" and report.controls.numel() == 3


def test_complement_controls_need_low_density(planted):
    with pytest.raises(ValueError, match="Complement sampling needs"):
        ablation_effect(
            planted.model,
            ~planted.planted,
            loss(planted.loss_fn),
            planted.batches(256),
            controls=1,
            control_kind="complement",
        )


def test_kl_to_full_is_zero_for_the_full_model(planted):
    metric = kl_to_full(lambda model, batch: model(batch[0])[:, : planted.task_outputs])
    report = ablation_effect(
        planted.model, planted.planted, metric, planted.batches(128), controls=2
    )
    assert report.full == pytest.approx(0.0, abs=1e-6)
    assert report.kept == pytest.approx(0.0, abs=1e-5)  # the planted set computes the task outputs
    assert report.removed > 0


def test_plain_metric_needs_direction(planted):
    with pytest.raises(ValueError, match="higher_is_better"):
        ablation_effect(
            planted.model, planted.planted, planted.loss_fn, planted.batches(), controls=1
        )
    report = ablation_effect(
        planted.model,
        planted.planted,
        planted.loss_fn,
        planted.batches(),
        controls=1,
        higher_is_better=False,
    )
    assert report.kept < report.removed


def test_mean_ablation_in_ablation_effect_restores(planted):
    before = snapshot(planted.model)
    inputs = [x for x, _ in planted.batches(128)]
    report = ablation_effect(
        planted.model,
        planted.planted,
        loss(planted.loss_fn),
        planted.batches(128),
        controls=2,
        ablation=si.MeanAblation(inputs),
    )
    assert report.kept < report.removed
    assert_bit_exact(planted.model, before)
    assert not any(m._forward_hooks for m in planted.model.modules())


def _fail_on_second_call(monkeypatch, owner, name):
    """Make ``owner.name`` raise the second time it is called (the first call runs as usual)."""
    real, calls = getattr(owner, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted failure while registering hooks")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return calls


@pytest.mark.parametrize("kind", ["mean", "resample", "patch"])
def test_a_failure_while_registering_hooks_leaves_no_hook_and_restores(monkeypatch, mlp, kind):
    """Hooks registered before the failure are removed (they used to stay on the model)."""
    from subnet_interp import _patching, _sites

    data = [torch.randn(4, 6, generator=torch.Generator().manual_seed(0))]
    if kind == "patch":  # nn.Linear layers get their own pre- and post-hooks per location
        ablation = si.PatchAblation(lambda model, batch: model(batch))
        calls = _fail_on_second_call(monkeypatch, _patching.PatchAblation, "_after")
    else:
        ablation = (si.MeanAblation if kind == "mean" else si.ResampleAblation)(data)
        calls = _fail_on_second_call(monkeypatch, _sites, "watch")
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in si.targets(mlp).items()}
    before = snapshot(mlp)
    with pytest.raises(RuntimeError, match="planted failure"):
        with si.masked(mlp, masks, ablation=ablation):
            pass
    assert len(calls) == 2  # the first location's hooks were registered
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mlp.modules())
    assert_bit_exact(mlp, before)
    with torch.no_grad(), si.masked(mlp, masks, ablation="zero"):
        mlp(data[0])  # attaches again: nothing half-attached was left


def test_mean_ablation_of_dict_batches_without_forward_says_to_pass_one():
    layer = torch.nn.Linear(3, 2)
    before = snapshot(layer)
    data = [{"x": torch.randn(4, 3)}]
    with pytest.raises(ValueError, match=r"(?s)model\(batch\) on a reference batch of type dict.*"
                       r"Pass forward=lambda model, batch"):  # fmt: skip
        with si.masked(layer, {"weight": torch.ones(2, 3, dtype=torch.bool)},
                       ablation=si.MeanAblation(data)):  # fmt: skip
            pass
    assert_bit_exact(layer, before)
    ablation = si.MeanAblation(data, forward=lambda model, batch: model(batch["x"]))
    with si.masked(layer, {"weight": torch.ones(2, 3, dtype=torch.bool)}, ablation=ablation):
        pass
