"""Overlap of subnetworks, with a chance baseline (vectorised torch on the masks' device)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._subnetwork import Subnetwork


@dataclass(frozen=True)
class OverlapStats:
    """Set overlap of two subnetworks ``A`` and ``B`` over ``n`` weights.

    ``iou`` (Jaccard) = |A∩B|/|A∪B|; ``dice`` = 2|A∩B|/(|A|+|B|); ``overlap_coefficient``
    (IoMin, Csordás et al. 2021) = |A∩B|/min(|A|,|B|); ``sharing_a`` = |A∩B|/|A| (the fraction of
    A that B also uses) and ``sharing_b`` = |A∩B|/|B|. Empty denominators give ``nan``.
    """

    n: int
    size_a: int
    size_b: int
    intersection: int

    @property
    def union(self) -> int:
        """|A∪B|."""
        return self.size_a + self.size_b - self.intersection

    @property
    def iou(self) -> float:
        """Jaccard index |A∩B|/|A∪B|."""
        return _ratio(self.intersection, self.union)

    @property
    def dice(self) -> float:
        """2|A∩B|/(|A|+|B|)."""
        return _ratio(2 * self.intersection, self.size_a + self.size_b)

    @property
    def overlap_coefficient(self) -> float:
        """|A∩B|/min(|A|,|B|) (IoMin)."""
        return _ratio(self.intersection, min(self.size_a, self.size_b))

    @property
    def sharing_a(self) -> float:
        """|A∩B|/|A|: the fraction of A that B also uses."""
        return _ratio(self.intersection, self.size_a)

    @property
    def sharing_b(self) -> float:
        """|A∩B|/|B|: the fraction of B that A also uses."""
        return _ratio(self.intersection, self.size_b)

    def as_dict(self) -> dict[str, float | int]:
        """The counts and every ratio above, by name."""
        return {
            "n": self.n,
            "size_a": self.size_a,
            "size_b": self.size_b,
            "intersection": self.intersection,
            "union": self.union,
            "iou": self.iou,
            "dice": self.dice,
            "overlap_coefficient": self.overlap_coefficient,
            "sharing_a": self.sharing_a,
            "sharing_b": self.sharing_b,
        }


@dataclass(frozen=True)
class Overlap:
    """:func:`overlap`'s result: ``total`` over all targets and ``per_target``."""

    total: OverlapStats
    per_target: Mapping[str, OverlapStats]

    def __getattr__(self, name: str):  # overlap(a, b).iou reads the total
        if name.startswith("_") or name in ("total", "per_target"):
            raise AttributeError(name)
        return getattr(self.total, name)


def _ratio(num: int | float, den: int | float) -> float:
    return num / den if den else float("nan")


def _check_pair(a: Subnetwork, b: Subnetwork) -> None:
    if not isinstance(a, Subnetwork) or not isinstance(b, Subnetwork):
        raise TypeError(f"Expected two Subnetworks, got {type(a).__name__} and {type(b).__name__}.")
    a._check_compatible(b, "overlap")


def _counts(a: Subnetwork, b: Subnetwork) -> Tensor:
    """``[targets, 3]`` int64 counts: |A|, |B|, |A∩B| per target (one reduction per target)."""
    rows = [
        torch.stack([ma.sum(), b[name].sum(), (ma & b[name]).sum()]) for name, ma in a.masks.items()
    ]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 3, dtype=torch.long)


def overlap(a: Subnetwork, b: Subnetwork) -> Overlap:
    """IoU, Dice, overlap coefficient and sharing fractions of ``a`` and ``b``, overall and per
    target (both must cover the same targets with the same shapes)."""
    _check_pair(a, b)
    counts = _counts(a, b).tolist()
    per = {}
    for (name, mask), (size_a, size_b, both) in zip(a.masks.items(), counts, strict=True):
        per[name] = OverlapStats(mask.numel(), size_a, size_b, both)
    total = OverlapStats(
        sum(s.n for s in per.values()),
        sum(s.size_a for s in per.values()),
        sum(s.size_b for s in per.values()),
        sum(s.intersection for s in per.values()),
    )
    return Overlap(total, per)


