"""A planted-subnetwork task: a known sparse set of weights is necessary and sufficient."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._subnetwork import Subnetwork


@dataclass(frozen=True)
class PlantedTask:
    """A two-layer ReLU MLP in which a planted set of weights computes the task and the rest
    is irrelevant to it.

    The dense model computes the task exactly, like a trained model with spare capacity. The
    planted weights are necessary (each lies on an input -> output path the data uses, so
    removing it raises the loss) and sufficient (the planted subnetwork alone has zero loss).
    Every other weight has zero effect on the task: it reads an input that is always 0 in the
    data, belongs to a hidden unit that never activates, writes to an output the loss ignores,
    or is exactly zero. Non-planted weights have the same magnitude distribution as the planted
    ones (except the zeros), so magnitude alone cannot find the planted set.

    Attributes:
        model: the dense MLP ``nn.Sequential(Linear, ReLU, Linear)``.
        planted: the planted subnetwork.
        inputs, targets: the data set; ``targets`` are the first ``task_outputs`` outputs.
        task_outputs: how many of the model's outputs the loss reads.
    """

    model: nn.Sequential
    planted: Subnetwork
    inputs: Tensor
    targets: Tensor
    task_outputs: int

    def batches(self, batch_size: int = 64) -> list[tuple[Tensor, Tensor]]:
        """The data set as a list of ``(inputs, targets)`` batches, in a fixed order."""
        return [
            (self.inputs[i : i + batch_size], self.targets[i : i + batch_size])
            for i in range(0, len(self.inputs), batch_size)
        ]

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean squared error on the task outputs."""
        inputs, targets = batch
        return torch.nn.functional.mse_loss(model(inputs)[:, : self.task_outputs], targets)

    def loss(self, model: nn.Module | None = None) -> float:
        """Task loss of ``model`` (default: the task's model) on the whole data set."""
        with torch.no_grad():
            return float(self.loss_fn(model or self.model, (self.inputs, self.targets)))


def planted_mlp(
    d_in: int = 10,
    d_hidden: int = 16,
    d_out: int = 6,
    *,
    active_inputs: int = 6,
    used_hidden: int = 6,
    task_outputs: int = 4,
    density: float = 0.6,
    n_examples: int = 512,
    generator: torch.Generator | None = None,
) -> PlantedTask:
    """Build a :class:`PlantedTask`.

    ``active_inputs`` of the ``d_in`` inputs vary in the data (the rest are always 0);
    ``used_hidden`` hidden units carry the task (the others have a large negative bias and never
    fire); the loss reads the first ``task_outputs`` outputs. Between active inputs and used
    units, and between used units and task outputs, each weight is planted with probability
    ``density`` (at least one in and one out per used unit) and is exactly 0 otherwise.
    """
    if not (
        1 <= active_inputs <= d_in and 1 <= used_hidden <= d_hidden and 1 <= task_outputs <= d_out
    ):
        raise ValueError(
            f"Need 1 <= active_inputs <= d_in, 1 <= used_hidden <= d_hidden and 1 <= task_outputs "
            f"<= d_out; got active_inputs={active_inputs}, d_in={d_in}, used_hidden={used_hidden}, "
            f"d_hidden={d_hidden}, task_outputs={task_outputs}, d_out={d_out}."
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def magnitudes(shape: tuple[int, int]) -> Tensor:
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        return sign * (0.5 + torch.rand(shape, generator=gen))

    active = torch.zeros(d_in, dtype=torch.bool)
    active[torch.randperm(d_in, generator=gen)[:active_inputs]] = True
    used = torch.zeros(d_hidden, dtype=torch.bool)
    used[torch.randperm(d_hidden, generator=gen)[:used_hidden]] = True
    task = torch.zeros(d_out, dtype=torch.bool)
    task[:task_outputs] = True

    live_in = used[:, None] & active[None, :]  # weights that can affect the task
    live_out = task[:, None] & used[None, :]
    planted_in = live_in & (torch.rand(d_hidden, d_in, generator=gen) < density)
    planted_out = live_out & (torch.rand(d_out, d_hidden, generator=gen) < density)
    active_index = active.nonzero().flatten()
    for unit in used.nonzero().flatten().tolist():  # every used unit lies on a path
        if not planted_in[unit].any():
            pick = torch.randint(len(active_index), (1,), generator=gen)
            planted_in[unit, active_index[pick]] = True
        if not planted_out[:, unit].any():
            planted_out[torch.randint(task_outputs, (1,), generator=gen), unit] = True

    w_in = torch.where(live_in & ~planted_in, 0.0, magnitudes((d_hidden, d_in)))
    w_out = torch.where(live_out & ~planted_out, 0.0, magnitudes((d_out, d_hidden)))
    bias_in = torch.where(used, 0.0, -1e3)  # unused units never fire
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))
    with torch.no_grad():
        model[0].weight.copy_(w_in)
        model[0].bias.copy_(bias_in)
        model[2].weight.copy_(w_out)
        model[2].bias.zero_()
    planted = Subnetwork({"0.weight": planted_in, "2.weight": planted_out}, {"method": "planted"})
    inputs = torch.randn(n_examples, d_in, generator=gen) * active
    with torch.no_grad():
        targets = model(inputs)[:, :task_outputs]
    return PlantedTask(model, planted, inputs, targets, task_outputs)


