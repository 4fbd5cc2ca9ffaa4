"""Hard-concrete L0 gates (Louizos, Welling & Kingma 2018), with Edge Pruning's target density."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._registry import check_hparams, methods
from .._types import Target
from ._base import MaskMethod, TrainState, adam_for_masks


def hard_concrete_sample(
    log_alpha: Tensor, uniform: Tensor, beta: float, gamma: float, zeta: float
) -> Tensor:
    """``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``
    (Louizos et al. 2018, Eq. 10 with the stretch of Sec. 4)."""
    if not log_alpha.requires_grad:
        s = torch.sigmoid((torch.log(uniform) - torch.log1p(-uniform) + log_alpha) / beta)
        return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)
    return _HardConcreteSample.apply(log_alpha, uniform, beta, gamma, zeta)


class _HardConcreteSample(torch.autograd.Function):
    """:func:`hard_concrete_sample` as one autograd function that keeps only the sigmoid ``s``
    for backward (autograd would keep every intermediate) and computes the forward in place. The
    backward repeats autograd's own steps (clamp's pass-through where ``min <= y <= max``, the
    stretch's scale, ``sigmoid_backward``, the temperature's division), so values and gradients
    are bit-identical to the composed operations (tested)."""

    @staticmethod
    def forward(ctx, log_alpha, uniform, beta, gamma, zeta):
        noise = torch.log(uniform).sub_(torch.log1p(-uniform))
        s = noise.add_(log_alpha).div_(beta).sigmoid_()
        ctx.save_for_backward(s)
        ctx.constants = (beta, gamma, zeta)
        return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        beta, gamma, zeta = ctx.constants
        stretched = s * (zeta - gamma) + gamma
        inside = (stretched >= 0.0) & (stretched <= 1.0)
        grad = torch.where(inside, grad, 0.0) * (zeta - gamma)
        grad = torch.ops.aten.sigmoid_backward(grad, s) / beta
        return grad, None, None, None, None


def expected_l0(log_alpha: Tensor, beta: float, gamma: float, zeta: float) -> Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (Louizos et al., Eq. 12)."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def deterministic_gate(log_alpha: Tensor, gamma: float, zeta: float) -> Tensor:
    """The test-time gate ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (Eq. 13)."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


