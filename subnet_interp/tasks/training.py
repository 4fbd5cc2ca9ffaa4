"""A small training helper for the base models of the synthetic tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def logits_of(output: Any) -> Tensor:
    """Logits from a model output: a tensor, or an object with ``.logits`` (Hugging Face)."""
    return output.logits if hasattr(output, "logits") else output


def train(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Sequence[Any],
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train every parameter with AdamW for ``steps`` steps, cycling over ``batches``.

    Returns the loss of each step. The model is left in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if not batches:
        raise ValueError("train needs at least one batch.")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    model.eval()
    return torch.stack(losses).tolist()
