"""Ranking scores for exact-size masks: highest first, ties by position, exact counts."""

from __future__ import annotations

import pytest
import torch

from subnet_interp._ranking import kept_count, ranks


def test_ranks_are_highest_first_with_ties_by_position():
    scores = {"a": torch.tensor([[1.0, 3.0], [3.0, 0.0]]), "b": torch.tensor([3.0, 2.0])}
    got = ranks(scores)
    assert got["a"].tolist() == [[4, 0], [1, 5]] and got["b"].tolist() == [2, 3]
    local = ranks(scores, per_target=True)
    assert local["a"].tolist() == [[2, 0], [1, 3]] and local["b"].tolist() == [0, 1]


def test_all_ties_keep_exactly_the_count():
    scores = {"w": torch.zeros(7, 3)}
    for count in range(22):
        assert int((ranks(scores)["w"] < count).sum()) == count


def test_kept_count_and_errors():
    assert kept_count(10, density=0.25) == round(2.5) and kept_count(10, count=3) == 3
    with pytest.raises(ValueError, match="exactly one of `density` and `count`"):
        kept_count(10)
    with pytest.raises(ValueError, match=r"`density` must be a number in \[0, 1\], got 1.5"):
        kept_count(10, density=1.5)
    with pytest.raises(ValueError, match=r"`count` must be an int in \[0, 10\], got 11"):
        kept_count(10, count=11)
    with pytest.raises(TypeError, match="must be a float tensor, got torch.bool"):
        ranks({"w": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="contains NaN"):
        ranks({"w": torch.tensor([float("nan")])})


def test_float64_scores_rank_exactly_across_targets():
    """Scores closer than float32's resolution keep their order, and a constant shift of every
    score changes nothing: the global ranking agrees with the per-target one."""
    close = torch.tensor([1.0, 1 + 1e-12, 1 + 2e-12, 1 + 3e-12], dtype=torch.float64)
    assert ranks({"x": close})["x"].tolist() == [3, 2, 1, 0]
    assert ranks({"x": close})["x"].tolist() == ranks({"x": close}, per_target=True)["x"].tolist()
    big = {
        "a": torch.tensor([1e8 + 1, 1e8 + 2], dtype=torch.float64),
        "b": torch.tensor([1e8 + 3, 1e8 + 4], dtype=torch.float64),
    }
    assert ranks(big)["b"].tolist() == [1, 0] and ranks(big)["a"].tolist() == [3, 2]
    mixed = {"a": torch.tensor([0.5], dtype=torch.bfloat16), "b": close}
    assert ranks(mixed)["a"].tolist() == [4] and ranks(mixed)["b"].tolist() == [3, 2, 1, 0]