@methods.register
@dataclass(frozen=True)
class HardConcrete(MaskMethod):
    """Hard-concrete L0 gates (Louizos, Welling & Kingma, ICLR 2018, "Learning Sparse Neural
    Networks through L0 Regularization"; defaults from AMLab-Amsterdam/L0_regularization), as
    used for subnetwork probing by Cao, Sanh & Rush 2021 and for circuits by Edge Pruning
    (Bhaskar et al. 2024, princeton-nlp/Edge-Pruning).

    One ``log_alpha`` per gate, initialised from ``N(log(1 - p) - log(p), 0.01)`` with drop
    rate ``p = droprate_init = 0.5``. Gates are sampled from the stretched, clamped
    hard-concrete distribution with ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``. The penalty is
    ``l0_lambda / dataset_size * sum_g P(z_g != 0)`` (Louizos et al. Eq. 12 and their MNIST
    setting ``lambda = 0.1``, ``N = 60000``; set ``dataset_size`` to the size of your data).

    ``lambda_ramp = (start, length)`` (fractions of the steps) scales the L0 penalty from 0 to
    ``l0_lambda``: 0 until ``start``, linear over ``length``, then constant, as Cao, Sanh & Rush
    2021 do for subnetwork probing (``(0.25, 0.5)``, stevenxcao/subnetwork-probing; the default
    ``None`` keeps Louizos et al.'s constant ``lambda``).

    With ``target_density`` set, the L0 penalty is replaced by Edge Pruning's Lagrangian
    ``lambda1 * (d - t) + lambda2 * (d - t)**2`` on the expected density ``d``, where the
    multipliers are trained by gradient ascent (``lagrangian_lr = 1e-2``) and the target ``t`` falls
    linearly from 1 to ``target_density`` over the first ``warmup_fraction = 0.8`` of the steps
    (Edge Pruning's IOI run: 2500 warmup steps of 3000). Edge Pruning uses the sampled gates'
    density; the expected density used here has the same mean and less variance.

    Adam, ``lr = 1e-2`` (Edge Pruning's default for ``log_alpha``). Final mask: deterministic
    gate ``> final_threshold = 0.5`` (NeuroSurgeon's and Edge Pruning's discretisation).

    Scores (``FindResult.scores``): the probability of a non-zero gate ``P(z > 0) =
    sigmoid(log_alpha - beta * log(-gamma / zeta))`` (Louizos et al. Eq. 12, the quantity
    their L0 penalty sums; Edge Pruning ranks by ``log_alpha``, which orders the same). Both
    the score and the deterministic gate are increasing in ``log_alpha``, so the mask is its
    top ``kept()`` weights (``score > P`` at the ``log_alpha`` where the gate crosses
    ``final_threshold``), up to float32 rounding of weights right at that threshold.
    """

    name = "hard_concrete"

    droprate_init: float = 0.5
    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    l0_lambda: float = 0.1
    dataset_size: int = 60000
    lambda_ramp: Sequence[float] | None = None
    target_density: float | None = None
    warmup_fraction: float = 0.8
    lagrangian_lr: float = 1e-2
    lr: float = 1e-2
    final_threshold: float = 0.5
    granularity: str = "weight"

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        if not 0.0 < self.droprate_init < 1.0:
            raise ValueError(
                f"hard_concrete: droprate_init must be in (0, 1), got {self.droprate_init}; "
                "pass e.g. 0.5 (the default, Louizos et al.)."
            )
        if self.lambda_ramp is not None:
            ramp = self.lambda_ramp
            if (
                not isinstance(ramp, (tuple, list))
                or len(ramp) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ramp)
                or not (0.0 <= ramp[0] < 1.0 and 0.0 < ramp[1] and ramp[0] + ramp[1] <= 1.0 + 1e-9)
            ):
                raise ValueError(
                    f"hard_concrete: lambda_ramp must be (start, length), fractions of the steps "
                    f"with 0 <= start < 1 and 0 < length <= 1 - start; got {ramp!r}. Pass e.g. "
                    "(0.25, 0.5) (Cao et al. 2021) or None for a constant lambda."
                )
            object.__setattr__(self, "lambda_ramp", (float(ramp[0]), float(ramp[1])))
            if self.target_density is not None:
                raise ValueError(
                    "hard_concrete: lambda_ramp schedules the L0 penalty, which target_density "
                    "replaces by a Lagrangian with its own warm-up (warmup_fraction); set one of "
                    "them."
                )
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(
                f"hard_concrete: target_density must be in (0, 1], got {self.target_density}; "
                "pass the fraction of weights to keep, or None for the plain L0 penalty."
            )

    def init_parameters(self, target: Target, gate_shape, weight, generator) -> Tensor:
        mean = math.log(1.0 - self.droprate_init) - math.log(self.droprate_init)
        noise = torch.randn(gate_shape, generator=generator, device=generator.device)
        return (mean + 1e-2 * noise).to(weight.device)

    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        eps = 1e-6
        uniform = torch.rand(params.shape, generator=generator, device=params.device)
        uniform = uniform.mul_(1 - 2 * eps).add_(eps)  # in place: the same values
        return hard_concrete_sample(params, uniform, self.beta, self.gamma, self.zeta)

    def penalty_separable(self) -> bool:
        return self.target_density is None  # the Lagrangian couples the targets

    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        expected = torch.stack(
            [
                expected_l0(p, self.beta, self.gamma, self.zeta).sum() * w
                for p, w in zip(params, weights, strict=True)
            ]
        ).sum()
        if self.target_density is None:
            return self.l0_lambda * self.lambda_scale(state) / self.dataset_size * expected
        multipliers = state.aux.get("lagrange")
        if multipliers is None:
            total = float(sum(p.numel() * w for p, w in zip(params, weights, strict=True)))
            multipliers = self._init_lagrangian(state, torch.zeros(2, device=params[0].device))
            state.aux["total"] = total
        density = expected / state.aux["total"]
        warmup = max(1, int(self.warmup_fraction * state.total_steps))
        progress = min(1.0, state.step / warmup)
        target = 1.0 - progress * (1.0 - self.target_density)
        gap = density - target
        return multipliers[0] * gap + multipliers[1] * gap * gap

    def lambda_scale(self, state: TrainState) -> float:
        """The factor ``lambda_ramp`` puts on ``l0_lambda`` at ``state.step`` (1 without it)."""
        if self.lambda_ramp is None:
            return 1.0
        start, length = self.lambda_ramp
        progress = state.step / max(1, state.total_steps)
        return min(1.0, max(0.0, (progress - start) / length))

    def after_step(self, state: TrainState) -> None:
        if "lagrange_optimizer" in state.aux:  # dual ascent on the multipliers
            state.aux["lagrange_optimizer"].step()
            state.aux["lagrange_optimizer"].zero_grad(set_to_none=True)

    def _init_lagrangian(self, state: TrainState, multipliers: Tensor) -> Tensor:
        """``multipliers`` (the two Lagrange multipliers) and their optimiser into ``state.aux``."""
        multipliers.requires_grad_(True)
        state.aux["lagrange"] = multipliers
        state.aux["lagrange_optimizer"] = torch.optim.Adam(
            [multipliers], lr=self.lagrangian_lr, maximize=True
        )
        return multipliers

    def extra_state(self, state: TrainState) -> dict:
        """The Lagrange multipliers, their optimiser's state and the weight count, once made."""
        if "lagrange" not in state.aux:
            return {}
        return {
            "lagrange": state.aux["lagrange"].detach(),
            "lagrange_optimizer": state.aux["lagrange_optimizer"].state_dict(),
            "total": state.aux["total"],
        }

    def load_extra_state(self, state: TrainState, saved, device: torch.device) -> None:
        self._init_lagrangian(state, saved["lagrange"].to(device))
        state.aux["lagrange_optimizer"].load_state_dict(saved["lagrange_optimizer"])
        state.aux["total"] = saved["total"]

    def params_for_probability(self, probability: Tensor) -> Tensor:
        # P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)) (Louizos et al. Eq. 12)
        return torch.logit(probability) + self.beta * math.log(-self.gamma / self.zeta)

    def final_mask(self, params: Tensor) -> Tensor:
        return deterministic_gate(params, self.gamma, self.zeta) > self.final_threshold

    def scores(self, params: Tensor) -> Tensor:
        return expected_l0(params.float(), self.beta, self.gamma, self.zeta)

    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return adam_for_masks(params, self.lr)
