"""The ``[layer, head]`` score matrix that circuit comparisons read, from the forms users pass
(a tensor, a ``{(layer, head): score}`` mapping), with an explanation for the forms that have no
place in a :class:`~subnet_interp.analysis.Circuit`'s head names (``blocks.L.attn.head.H``): an
encoder-decoder's per-kind dict of ``head_scores`` (``"decoder.cross_attn"``: ...)."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def _is_position(key: Any) -> bool:
    """Whether ``key`` is a ``(layer, head)`` pair of non-negative integers (numpy ones too)."""
    return (
        isinstance(key, tuple)
        and len(key) == 2
        and all(hasattr(i, "__index__") and not isinstance(i, bool) and i >= 0 for i in key)
    )


def head_matrix(head_scores: Any, caller: str) -> Tensor:
    """``head_scores`` as a ``[layers, heads]`` tensor (a mapping's missing heads are ``nan``).

    Raises ``TypeError`` / ``ValueError`` naming what ``caller`` got and what to pass instead:
    for a dict keyed by sub-layer kind (``head_scores`` of an encoder-decoder, whose heads a
    circuit's stack-less node names cannot tell apart), one of its tensors."""
    if isinstance(head_scores, Mapping):
        keys = list(head_scores)
        if keys and all(isinstance(key, str) for key in keys):
            raise TypeError(
                f"{caller} got a dict of head scores keyed by sub-layer kind ({keys}), as "
                "si.analysis.head_scores returns for an encoder-decoder; a Circuit's heads "
                "(blocks.L.attn.head.H) name no stack, so compare one kind at a time: pass "
                f"its [layer, head] tensor, e.g. scores[{keys[0]!r}]."
            )
        bad = [key for key in keys if not _is_position(key)]
        if bad or not keys:
            raise TypeError(
                f"{caller} takes per-head scores as a [layers, heads] tensor or a mapping "
                f"{{(layer, head): score}} with non-negative int pairs as keys; got a "
                f"{type(head_scores).__name__} with keys {bad[:3] or keys}."
            )
        positions = [(operator.index(layer), operator.index(head)) for layer, head in keys]
        matrix = torch.full(
            (1 + max(layer for layer, _ in positions), 1 + max(head for _, head in positions)),
            float("nan"),
        )
        for (layer, head), value in zip(positions, head_scores.values(), strict=True):
            matrix[layer, head] = float(value)
        return matrix
    if not isinstance(head_scores, Tensor) or head_scores.dim() != 2:
        got = (
            f"a tensor of shape {tuple(head_scores.shape)}"
            if isinstance(head_scores, Tensor)
            else f"a {type(head_scores).__name__}"
        )
        raise TypeError(
            f"{caller} takes per-head scores as a [layers, heads] tensor (e.g. "
            f"si.analysis.head_scores of a decoder-only or encoder model) or a mapping "
            f"{{(layer, head): score}}; got {got}."
        )
    return head_scores
