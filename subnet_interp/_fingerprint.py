"""A cheap identity hash of a model's maskable weights."""

from __future__ import annotations

import hashlib

import torch

from . import adapters
from ._types import Target

_SAMPLES_PER_TARGET = 257


def read_canonical(root: torch.nn.Module, target: Target) -> torch.Tensor:
    """The target's current (unmasked) tensor in canonical layout.

    On an FSDP-sharded model the whole tensor is gathered from the ranks (a collective: every
    rank must call this for the same targets in the same order)."""
    real = adapters.real_tensor(root.get_submodule(target.module), target.attribute)
    if adapters.is_dtensor(real):
        real = real.full_tensor()
    return target.layout.to_canonical(real)


def canonical_copy(root: torch.nn.Module, targets) -> dict[str, torch.Tensor]:
    """Detached copies of the targets' current (unmasked) tensors, in canonical layout."""
    with torch.no_grad():
        return {n: read_canonical(root, t).detach().clone() for n, t in targets.items()}


def _sample(tensor: torch.Tensor) -> bytes:
    flat_count = tensor.numel()
    if flat_count == 0:
        return b""
    count = min(_SAMPLES_PER_TARGET, flat_count)
    flat_index = torch.linspace(0, flat_count - 1, count, device=tensor.device).round().long()
    coords = torch.unravel_index(flat_index, tuple(tensor.shape))
    values = tensor.detach()[coords].to(device="cpu", dtype=torch.float32)
    return values.numpy().tobytes()


def fingerprint(model: object) -> str:
    """A short hash of the model's maskable weights: names, shapes and a strided value sample.

    Cheap for billion-weight models (a few hundred values per target are read). The same
    weights give the same fingerprint through any supported wrapper, because it is computed
    on canonical names and layouts. Bias and norm targets are left out (only some families
    name them).
    """
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    digest = hashlib.sha256()
    for name, target in adapter.all_targets(model).items():
        if target.kind in adapters.OPTIONAL_KINDS:  # not every wrapper of a model names them
            continue
        tensor = read_canonical(root, target)
        digest.update(name.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(_sample(tensor))
    return digest.hexdigest()[:16]


__all__ = ["canonical_copy", "fingerprint", "read_canonical"]