def planted_sensitivity(**kwargs: Any) -> PlantedTask:
    """:func:`planted_mlp` (same arguments) with every target shifted by +1: the dense model,
    and the planted subnetwork alone, are off by exactly 1 on every task output, so the loss
    (1.0) is not at a minimum and every planted weight has a non-zero loss gradient, while
    every other weight still has no effect on the task (its gradient, or the weight itself, is
    0). For one-shot gradient methods (``attribution``), which see nothing on a task solved
    exactly."""
    task = planted_mlp(**kwargs)
    return dataclasses.replace(task, targets=task.targets + 1.0)


__all__ = ["PlantedTask", "planted_delta", "planted_mlp", "planted_sensitivity", "planted_teacher"]


def planted_teacher(
    d_in: int = 24,
    d_out: int = 6,
    *,
    density: float = 0.25,
    n_examples: int = 512,
    generator: torch.Generator | None = None,
) -> PlantedTask:
    """A sparse linear teacher and a randomly initialised student: the lottery-ticket setting.

    The targets are ``(S * W) x`` for a planted support ``S``; ``model`` is a fresh
    ``nn.Sequential(nn.Linear(d_in, d_out))``. Methods that train weights together with the mask
    (continuous sparsification, lottery tickets) should recover ``S``, as sparse regression
    recovers a support.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(d_out, d_in, generator=gen) < 0.5, -1.0, 1.0)
    teacher = sign * (0.5 + torch.rand(d_out, d_in, generator=gen))
    support = torch.rand(d_out, d_in, generator=gen) < density
    inputs = torch.randn(n_examples, d_in, generator=gen)
    targets = inputs @ (teacher * support).T
    model = nn.Sequential(nn.Linear(d_in, d_out))
    bound = 1.0 / d_in**0.5  # nn.Linear's default init, drawn from our generator
    with torch.no_grad():
        model[0].weight.copy_((torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound)
        model[0].bias.copy_((torch.rand(d_out, generator=gen) * 2 - 1) * bound)
    planted = Subnetwork({"0.weight": support}, {"method": "planted"})
    return PlantedTask(model, planted, inputs, targets, d_out)


def planted_delta(
    d_in: int = 24,
    d_out: int = 6,
    *,
    density: float = 0.05,
    n_examples: int = 512,
    generator: torch.Generator | None = None,
) -> PlantedTask:
    """A pretrained linear map and a fine-tuning task that changes only a planted sparse set of
    its weights: the targets are ``(W0 + delta) x`` with ``delta`` nonzero on ``planted``.

    Sparse fine-tuning (LT-SFT) should select exactly the planted weights, since full
    fine-tuning converges to ``W0 + delta``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
        model[0].bias.zero_()
    support = torch.zeros(d_out * d_in, dtype=torch.bool)
    support[
        torch.randperm(d_out * d_in, generator=gen)[: max(1, round(density * d_out * d_in))]
    ] = True
    support = support.view(d_out, d_in)
    sign = torch.where(torch.rand(d_out, d_in, generator=gen) < 0.5, -1.0, 1.0)
    delta = support * sign * (1.0 + torch.rand(d_out, d_in, generator=gen))
    inputs = torch.randn(n_examples, d_in, generator=gen)
    with torch.no_grad():
        targets = inputs @ (model[0].weight + delta).T
    planted = Subnetwork({"0.weight": support}, {"method": "planted"})
    return PlantedTask(model, planted, inputs, targets, d_out)
