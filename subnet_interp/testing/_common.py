"""What the conformance checks share: the error they raise and the bit-exact restore check."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class ConformanceError(AssertionError):
    """A conformance check failed; the message names the check, what it saw and what it expected."""


def fail(check: str, message: str) -> None:
    raise ConformanceError(f"[{check}] {message}")


def state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_bits(a: Tensor, b: Tensor) -> bool:
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def check_unchanged(check: str, module: torch.nn.Module, before: Mapping[str, Tensor]) -> None:
    after = module.state_dict()
    if list(after) != list(before):
        fail(check, f"the model's state_dict keys changed: {list(before)} -> {list(after)}.")
    changed = [k for k, v in before.items() if not same_bits(after[k], v)]
    if changed:
        fail(check, f"weights were modified: {changed[:8]}; every weight must be bit-exact.")
    left = [n for n, m in module.named_modules() if hasattr(m, "parametrizations")]
    if left:
        fail(check, f"parametrizations were left on modules {left[:8]}.")
