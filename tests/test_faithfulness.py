"""faithfulness_curve: MIB's CPR / CMD against a hand computation, exact counts and the planted
subnetwork's curve, one attachment, the model left bit-exact, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp._masked import Prepared
from subnet_interp.analysis import (
    MIB_DENSITIES,
    FaithfulnessCurve,
    faithfulness_areas,
    faithfulness_curve,
    kl_to_full,
    loss,
)
from subnet_interp.tasks import planted_mlp


# ------------------------------------------------------------ areas by hand
def test_areas_equal_a_hand_computation():
    x = (0.1, 0.2, 0.5, 1.0)
    f = (0.0, 0.5, 1.5, 1.0)
    # trapezoids under f:     0.1*(0+0.5)/2 + 0.3*(0.5+1.5)/2 + 0.5*(1.5+1)/2
    # trapezoids of |1 - f|:  0.1*(1+0.5)/2 + 0.3*(0.5+0.5)/2 + 0.5*(0.5+0)/2
    cpr, cmd = faithfulness_areas(x, f)
    assert cpr == pytest.approx(0.025 + 0.3 + 0.625)
    assert cmd == pytest.approx(0.075 + 0.15 + 0.125)
    curve = FaithfulnessCurve(
        metric="m", higher_is_better=True, ablation="zero", densities=x, counts=(1, 2, 5, 10),
        total=10, values=f, faithfulness=f, full=1.0, empty=0.0,
    )  # fmt: skip
    assert (curve.cpr, curve.cmd) == (cpr, cmd)
    assert "CPR 0.9500" in str(curve) and "CMD 0.3500" in str(curve)


def test_a_perfect_curve_on_mibs_grid_and_degenerate_curves():
    cpr, cmd = faithfulness_areas(MIB_DENSITIES, [1.0] * len(MIB_DENSITIES))
    assert cpr == pytest.approx(0.999) and cmd == 0.0  # MIB integrates from 0.001, not 0
    assert MIB_DENSITIES == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert faithfulness_areas([0.5], [0.3]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        faithfulness_areas([0.5, 0.1], [1.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        faithfulness_areas([0.1, 0.5], [1.0])


# ------------------------------------------------------------ planted task
@pytest.fixture(scope="module")
def planted():
    return planted_mlp()


def noisy_scores(task, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: mask.float() + 0.01 * torch.randn(mask.shape, generator=gen)
        for name, mask in task.planted.masks.items()
    }


def planted_density(task):
    kept = sum(int(m.sum()) for m in task.planted.masks.values())
    total = sum(m.numel() for m in task.planted.masks.values())
    return kept, total, kept / total


def test_planted_curve_is_faithful_at_the_planted_size(planted, monkeypatch):
    attachments = []
    original = Prepared.attachment
    monkeypatch.setattr(
        Prepared,
        "attachment",
        lambda self, *a, **k: attachments.append(1) or original(self, *a, **k),
    )
    kept, total, density = planted_density(planted)
    densities = (0.0, 0.01, 0.05, density, 0.5, 1.0)
    before = snapshot(planted.model)
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted), planted.batches(128), loss(planted.loss_fn),
        densities=densities,
    )  # fmt: skip
    assert attachments == [1]  # one attachment, masks swapped per density
    assert_bit_exact(planted.model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in planted.model.modules())
    assert curve.total == total
    assert curve.counts == tuple(round(d * total) for d in densities)
    assert curve.counts[3] == kept
    assert curve.densities == densities
    assert curve.values[0] == curve.empty  # density 0 is the empty circuit
    assert curve.values[-1] == pytest.approx(curve.full, abs=1e-7)  # density 1 is the model
    assert curve.full == pytest.approx(0.0, abs=1e-7) and curve.empty > 1.0
    assert curve.faithfulness[0] == 0.0
    assert curve.faithfulness[3] == pytest.approx(1.0, abs=1e-6)
    assert curve.faithfulness[1] < 0.5  # too small to compute the task
    assert curve.cpr == faithfulness_areas(densities, curve.faithfulness)[0]
    assert 0 < curve.cmd < 1 and curve.cpr + curve.cmd == pytest.approx(1.0)  # 0 <= f <= 1
    text = str(curve)
    assert "loss (lower is better), zero ablation, 256 scored weights" in text
    assert "CPR" in text and "CMD" in text and str(kept) in text


def test_default_grid_is_mibs(planted):
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted), planted.batches(256), loss(planted.loss_fn)
    )
    assert curve.densities == MIB_DENSITIES
    assert curve.counts == tuple(round(d * curve.total) for d in MIB_DENSITIES)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)


def test_mean_ablation_per_target_and_a_reference_metric(planted):
    kept, _, density = planted_density(planted)
    inputs = [x for x, _ in planted.batches(128)]
    before = snapshot(planted.model)
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted, seed=1), planted.batches(128), loss(planted.loss_fn),
        densities=(0.0, density, 1.0), ablation=si.MeanAblation(inputs), per_target=True,
    )  # fmt: skip
    assert curve.ablation == "mean"
    sizes = {n: m.numel() for n, m in planted.planted.masks.items()}
    assert curve.counts == tuple(sum(round(d * n) for n in sizes.values()) for d in curve.densities)
    assert curve.values[0] == curve.empty and curve.empty > 1.0
    assert curve.values[-1] == pytest.approx(curve.full, abs=1e-7)
    assert_bit_exact(planted.model, before)

    kl = kl_to_full(lambda model, batch: model(batch[0])[:, : planted.task_outputs])
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted), planted.batches(128), kl, densities=(density, 1.0)
    )
    assert curve.full == pytest.approx(0.0, abs=1e-6)
    assert curve.faithfulness == pytest.approx((1.0, 1.0), abs=1e-4)
    assert_bit_exact(planted.model, before)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kind", ["resample", "reinit"])
def test_random_ablations_compare_every_configuration_on_the_same_draws(planted, kind):
    """Under resample and re-initialisation ablation the empty circuit scores faithfulness 0
    exactly (it is measured on the draws the density-0 circuit gets), and a repeated call, of
    the curve or of ablation_effect, gives the same numbers."""
    inputs = [x for x, _ in planted.batches(128)]

    def ablation():
        return si.ResampleAblation(inputs) if kind == "resample" else si.ReinitAblation()

    abl = ablation()
    kept, _, density = planted_density(planted)
    curves = [
        faithfulness_curve(
            planted.model,
            noisy_scores(planted),
            planted.batches(128),
            loss(planted.loss_fn),
            densities=(0.0, 0.05, density, 1.0),
            ablation=abl,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert curves[0].values[0] == curves[0].empty and curves[0].faithfulness[0] == 0.0
    assert curves[0].values == curves[1].values and curves[0].empty == curves[1].empty
    sub = si.Subnetwork.from_scores(noisy_scores(planted), count=kept)
    reports = [
        si.analysis.ablation_effect(
            planted.model,
            sub,
            loss(planted.loss_fn),
            planted.batches(128),
            controls=2,
            ablation=abl,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        for _ in range(2)
    ]
    assert (reports[0].kept, reports[0].empty) == (reports[1].kept, reports[1].empty)
    assert torch.equal(reports[0].controls, reports[1].controls)


def test_errors_say_what_was_given_and_the_fix(planted):
    scores = noisy_scores(planted)
    metric, data = loss(planted.loss_fn), planted.batches(256)
    with pytest.raises(si.NotFoundError, match=r"'9\.weight' is not a maskable weight.*Available"):
        faithfulness_curve(planted.model, {**scores, "9.weight": scores["0.weight"]}, data, metric)
    with pytest.raises(ValueError, match=r"has shape \(6, 16\), expected \(16, 10\)"):
        faithfulness_curve(planted.model, {"0.weight": scores["2.weight"]}, data, metric)
    with pytest.raises(ValueError, match=r"got \(0\.1, 5\.0\); offending: \[5\.0\].*divide by 100"):
        faithfulness_curve(planted.model, scores, data, metric, densities=(0.1, 5.0))
    with pytest.raises(ValueError, match=r"offending: \[-0\.1\]"):
        faithfulness_curve(planted.model, scores, data, metric, densities=[-0.1, 0.5])
    with pytest.raises(ValueError, match=r"strictly increasing.*sorted\(set\(densities\)\)"):
        faithfulness_curve(planted.model, scores, data, metric, densities=[0.5, 0.1])
    with pytest.raises(ValueError, match="non-empty"):
        faithfulness_curve(planted.model, scores, data, metric, densities=[])
    with pytest.raises(TypeError, match="must be a float tensor"):
        faithfulness_curve(
            planted.model, {"0.weight": planted.planted.masks["0.weight"]}, data, metric
        )
    # the tests' beartype hook refuses it first; without it the message says how to convert
    with pytest.raises(TypeError, match="Subnetwork"):
        faithfulness_curve(planted.model, planted.planted, data, metric)
    with pytest.raises(ValueError, match="higher_is_better"):
        faithfulness_curve(planted.model, scores, data, planted.loss_fn)
    assert not any(m._forward_hooks for m in planted.model.modules())


def test_constant_metric_gives_nan_faithfulness(planted):
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted), planted.batches(256),
        lambda model, batch: torch.tensor(1.0), higher_is_better=True, densities=(0.5, 1.0),
    )  # fmt: skip
    assert curve.full == curve.empty == 1.0
    assert all(math.isnan(f) for f in curve.faithfulness)


def test_plot_faithfulness(planted, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    curve = faithfulness_curve(
        planted.model, noisy_scores(planted), planted.batches(256), loss(planted.loss_fn),
        densities=(0.0, 0.1, 0.5, 1.0),
    )  # fmt: skip
    fig = si.analysis.plot_faithfulness(curve, path=str(tmp_path / "curve.png"))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert fig.axes[0].get_xscale() == "log"
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_a_find_result_brings_its_scores_and_its_model_fingerprint(planted):
    result = si.find(planted.model, "magnitude", planted.loss_fn, planted.batches(128))
    args = (planted.batches(128), loss(planted.loss_fn))
    curve = faithfulness_curve(planted.model, result, *args, densities=(0.1, 1.0))
    same = faithfulness_curve(planted.model, result.scores, *args, densities=(0.1, 1.0))
    assert curve.values == same.values and curve.counts == same.counts
    other = planted_mlp(generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="fingerprint"):
        faithfulness_curve(other.model, result, *args, densities=(0.1, 1.0))
    faithfulness_curve(other.model, result, *args, densities=(0.1, 1.0), strict=False)
