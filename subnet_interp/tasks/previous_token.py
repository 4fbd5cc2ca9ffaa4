"""A token-level labelling task for probing: each position's label is the class of the token
before it, a property a model must compute by attending one position back."""

from __future__ import annotations

import torch
from torch import Tensor


def previous_token_classes(
    n_batches: int,
    batch_size: int,
    *,
    vocab: int = 16,
    seq_len: int = 12,
    classes: int = 4,
    first_label: int = 4,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """``n_batches`` batches of ``(tokens [batch, seq_len], labels [batch, seq_len])``: uniform
    random tokens, and at position ``t >= first_label`` the label ``tokens[t - 1] % classes``.
    Earlier positions, which see too few tokens to be informative either way, are labelled
    -100 (ignored by ``cross_entropy``)."""
    if not 1 <= first_label < seq_len:
        raise ValueError(
            f"first_label must be in [1, seq_len), got {first_label} (seq_len {seq_len})."
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        labels = torch.full((batch_size, seq_len), -100)
        labels[:, first_label:] = tokens[:, first_label - 1 : -1] % classes
        batches.append((tokens, labels))
    return batches


__all__ = ["previous_token_classes"]