# ---------------------------------------------------------------- chance test
@dataclass(frozen=True)
class OverlapTest:
    """Observed intersection against independent placement within each target.

    Under the null, each target's intersection is hypergeometric (``n`` weights, ``|A|`` and
    ``|B|`` kept, placed independently); the total is their sum. ``p_value`` follows
    ``alternative``; ``exact`` says whether it came from the exact distribution (convolved
    per-target pmfs) or the normal approximation with continuity correction. ``kappa`` is
    Cohen's kappa of the two masks over all weights; ``enrichment`` is observed / expected.
    """

    observed: int
    expected: float
    variance: float
    z: float
    p_value: float
    kappa: float
    enrichment: float
    exact: bool
    alternative: str


def hypergeometric_moments(n: Tensor, size_a: Tensor, size_b: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of |A∩B| for independent uniform placement (vectorised over targets)."""
    n, size_a, size_b = (x.double() for x in (n, size_a, size_b))
    mean = size_a * size_b / n
    variance = size_a * size_b * (n - size_a) * (n - size_b) / (n * n * (n - 1).clamp(min=1))
    return mean, variance


def _log_choose(n: Tensor, k: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def hypergeometric_pmf(n: int, size_a: int, size_b: int) -> tuple[int, Tensor]:
    low, high = max(0, size_a + size_b - n), min(size_a, size_b)
    k = torch.arange(low, high + 1, dtype=torch.float64)
    n_t, a_t, b_t = (torch.tensor(float(v), dtype=torch.float64) for v in (n, size_a, size_b))
    log_pmf = _log_choose(a_t, k) + _log_choose(n_t - a_t, b_t - k) - _log_choose(n_t, b_t)
    return low, log_pmf.exp()


def _convolve(p: Tensor, q: Tensor) -> Tensor:
    size = p.numel() + q.numel() - 1
    if p.numel() * q.numel() < 1_000_000:
        return torch.nn.functional.conv1d(
            p.view(1, 1, -1), q.flip(0).view(1, 1, -1), padding=q.numel() - 1
        ).view(-1)[:size]
    length = 1 << (size - 1).bit_length()
    return torch.fft.irfft(torch.fft.rfft(p, length) * torch.fft.rfft(q, length), length)[
        :size
    ].clamp(min=0)


def overlap_test(
    a: Subnetwork,
    b: Subnetwork,
    *,
    alternative: str = "greater",
    exact_limit: int = 200_000,
) -> OverlapTest:
    """Is the overlap of ``a`` and ``b`` larger (or smaller) than chance?

    Args:
        alternative: ``"greater"`` (more shared than chance), ``"less"`` or ``"two-sided"``.
        exact_limit: use the exact distribution while the total support (the sum over targets
            of the possible intersection sizes) is at most this; the normal approximation
            beyond.
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(
            f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}."
        )
    _check_pair(a, b)
    counts = _counts(a, b)
    sizes = torch.tensor([m.numel() for m in a.masks.values()], dtype=torch.long)
    for label, column in (("a", 0), ("b", 1)):
        kept, total = int(counts[:, column].sum()), int(sizes.sum())
        if kept in (0, total):
            raise ValueError(
                f"Subnetwork {label} keeps {'no' if kept == 0 else 'every'} weight ({kept} of "
                f"{total}): its overlap with any mask is fixed, so there is no chance "
                "distribution to test it against."
            )
    mean, var = hypergeometric_moments(sizes, counts[:, 0], counts[:, 1])
    observed = int(counts[:, 2].sum())
    expected, variance = float(mean.sum()), float(var.sum())
    z = (observed - expected) / math.sqrt(variance) if variance > 0 else float("nan")
    support = int((torch.minimum(counts[:, 0], counts[:, 1]) + 1).sum())
    exact = support <= exact_limit
    if exact:
        offset, pmf = 0, torch.ones(1, dtype=torch.float64)
        for n, size_a, size_b in zip(
            sizes.tolist(), counts[:, 0].tolist(), counts[:, 1].tolist(), strict=True
        ):
            low, target_pmf = hypergeometric_pmf(n, size_a, size_b)
            offset, pmf = offset + low, _convolve(pmf, target_pmf)
        index = observed - offset
        upper = float(pmf[max(index, 0) :].sum()) if index < pmf.numel() else 0.0
        lower = float(pmf[: index + 1].sum()) if index >= 0 else 0.0
    else:
        sd = math.sqrt(variance) if variance > 0 else float("inf")
        upper = 0.5 * math.erfc((observed - 0.5 - expected) / sd / math.sqrt(2))
        lower = 0.5 * math.erfc(-(observed + 0.5 - expected) / sd / math.sqrt(2))
    upper, lower = min(1.0, upper), min(1.0, lower)
    p_value = {"greater": upper, "less": lower, "two-sided": min(1.0, 2 * min(upper, lower))}[
        alternative
    ]
    total = float(sizes.sum())
    size_a, size_b = float(counts[:, 0].sum()), float(counts[:, 1].sum())
    agree = (observed + (total - size_a - size_b + observed)) / total if total else float("nan")
    chance = (
        (size_a * size_b + (total - size_a) * (total - size_b)) / total**2
        if total
        else float("nan")
    )
    kappa = (agree - chance) / (1 - chance) if chance != 1 else float("nan")
    return OverlapTest(
        observed=observed,
        expected=expected,
        variance=variance,
        z=z,
        p_value=p_value,
        kappa=kappa,
        enrichment=_ratio(observed, expected),
        exact=exact,
        alternative=alternative,
    )


