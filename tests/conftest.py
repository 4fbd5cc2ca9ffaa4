"""Shared fixtures: tiny models with random weights (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

# Shape annotations on public functions are checked at runtime under the test suite.
if os.environ.get("SUBNET_INTERP_TYPECHECK", "1") == "1":
    from jaxtyping import install_import_hook

    install_import_hook("subnet_interp", "beartype.beartype")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class TinyMLP(torch.nn.Module):
    def __init__(self, sizes=(6, 8, 4), seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=False):
            layer = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5)
                layer.bias.copy_(torch.randn(fan_out, generator=gen) * 0.1)
            layers.append(layer)
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.fixture
def mlp() -> TinyMLP:
    return TinyMLP()
