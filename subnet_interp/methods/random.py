"""Density-matched random masks: the control for every analysis."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._registry import check_hparams, methods
from .._subnetwork import Subnetwork
from ._base import FindContext, FindResult, Method
from .magnitude import check_density


def random_masks(
    counts: Mapping[str, int],
    shapes: Mapping[str, tuple[int, ...]],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    within: Mapping[str, torch.Tensor] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """For each target, a mask with exactly ``counts[name]`` kept weights, placed uniformly
    (among the ``True`` positions of ``within[name]`` when given). A dict passed as ``scores``
    receives ``1 - key`` of every weight: the mask is each target's top ``counts`` of them."""
    masks = {}
    for name, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        count = counts[name]
        allowed = numel if within is None else int(within[name].sum())
        if not 0 <= count <= allowed:
            where = "" if within is None else " of the allowed positions"
            raise ValueError(
                f"Cannot keep {count} weights in {name!r}: it has {allowed}{where}. (Complement "
                "sampling needs the subnetwork to keep at most half of every target.)"
            )
        # the `count` smallest of i.i.d. uniform keys: a uniform random subset of that size
        keys = torch.rand(numel, generator=generator, device=generator.device)
        if within is not None:
            keys = keys.masked_fill(~within[name].flatten().to(keys.device), float("inf"))
        mask = torch.zeros(numel, dtype=torch.bool, device=generator.device)
        if count:
            mask[torch.topk(keys, count, largest=False, sorted=False).indices] = True
        masks[name] = mask.view(shape).to(device)
        if scores is not None:
            scores[name] = (1.0 - keys).view(shape).to(device)
    return masks


def random_like(
    subnetwork: Subnetwork,
    generator: torch.Generator | None = None,
    *,
    within: Subnetwork | None = None,
) -> Subnetwork:
    """A random subnetwork with the same kept count in every target as ``subnetwork``.

    With ``within``, positions are drawn only among its kept weights (e.g. ``within=~sub`` for
    NeuroSurgeon's complement-sampled control).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    counts = {n: int(m.sum()) for n, m in subnetwork.masks.items()}
    shapes = {n: tuple(m.shape) for n, m in subnetwork.masks.items()}
    allowed = None if within is None else {n: within[n] for n in subnetwork.masks}
    masks = random_masks(counts, shapes, gen, subnetwork.device, allowed)
    meta = {"method": "random", "reference": dict(subnetwork.meta)}
    if "fingerprint" in subnetwork.meta:
        meta["fingerprint"] = subnetwork.meta["fingerprint"]
    return Subnetwork(masks, meta)


@methods.register
@dataclass(frozen=True)
class Random(Method):
    """Random masks keeping ``round(density * n)`` weights of every target (per-target counts,
    uniformly placed): the standard density-matched control (e.g. Csordás et al. 2021, Lepori
    et al. 2023). To match another subnetwork's per-target counts use ``si.random_like(sub)``.
    No training; ``steps`` is ignored.

    Scores (``FindResult.scores``): ``1 - u`` for the i.i.d. uniform key ``u`` each weight
    drew (the mask keeps the smallest keys), so the mask is exactly
    ``si.Subnetwork.from_scores(scores, density=density, per_target=True)`` unless two keys of
    a target tie at the cut (``torch.rand`` draws multiples of 2**-24).
    """

    name = "random"
    learns_from_loss = False
    needs_steps = False

    density: float = 0.2

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        check_density(self.density)

    def run(self, context: FindContext) -> FindResult:
        shapes = {n: t.shape for n, t in context.targets.items()}
        counts = {n: round(self.density * t.numel) for n, t in context.targets.items()}
        scores: dict[str, torch.Tensor] = {}
        masks = random_masks(counts, shapes, context.generator, context.device, scores=scores)
        return FindResult(Subnetwork(masks), {}, scores=scores)
