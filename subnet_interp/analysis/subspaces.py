"""Subspaces: principal angles, and how much of a subspace a (masked) weight matrix keeps."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._fingerprint import read_canonical
from .._subnetwork import Subnetwork
from ._order import model_then_subnetwork


def orthonormal_basis(columns: Float[Tensor, "n k"], tol: float = 1e-6) -> Tensor:
    """An orthonormal basis of the column space (rank-revealing, via SVD)."""
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    rank = int((s > tol * s.max().clamp(min=1e-30)).sum()) if s.numel() else 0
    return u[:, :rank]


def subspace_angles(a: Float[Tensor, "n p"], b: Float[Tensor, "n q"]) -> Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``a`` and ``b``
    (Björck & Golub 1973): ``arccos`` of the singular values of ``Q_a^T Q_b``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"subspace_angles needs two matrices with the same number of rows (the ambient "
            f"dimension), got shapes {tuple(a.shape)} and {tuple(b.shape)}."
        )
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(cosines).flip(0).sort().values.float()


def retained_energy(matrix: Float[Tensor, "n m"], basis: Float[Tensor, "n k"]) -> float:
    """Fraction of ``matrix``'s squared Frobenius norm inside the column space of ``basis``:
    ``||P M||^2 / ||M||^2`` (1: the matrix acts only within the subspace)."""
    if matrix.shape[0] != basis.shape[0]:
        raise ValueError(
            f"matrix has {matrix.shape[0]} rows but the basis lives in {basis.shape[0]} dimensions."
        )
    q = orthonormal_basis(basis)
    m = matrix.double()
    total = float((m * m).sum())
    return float(((q.T @ m) ** 2).sum()) / total if total else float("nan")


@model_then_subnetwork(trailing=2)
def head_ov(
    model: Any, subnetwork: Subnetwork | None, layer: int, head: int
) -> Float[Tensor, "d_model d_model"]:
    """A head's OV circuit ``W_V[head] @ W_O[head]`` (``[d_model, d_model]``, TransformerLens
    layout: rows read the residual stream, columns write it), with the subnetwork's masks
    applied (``subnetwork=None``: the unmasked weights). The old order
    ``head_ov(model, layer, head, subnetwork=None)`` still works, with a ``FutureWarning``."""
    from .. import adapters

    adapter = adapters.resolve(model)
    root, found = adapter.root(model), adapter.all_targets(model)
    parts = []
    for letter in "VO":
        name = f"blocks.{layer}.attn.W_{letter}"
        if name not in found:
            raise KeyError(
                f"{name!r} is not a target of this model; head_ov needs canonical attention weights."
            )
        weight = read_canonical(root, found[name]).detach()
        if subnetwork is not None and name in subnetwork:
            weight = weight * subnetwork[name].to(weight.device)
        target = found[name]
        axis = "kv_head" if "kv_head" in target.axes else "head"
        index = head if axis == "head" else head * weight.shape[0] // _query_heads(found, layer)
        parts.append(weight.select(target.axes.index(axis), index))
    return parts[0] @ parts[1]


def _query_heads(found, layer: int) -> int:
    return found[f"blocks.{layer}.attn.W_Q"].shape[0]


__all__ = ["head_ov", "orthonormal_basis", "retained_energy", "subspace_angles"]
