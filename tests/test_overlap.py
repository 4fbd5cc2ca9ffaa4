"""Overlap statistics against hand formulas and brute-force simulation."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import overlap, overlap_matrix, overlap_test
from subnet_interp.analysis.overlap import hypergeometric_moments


def sub(**masks):
    return si.Subnetwork({k: torch.tensor(v, dtype=torch.bool) for k, v in masks.items()})


def test_overlap_measures_match_hand_formulas():
    a = sub(x=[1, 1, 1, 0, 0, 0], y=[1, 0])
    b = sub(x=[0, 1, 1, 1, 1, 0], y=[1, 1])
    result = overlap(a, b)
    # total: |A| = 4, |B| = 6, |A∩B| = 3, union 7
    assert (result.size_a, result.size_b, result.intersection, result.union) == (4, 6, 3, 7)
    assert result.iou == pytest.approx(3 / 7)
    assert result.dice == pytest.approx(6 / 10)
    assert result.overlap_coefficient == pytest.approx(3 / 4)
    assert result.sharing_a == pytest.approx(3 / 4) and result.sharing_b == pytest.approx(3 / 6)
    assert result.per_target["x"].iou == pytest.approx(2 / 5)
    assert result.per_target["y"].iou == pytest.approx(1 / 2)


def test_empty_sets_give_nan_not_errors():
    empty = sub(x=[0, 0, 0])
    assert torch.isnan(torch.tensor(overlap(empty, empty).iou))


def test_hypergeometric_moments_match_simulation():
    gen = torch.Generator().manual_seed(0)
    n, size_a, size_b, sims = 50, 12, 20, 20000
    keys_a = torch.rand(sims, n, generator=gen).argsort(1) < size_a
    keys_b = torch.rand(sims, n, generator=gen).argsort(1) < size_b
    inter = (keys_a & keys_b).sum(1).double()
    mean, var = hypergeometric_moments(torch.tensor(n), torch.tensor(size_a), torch.tensor(size_b))
    assert float(mean) == pytest.approx(float(inter.mean()), rel=0.02)
    assert float(var) == pytest.approx(float(inter.var()), rel=0.05)


def test_exact_p_value_matches_simulation_over_several_targets():
    gen = torch.Generator().manual_seed(1)
    shapes = {"x": 30, "y": 40}
    a = si.Subnetwork({"x": torch.arange(30) < 10, "y": torch.arange(40) < 25})
    b = si.Subnetwork({"x": torch.arange(30) < 12, "y": torch.arange(40) < 20})
    result = overlap_test(a, b)
    assert result.exact and result.observed == 10 + 20
    sims = 20000
    total = torch.zeros(sims)
    for name, n in shapes.items():
        ka = torch.rand(sims, n, generator=gen).argsort(1) < int(a[name].sum())
        kb = torch.rand(sims, n, generator=gen).argsort(1) < int(b[name].sum())
        total += (ka & kb).sum(1)
    assert result.p_value == pytest.approx(
        float((total >= result.observed).float().mean()), abs=0.01
    )
    assert result.expected == pytest.approx(float(total.mean()), rel=0.02)
    approx = overlap_test(a, b, exact_limit=0)
    assert not approx.exact and approx.p_value == pytest.approx(result.p_value, abs=0.02)


def test_independent_random_masks_are_significant_at_the_nominal_rate():
    gen = torch.Generator().manual_seed(2)
    p_values = []
    for _ in range(400):
        a = si.Subnetwork(
            {"w": torch.rand(20, 20, generator=gen) < 0.3, "v": torch.rand(50, generator=gen) < 0.5}
        )
        b = si.Subnetwork(
            {"w": torch.rand(20, 20, generator=gen) < 0.2, "v": torch.rand(50, generator=gen) < 0.4}
        )
        p_values.append(overlap_test(a, b).p_value)
    rate = float((torch.tensor(p_values) < 0.05).float().mean())
    assert 0.01 <= rate <= 0.09  # discrete test: at most about 5%


def test_identical_masks_are_highly_significant():
    gen = torch.Generator().manual_seed(3)
    a = si.Subnetwork({"w": torch.rand(100, 100, generator=gen) < 0.2})
    result = overlap_test(a, a)
    assert result.p_value < 1e-12 and result.kappa == pytest.approx(1.0)
    assert overlap_test(a, ~a, alternative="less").p_value < 1e-12
    assert overlap_test(a, ~a).kappa < 0


def test_overlap_matrix_matches_pairwise():
    gen = torch.Generator().manual_seed(4)
    subs = [
        si.Subnetwork(
            {"w": torch.rand(30, 7, generator=gen) < d, "v": torch.rand(11, generator=gen) < d}
        )
        for d in (0.2, 0.5, 0.7)
    ]
    for measure in ("iou", "dice", "overlap_coefficient"):
        matrix = overlap_matrix(subs, measure, chunk=50)
        for i in range(3):
            for j in range(3):
                assert float(matrix[i, j]) == pytest.approx(
                    getattr(overlap(subs[i], subs[j]), measure)
                )
    sharing = overlap_matrix(subs, "sharing")
    assert float(sharing[0, 1]) == pytest.approx(overlap(subs[0], subs[1]).sharing_a)


def test_errors_name_the_problem():
    a = sub(x=[1, 0])
    with pytest.raises(ValueError, match="same targets"):
        overlap(a, sub(y=[1, 0]))
    with pytest.raises(ValueError, match="alternative must be"):
        overlap_test(a, a, alternative="bigger")
    with pytest.raises(ValueError, match="measure must be one of"):
        overlap_matrix([a], "jaccard")
