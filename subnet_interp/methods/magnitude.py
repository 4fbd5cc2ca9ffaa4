"""One-shot magnitude pruning baseline (Han, Pool, Tran & Dally 2015)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._fingerprint import read_canonical
from .._registry import check_hparams, methods
from .._subnetwork import Subnetwork
from ._base import FindContext, FindResult, Method


def top_magnitude_masks(
    weights: dict[str, torch.Tensor], density: float, scope: str
) -> dict[str, torch.Tensor]:
    """Keep exactly ``round(density * n)`` weights of largest ``|w|``, globally or per target."""
    if scope == "per_target":
        return {
            n: _top_k_mask(w.abs().flatten(), density).view(w.shape) for n, w in weights.items()
        }
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'per_target', got {scope!r}.")
    flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
    keep = _top_k_mask(flat, density)
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
    return masks


def _top_k_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    count = round(density * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        mask[torch.topk(scores, count, sorted=False).indices] = True
    return mask


def check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}.")


def check_scope(method: str, scope: str) -> None:
    """The ``scope`` of a one-shot top-k method: ``"global"`` or ``"per_target"``."""
    if scope not in ("global", "per_target"):
        raise ValueError(f"{method}: scope must be 'global' or 'per_target', got {scope!r}.")


@methods.register
@dataclass(frozen=True)
class Magnitude(Method):
    """One-shot magnitude pruning (Han, Pool, Tran & Dally, NeurIPS 2015, "Learning both
    Weights and Connections for Efficient Neural Networks"): keep exactly the
    ``round(density * n)`` weights of largest absolute value, over all targets at once
    (``scope="global"``) or within each target (``scope="per_target"``). No training; ``steps`` is
    ignored. A baseline for every learned mask.

    Scores (``FindResult.scores``): ``|w|``. The mask is the top ``kept()`` of them (with
    ``scope="per_target"``, the top ``round(density * n)`` of each target:
    ``from_scores(scores, density=density, per_target=True)``), except that ``torch.topk``
    and the positional tie-break may pick different weights among ties at the cut.
    """

    name = "magnitude"
    learns_from_loss = False
    needs_steps = False

    density: float = 0.2
    scope: str = "global"

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        check_density(self.density)
        check_scope(self.name, self.scope)

    def run(self, context: FindContext) -> FindResult:
        with torch.no_grad():
            weights = {n: read_canonical(context.root, t) for n, t in context.targets.items()}
            masks = top_magnitude_masks(weights, self.density, self.scope)
            scores = {n: w.abs().float() for n, w in weights.items()}
        return FindResult(Subnetwork(masks), {}, scores=scores)
