"""Lottery-ticket sparse fine-tuning (Ansell, Ponti, Korhonen & Vulić 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._registry import check_hparams, methods
from .._subnetwork import Subnetwork
from ._base import FindContext, FindResult, Method
from ._weights import canonical_weights, load_plain_state_dict, plain_state_dict, train_weights
from .magnitude import check_density, top_magnitude_masks


@methods.register
@dataclass(frozen=True)
class LotteryTicketSparseFineTuning(Method):
    """LT-SFT (Ansell, Ponti, Korhonen & Vulić, ACL 2022, "Composable Sparse Fine-Tuning for
    Cross-Lingual Transfer", Sec. 3; defaults from cambridgeltl/composable-sft).

    Phase 1 fine-tunes every weight for ``steps`` steps. The subnetwork is the
    ``density = 0.01`` fraction (``num_params`` overrides it) of target weights with the largest
    ``|theta_1 - theta_0|``, chosen globally over all targets. Every parameter is reset to
    ``theta_0`` and phase 2 fine-tunes only those weights for ``steps`` steps (gradient masking;
    everything else frozen). AdamW with ``lr = 2e-5`` and no weight decay (the paper's NLI
    setting), so weights outside the subnetwork do not move.

    ``FindResult.delta`` is the sparse difference ``theta_2 - theta_0`` (exactly zero outside the
    subnetwork), ``FindResult.weights`` the fine-tuned target weights ``theta_0 + delta`` and
    ``FindResult.state`` the fine-tuned ``state_dict``. Apply the delta to the original model with
    ``si.delta_applied(model, result.delta)``.

    Scores (``FindResult.scores``): the phase-1 change ``|theta_1 - theta_0|`` the selection
    ranks by; the mask is its top ``kept()`` weights (``torch.topk`` and the positional
    tie-break of ``from_scores`` may pick different weights among ties at the cut, e.g.
    weights phase 1 left unchanged).
    """

    name = "lt_sft"
    returns_delta = True
    trains_weights = True

    density: float = 0.01
    num_params: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        check_density(self.density)
        if self.num_params is not None and self.num_params < 0:
            raise ValueError(
                f"lt_sft: num_params must be >= 0 (or None to use `density`), got {self.num_params}."
            )

    def optimizer(self, params) -> torch.optim.Optimizer:
        """AdamW at ``lr`` with ``weight_decay``: the optimiser of both fine-tuning phases."""
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def run(self, context: FindContext) -> FindResult:
        root = context.root
        initial_state = plain_state_dict(root)
        theta_0 = canonical_weights(context)
        full_loss = train_weights(context, context.steps, self.optimizer, description="lt_sft full")
        theta_1 = canonical_weights(context)
        total = sum(t.numel() for t in theta_0.values())
        density = self.num_params / total if self.num_params is not None else self.density
        if density > 1.0:
            raise ValueError(f"num_params={self.num_params} exceeds the {total} targeted weights.")
        change = {n: theta_1[n] - theta_0[n] for n in theta_0}
        keep = top_magnitude_masks(change, density, "global")
        with torch.no_grad():
            load_plain_state_dict(root, initial_state)
        sparse_loss = train_weights(
            context, context.steps, self.optimizer, trainable=keep, description="lt_sft sparse"
        )
        with torch.no_grad():
            final = canonical_weights(context)
            delta = {n: torch.where(keep[n], final[n] - theta_0[n], 0.0) for n in theta_0}
            weights = {n: theta_0[n] + delta[n] for n in theta_0}
        history = {
            "phase": [1.0, 2.0],
            "loss": [float(full_loss), float(sparse_loss)],
            "density": [1.0, sum(int(k.sum()) for k in keep.values()) / total],
        }
        state = plain_state_dict(root)
        scores = {n: c.abs().float() for n, c in change.items()}
        return FindResult(
            Subnetwork(keep), history, weights=weights, delta=delta, state=state, scores=scores
        )