# -------------------------------------------------------------- many at once
_MEASURES = ("iou", "dice", "overlap_coefficient", "intersection", "sharing")


def overlap_matrix(
    subnetworks: Sequence[Subnetwork] | Mapping[str, Subnetwork],
    measure: str = "iou",
    *,
    chunk: int = 1 << 24,
) -> Tensor:
    """``[k, k]`` matrix of ``measure`` between every pair (``"sharing"``: row i's fraction shared
    with column j, ``|S_i ∩ S_j| / |S_i|``). One matrix product per chunk of weights."""
    if measure not in _MEASURES:
        raise ValueError(f"measure must be one of {_MEASURES}, got {measure!r}.")
    subs = list(subnetworks.values()) if isinstance(subnetworks, Mapping) else list(subnetworks)
    if not subs:
        raise ValueError("overlap_matrix needs at least one subnetwork.")
    for other in subs[1:]:
        _check_pair(subs[0], other)
    device = subs[0].device
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    k = len(subs)
    intersections = torch.zeros(k, k, dtype=dtype, device=device)
    for name in subs[0].names:
        flat = [s[name].flatten() for s in subs]
        for start in range(0, flat[0].numel(), chunk):
            block = torch.stack([f[start : start + chunk] for f in flat]).to(dtype)
            intersections += block @ block.T
    sizes = intersections.diagonal().clone()
    if measure == "intersection":
        return intersections
    if measure == "iou":
        return intersections / (sizes[:, None] + sizes[None, :] - intersections)
    if measure == "dice":
        return 2 * intersections / (sizes[:, None] + sizes[None, :])
    if measure == "overlap_coefficient":
        return intersections / torch.minimum(sizes[:, None], sizes[None, :])
    return intersections / sizes[:, None]


__all__ = [
    "Overlap",
    "OverlapStats",
    "OverlapTest",
    "hypergeometric_moments",
    "overlap",
    "overlap_matrix",
    "overlap_test",
]
