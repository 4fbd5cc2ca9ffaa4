"""Continuous Sparsification (Savarese, Silva & Maire 2020)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._registry import methods
from .._types import Target
from ._base import MaskMethod, TrainState


def geometric_temperature(final: float, step: int, steps: int) -> float:
    """``final ** (step / (steps - 1))``: 1 at the first step, ``final`` at the last."""
    if steps <= 1:
        return float(final)
    return float(final) ** (min(step, steps - 1) / (steps - 1))


# sigmoid(x) <= 2**-63 below this: a gate that small would scale a weight to a subnormal float
GATE_CUTOFF = -63 * math.log(2.0)


def soft_gate(params: Tensor, temperature: float) -> Tensor:
    """``sigmoid(temperature * params)``, exactly 0 where it would be at most ``2**-63``.

    Such a gate times a weight gives at most ``|w| * 1e-19``, below float32's resolution beside
    any normal term, but as the temperature grows (200 here) it often gives a subnormal float
    (under ``1.2e-38``): a CPU matrix product with 0.5% subnormal entries in its weight ran 8-15x
    slower (measured on ``continuous_sparsification`` after 9 steps, ``benchmarks/README.md``).
    The cut keeps them out of the masked weights; the gradient there is 0, as it is where the
    float32 sigmoid itself rounds to 0 (below about -104)."""
    scaled = temperature * params
    return torch.sigmoid(torch.nn.functional.threshold(scaled, GATE_CUTOFF, -math.inf, True))


def sigmoid_penalty(params: Sequence[Tensor], weights: Sequence[int], temperature: float) -> Tensor:
    """``sum_g count_g * sigmoid(temperature * s_g)``: the L1 norm of the soft mask."""
    return torch.stack(
        [torch.sigmoid(temperature * p).sum() * w for p, w in zip(params, weights, strict=True)]
    ).sum()


class _SigmoidOfScoreGates:
    """What both continuous-sparsification variants share about one gate's parameter ``s``:
    its gate is ``sigmoid(T * s)`` with ``T = 1`` at the start, the final mask ``s > 0`` and
    the score ``s`` itself (it orders weights as the soft mask does without saturating)."""

    def params_for_probability(self, probability: Tensor) -> Tensor:
        return torch.logit(probability)  # the gate at the first temperature (1) is sigmoid(s)

    def final_mask(self, params: Tensor) -> Tensor:
        return params > 0

    def scores(self, params: Tensor) -> Tensor:
        return params.float()


@methods.register
@dataclass(frozen=True)
class ContinuousSparsification(_SigmoidOfScoreGates, MaskMethod):
    """Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020, "Winning the Lottery
    with Continuous Sparsification", Eq. 5-6 and Alg. 1; defaults from the official code,
    lolemacs/continuous-sparsification).

    One parameter ``s`` per weight, initialised to ``s0 = mask_init = 0.0``. The mask is
    ``sigmoid(beta * s) / sigmoid(s0)`` (the rescaling makes the initial network the dense one).
    Within each of ``rounds = 3`` rounds, ``beta`` grows geometrically from 1 to
    ``final_temperature = 200`` (per step here, per epoch in the paper). The penalty is
    ``l1_lambda * ||sigmoid(beta * s)||_1`` with ``l1_lambda = 1e-8``. Between rounds
    ``s <- min(beta * s, s0)`` and ``beta`` restarts at 1 (paper, Alg. 1; the released code resets
    ``beta`` first, so it effectively keeps ``min(s, s0)``). SGD with Nesterov momentum 0.9,
    ``lr = 0.1``. Final mask: ``s > 0``.

    As in the paper, the weights train jointly with the mask (SGD, ``lr = 0.1``, momentum 0.9,
    weight decay ``1e-4``) on a copy of the model, and the ticket's weights are rewound to the
    step ``rewind_fraction = 2/85`` of the way through the first round (the paper's epoch 2 of
    85): ``FindResult.weights`` holds them, to retrain the ticket as in Frankle et al. Rescaling
    makes a kept weight's mask value tend to ``1 / sigmoid(s0)`` as ``beta`` grows, which only
    trained weights can absorb: to find a subnetwork of a frozen model use
    ``continuous_sparsification_lepori``. The penalty counts the un-rescaled soft mask, as the
    paper's Eq. 6 writes it (the code multiplies it by ``1 / sigmoid(s0)``, a constant factor).

    Gates of at most ``2**-63`` are exactly 0 (``soft_gate``): below float32's resolution
    next to any normal term, they would otherwise make subnormal masked weights, which slow CPU
    matrix products many times over as ``beta`` grows.

    Scores (``FindResult.scores``): ``s`` after the last round. The soft mask ``sigmoid(beta
    * s)`` orders weights the same way but saturates in float32 at the final ``beta = 200``;
    ``s`` does not. The mask is ``score > 0``, exactly its top ``kept()`` weights.
    """

    lean_mask_optimizer: ClassVar[str] = "paper"
    name = "continuous_sparsification"
    trains_weights = True

    mask_init: float = 0.0
    final_temperature: float = 200.0
    l1_lambda: float = 1e-8
    num_rounds: int = 3
    lr: float = 0.1
    momentum: float = 0.9
    rescale: bool = True
    weight_lr: float = 0.1
    weight_decay: float = 1e-4
    rewind_fraction: float = 2 / 85
    granularity: str = "weight"

    def rounds(self) -> int:
        return self.num_rounds

    def rewind_step(self, steps_per_round: int) -> int:
        return round(self.rewind_fraction * steps_per_round)

    def weight_optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.weight_lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def init_parameters(self, target: Target, gate_shape, weight, generator) -> Tensor:
        return torch.full(gate_shape, float(self.mask_init), device=weight.device)

    def on_step(self, state: TrainState) -> None:
        state.temperature = geometric_temperature(
            self.final_temperature, state.round_step, state.steps_per_round
        )

    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        mask = soft_gate(params, state.temperature)
        if self.rescale:
            mask = mask * (1.0 + math.exp(-self.mask_init))  # divide by sigmoid(s0)
        return mask

    def penalty_separable(self) -> bool:
        return True  # a sum of per-target terms

    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        return self.l1_lambda * sigmoid_penalty(params, weights, state.temperature)

    def on_round_end(self, params: Sequence[Tensor], state: TrainState) -> None:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.clamp(state.temperature * p, max=float(self.mask_init)))
        state.temperature = 1.0

    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0
        )
