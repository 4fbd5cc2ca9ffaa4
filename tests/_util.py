"""Test helpers shared across test files."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A bit-exact copy of every parameter and buffer, in state_dict order."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (any dtype, bf16 included; NaNs compare by bit pattern)."""
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def assert_bit_exact(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), (list(after), list(before))
    for key, value in before.items():
        assert same_bits(after[key], value), key
