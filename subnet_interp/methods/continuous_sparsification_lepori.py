"""Continuous sparsification as used by Lepori, Serre & Pavlick 2023 (NeuroSurgeon)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._registry import methods
from .._types import Target
from ._base import MaskMethod, TrainState, adam_for_masks
from .continuous_sparsification import (
    _SigmoidOfScoreGates,
    geometric_temperature,
    sigmoid_penalty,
    soft_gate,
)


@methods.register
@dataclass(frozen=True)
class ContinuousSparsificationLepori(_SigmoidOfScoreGates, MaskMethod):
    """Continuous sparsification for subnetwork discovery in frozen models (Lepori, Serre &
    Pavlick, NeurIPS 2023, "Break It Down: Evidence for Structural Compositionality in Neural
    Networks", Sec. 3; defaults from NeuroSurgeon's ``ContSparse`` layers and the paper's
    configs, mlepori1/NeuroSurgeon and mlepori1/Compositional_Subnetworks).

    One parameter ``s`` per weight, initialised to ``mask_init`` (their grid: 0.1, 0.05, 0,
    -0.05; default 0.0). The mask is ``sigmoid(T * s)`` with the temperature ``T`` ramped
    geometrically from 1 to ``final_temperature = 200`` over the whole run. Penalty
    ``l0_lambda * sum(sigmoid(T * s))`` with ``l0_lambda = 1e-8``. Adam, ``lr = 1e-2`` (their
    grid: 1e-2, 1e-4). Weights frozen. Final mask: ``s > 0``.

    Gates of at most ``2**-63`` are exactly 0 (``soft_gate``), as in
    ``continuous_sparsification``: a run keeps its speed to the end, where the plain gate makes
    subnormal masked weights (measured in ``benchmarks/long_run_gates.py``).

    Where it differs from Savarese et al. 2020 (``continuous_sparsification``): no rescaling by
    ``1 / sigmoid(s0)`` (so at ``s0 = 0`` the initial network has every weight halved), a single
    round with no rewinding of ``s``, Adam instead of SGD, and frozen weights.

    Scores (``FindResult.scores``): ``s`` itself. ``sigmoid(T_final * s)`` orders the weights
    the same way but in float32 rounds to 1.0 for ``s > 17 / T_final`` (0.09 at ``T = 200``),
    tying most kept weights; ``s`` keeps every distinction. The mask is ``score > 0``, exactly
    its top ``kept()`` weights.
    """

    name = "continuous_sparsification_lepori"

    mask_init: float = 0.0
    final_temperature: float = 200.0
    l0_lambda: float = 1e-8
    lr: float = 1e-2
    granularity: str = "weight"

    def init_parameters(self, target: Target, gate_shape, weight, generator) -> Tensor:
        return torch.full(gate_shape, float(self.mask_init), device=weight.device)

    def on_step(self, state: TrainState) -> None:
        state.temperature = geometric_temperature(
            self.final_temperature, state.step, state.total_steps
        )

    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        return soft_gate(params, state.temperature)

    def penalty_separable(self) -> bool:
        return True  # a sum of per-target terms

    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        return self.l0_lambda * sigmoid_penalty(params, weights, state.temperature)

    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return adam_for_masks(params, self.lr)
