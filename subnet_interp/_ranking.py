"""Rank continuous per-weight scores so that masks of an exact size can be cut from them.

One ranking serves every exact-size mask (``Subnetwork.from_scores``, ``FindResult.at_density``,
faithfulness curves): the weight with the highest score has rank 0; ties are broken by position
(targets in the mapping's order, then row-major index within a target), so the same scores
always give the same masks. Keeping the ``count`` best weights is then ``rank < count``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor


def _check(scores: Mapping[str, Tensor]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(
            f"`scores` must be a non-empty mapping of target name -> float tensor, got "
            f"{type(scores).__name__}{'' if not isinstance(scores, Mapping) else ' (empty)'}."
        )
    for name, value in scores.items():
        if not isinstance(value, Tensor) or not value.dtype.is_floating_point:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(
                f"scores[{name!r}] must be a float tensor, got {got}. Scores are continuous "
                "(e.g. FindResult.scores); to use a binary mask, build an si.Subnetwork."
            )
        if bool(torch.isnan(value).any()):
            raise ValueError(f"scores[{name!r}] contains NaN; every weight needs a score to rank.")


def _ranks_of(values: Tensor) -> Tensor:
    """Rank of each entry of a 1-D tensor: 0 for the largest, ties by ascending position."""
    order = torch.sort(values, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def ranks(scores: Mapping[str, Tensor], *, per_target: bool = False) -> dict[str, Tensor]:
    """The rank of every weight (int64, shaped like its score): 0 is the highest score.

    Scores are compared exactly: across targets in the widest of their dtypes (at least
    float32), so float64 scores are not rounded before they are ranked.

    Args:
        scores: target name -> float scores (any device; all on the same one if global).
        per_target: rank within each target separately instead of across all of them.
    """
    _check(scores)
    if per_target:
        return {
            name: _ranks_of(value.flatten()).view(value.shape) for name, value in scores.items()
        }
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in scores.values()), torch.float32)
    flat = torch.cat([value.detach().flatten().to(dtype) for value in scores.values()])
    all_ranks = _ranks_of(flat)
    result, start = {}, 0
    for name, value in scores.items():
        result[name] = all_ranks[start : start + value.numel()].view(value.shape)
        start += value.numel()
    return result


def kept_count(total: int, *, density: float | None = None, count: int | None = None) -> int:
    """How many weights to keep: ``round(density * total)``, or ``count``; exactly one given."""
    if (density is None) == (count is None):
        raise ValueError(
            f"Pass exactly one of `density` and `count`, got density={density!r}, count={count!r}."
        )
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
            raise ValueError(f"`count` must be an int in [0, {total}], got {count!r}.")
        return count
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"`density` must be a number in [0, 1], got {density!r}.")
    return round(density * total)


def top_masks(
    scores: Mapping[str, Tensor],
    *,
    density: float | None = None,
    count: int | None = None,
    per_target: bool = False,
) -> dict[str, Tensor]:
    """Bool masks keeping exactly the top-ranked weights (see ``Subnetwork.from_scores``)."""
    if not isinstance(per_target, bool):
        raise TypeError(f"`per_target` must be True or False, got {per_target!r}.")
    if density is None and count is None:
        raise ValueError(
            "Pass the size of the mask: density=<fraction in [0, 1]> (keeps round(density * N) "
            "weights) or count=<number of weights>; got neither."
        )
    if density is not None and count is not None:
        raise ValueError(
            f"Pass only one of `density` and `count`, got density={density!r} and "
            f"count={count!r}; drop one of them."
        )
    if per_target and count is not None:
        raise ValueError(
            f"per_target=True takes a `density` (each target keeps round(density * its size)), "
            f"got count={count!r}; targets differ in size, so pass density=..., or per_target="
            "False for a count over all targets."
        )
    rank = ranks(scores, per_target=per_target)
    if per_target:
        return {n: r < kept_count(r.numel(), density=density) for n, r in rank.items()}
    keep = kept_count(sum(r.numel() for r in rank.values()), density=density, count=count)
    return {n: r < keep for n, r in rank.items()}


__all__ = ["kept_count", "ranks", "top_masks"]
