"""Differentiable weight masks with the Gumbel-sigmoid (Csordás, van Steenkiste & Schmidhuber 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._registry import methods
from .._types import Target
from ._base import MaskMethod, TrainState, adam_for_masks


def logistic_noise(
    shape: Sequence[int], generator: torch.Generator, device, eps: float = 1e-10
) -> Tensor:
    """``log u - log(1 - u)`` for ``u ~ U(0, 1)``: the difference of two Gumbel(0, 1) draws."""
    u = torch.rand(tuple(shape), generator=generator, device=device)
    return u.logit_(eps)  # log(u / (1 - u)), u clamped to [eps, 1 - eps]; one pass, in place


def gumbel_sigmoid(logits: Tensor, noise: Tensor, temperature: float, hard: bool) -> Tensor:
    """Sample ``sigmoid((logits + noise) / temperature)``; with ``hard``, threshold at 0.5 in the
    forward pass and pass the soft gradient backward (straight-through estimator)."""
    if hard:
        return _StraightThrough.apply(logits + noise, temperature)
    return torch.sigmoid((logits + noise) / temperature)


class _StraightThrough(torch.autograd.Function):
    """``(x > 0)`` forward, the gradient of ``sigmoid(x / T)`` backward: the value of
    ``hard - soft.detach() + soft`` and its gradient, without building ``soft`` in the forward.

    ``sigmoid(x / T) > 0.5`` exactly when ``x > 0`` (for ``T > 0``), so the threshold needs no
    sigmoid; backward recomputes it from ``x`` with the operation autograd itself uses."""

    @staticmethod
    def forward(ctx, x: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.temperature = temperature
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        temperature = ctx.temperature
        soft = torch.sigmoid(x / temperature if temperature != 1.0 else x)
        grad_x = torch.ops.aten.sigmoid_backward(grad, soft)
        return (grad_x / temperature if temperature != 1.0 else grad_x), None


@methods.register
@dataclass(frozen=True)
class GumbelSigmoid(MaskMethod):
    """Differentiable weight masks (Csordás, van Steenkiste & Schmidhuber, ICLR 2021,
    "Are Neural Nets Modular? Inspecting Functional Modularity Through Differentiable Weight
    Masks", Sec. 2; defaults from the official code, RobertCsordas/modules).

    One logit ``l`` per weight, initialised to ``init_logit = 2.0`` (keep probability ≈ 0.88).
    Each forward pass samples ``m = sigmoid((l + g1 - g0) / tau)`` with Gumbel noise ``g0, g1``
    and ``tau = 1``, binarised at 0.5 with a straight-through gradient. Each batch is split
    into ``mask_samples = 4`` parts, each seen through an independent mask sample. The
    regulariser is ``alpha * sum(l) / batch_size`` over the raw logits (``alpha = 1e-4``; the
    official code divides by the batch size next to a mean-reduced task loss, and so do we with
    ``per_example_penalty=True``), pushing unused weights out. Adam, ``lr = 1e-2``, gradient norm
    clipped to 1.0. The weights are frozen. Final mask: ``l > 0``.

    Scores (``FindResult.scores``): the keep probability ``sigmoid(l)`` (a hard sample keeps a
    weight iff ``l + g1 - g0 > 0``, and ``g1 - g0`` is logistic, so ``P(keep) = sigmoid(l)``
    at any temperature). The mask is ``score > 0.5``, i.e. its top ``kept()`` weights, except
    where float32 rounds ``sigmoid(l)`` to exactly 0.5 (``|l| < 3e-8``); in float32 the
    score also saturates at 1.0 for ``l > 17``, where such weights tie (broken by position).
    """

    lean_mask_optimizer: ClassVar[str] = "paper"  # Adafactor loses the planted subnetwork
    name = "gumbel_sigmoid"
    init_logit: float = 2.0
    temperature: float = 1.0
    hard: bool = True
    mask_samples: int = 4
    alpha: float = 1e-4
    per_example_penalty: bool = True
    lr: float = 1e-2
    clip_grad_norm: float | None = 1.0
    granularity: str = "weight"

    def samples_per_batch(self) -> int:
        return self.mask_samples

    def reads_batch_size(self) -> bool:
        return self.per_example_penalty

    def init_parameters(self, target: Target, gate_shape, weight, generator) -> Tensor:
        return torch.full(gate_shape, float(self.init_logit), device=weight.device)

    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        noise = logistic_noise(params.shape, generator, params.device)
        return gumbel_sigmoid(params, noise, self.temperature, self.hard)

    def penalty_separable(self) -> bool:
        return True  # a sum of per-target terms

    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        # per-gate weight counts multiply in so coarse gates pay for all the weights they hold
        total = torch.stack([(p.sum() * w) for p, w in zip(params, weights, strict=True)]).sum()
        scale = self.alpha / state.batch_size if self.per_example_penalty else self.alpha
        return scale * total

    def params_for_probability(self, probability: Tensor) -> Tensor:
        return torch.logit(probability)  # the keep probability is sigmoid(l)

    def final_mask(self, params: Tensor) -> Tensor:
        return params > 0

    def scores(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params.float())

    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return adam_for_masks(params, self.lr)

    def grad_clip(self) -> float | None:
        return self.clip_grad_norm
