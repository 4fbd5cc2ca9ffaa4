"""A two-output regression: output A reads inputs 0-3, output B reads inputs 4-7."""

from __future__ import annotations

import torch
from torch import Tensor


def two_outputs(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(x [n, 8], y [n, 2])`` with ``y_A = relu(x0 + x1) - x2 * sign(x3)`` and
    ``y_B = relu(x4 - x5) + x6 / 2 - x7``: two behaviours that need disjoint inputs."""
    x = torch.randn(n, 8, generator=generator)
    out_a = torch.relu(x[:, 0] + x[:, 1]) - x[:, 2] * x[:, 3].sign()
    out_b = torch.relu(x[:, 4] - x[:, 5]) + 0.5 * x[:, 6] - x[:, 7]
    return x, torch.stack([out_a, out_b], dim=1)
