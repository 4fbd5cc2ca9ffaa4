"""Independent sub-networks side by side: a ReLU MLP whose weights are block-diagonal, so each
block reads its own inputs, has its own hidden units and writes its own outputs. The ground truth
for module finding (each block is a module) and for structural compositionality (each block's
outputs are a subroutine that needs exactly its block's weights)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._subnetwork import Subnetwork


@dataclass(frozen=True)
class ComposedTask:
    """Result of :func:`independent_mlps`.

    Attributes:
        model: ``nn.Sequential(Linear, ReLU, ..., Linear)`` with block-diagonal weights (every
            weight between two blocks is exactly 0).
        blocks: per block, the subnetwork of its weights (the nonzero diagonal blocks).
        unit_blocks: the block of every hidden unit, hidden layers concatenated in order.
        input_blocks, output_blocks: the block of every input and output dimension.
        inputs, targets: the data; the targets are the model's own outputs, so the dense model
            is exact and each block's outputs are a subroutine only its block computes.
    """

    model: nn.Sequential
    blocks: tuple[Subnetwork, ...]
    unit_blocks: Tensor
    input_blocks: Tensor
    output_blocks: Tensor
    inputs: Tensor
    targets: Tensor

    def batches(self, batch_size: int = 128) -> list[tuple[Tensor, Tensor]]:
        """The data as ``(inputs, targets)`` batches in a fixed order."""
        return [
            (self.inputs[i : i + batch_size], self.targets[i : i + batch_size])
            for i in range(0, len(self.inputs), batch_size)
        ]

    def loss_of(self, block: int) -> Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]:
        """``loss_fn(model, batch)``: mean squared error on block ``block``'s outputs only."""
        if not 0 <= block < len(self.blocks):
            raise ValueError(f"block must be in [0, {len(self.blocks)}), got {block}.")
        columns = (self.output_blocks == block).nonzero().flatten()

        def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
            inputs, targets = batch
            return nn.functional.mse_loss(model(inputs)[:, columns], targets[:, columns])

        return loss_fn


def independent_mlps(
    n_blocks: int = 2,
    *,
    d_in: int = 4,
    d_hidden: int = 8,
    d_out: int = 2,
    depth: int = 2,
    n_examples: int = 512,
    generator: torch.Generator | None = None,
) -> ComposedTask:
    """``n_blocks`` random ReLU MLPs (``depth`` hidden layers of ``d_hidden`` units each, from
    ``d_in`` inputs to ``d_out`` outputs) placed side by side as one MLP with block-diagonal
    weights; inputs are standard normal. Each hidden unit's bias centres it on the data (it fires
    on half of the examples), so no unit is dead or nearly so."""
    if n_blocks < 1 or min(d_in, d_hidden, d_out, depth) < 1:
        raise ValueError(
            f"Need n_blocks, d_in, d_hidden, d_out and depth all >= 1; got n_blocks={n_blocks}, "
            f"d_in={d_in}, d_hidden={d_hidden}, d_out={d_out}, depth={depth}."
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    sizes = [d_in] + [d_hidden] * depth + [d_out]
    inputs = torch.randn(n_examples, d_in * n_blocks, generator=gen)
    layers: list[nn.Module] = []
    masks: list[dict[str, Tensor]] = [{} for _ in range(n_blocks)]
    activations = inputs
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(fan_in * n_blocks, fan_out * n_blocks)
        owner_out = torch.arange(fan_out * n_blocks) // fan_out
        owner_in = torch.arange(fan_in * n_blocks) // fan_in
        same = owner_out[:, None] == owner_in[None, :]
        weight = torch.randn(fan_out * n_blocks, fan_in * n_blocks, generator=gen) / fan_in**0.5
        hidden = index < depth
        with torch.no_grad():
            linear.weight.copy_(weight * same)
            linear.bias.zero_()
            if hidden:  # centre each unit on the data: it fires on half of the examples
                linear.bias.copy_(-linear(activations).median(0).values)
            activations = linear(activations).relu()
        name = f"{2 * index}.weight"
        for block in range(n_blocks):
            masks[block][name] = same & (owner_out[:, None] == block)
        layers += [linear, nn.ReLU()] if hidden else [linear]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        targets = model(inputs)
    blocks = tuple(Subnetwork(m, {"method": "planted", "block": b}) for b, m in enumerate(masks))
    return ComposedTask(
        model=model,
        blocks=blocks,
        unit_blocks=(torch.arange(d_hidden * n_blocks) // d_hidden).repeat(depth),
        input_blocks=torch.arange(d_in * n_blocks) // d_in,
        output_blocks=torch.arange(d_out * n_blocks) // d_out,
        inputs=inputs,
        targets=targets,
    )


__all__ = ["ComposedTask", "independent_mlps"]
