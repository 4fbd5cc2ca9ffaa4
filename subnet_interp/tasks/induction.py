"""Repeated random token sequences: the classic task for induction heads (Olsson et al. 2022).

A sequence is ``[BOS, t_1 .. t_L, t_1 .. t_L]`` with random tokens; in the second half each next
token can only be predicted by finding its previous occurrence and copying the token after it,
which a two-layer attention model learns with a previous-token head and an induction head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .training import logits_of

BOS = 0


def repeated_tokens(
    n_batches: int = 8,
    batch_size: int = 32,
    half_length: int | tuple[int, int] = (6, 14),
    vocab: int = 32,
    *,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """``n_batches`` batches of ``[batch_size, 1 + 2 * L]`` token ids: ``BOS`` (0), then ``L`` random
    tokens from ``1 .. vocab - 1``, then the same ``L`` tokens again.

    ``half_length`` is ``L``, or a ``(low, high)`` range from which each batch draws its own
    ``L``: with a fixed ``L`` the repeat sits at a fixed offset and one positional attention head
    solves the task, so a range is what forces real induction heads.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        if isinstance(half_length, int):
            length = half_length
        else:
            length = int(torch.randint(half_length[0], half_length[1] + 1, (1,), generator=gen))
        half = torch.randint(1, vocab, (batch_size, length), generator=gen)
        bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
        batches.append(torch.cat([bos, half, half], dim=1))
    return batches


def predictable_positions(model: Any, batch: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` at the positions whose next token repeats the first half."""
    half = (batch.shape[1] - 1) // 2
    logits = logits_of(model(batch))
    # positions 1 + half .. end-1 predict the repeated tokens 2 + half .. end
    return logits[:, half + 1 : -1], batch[:, half + 2 :]


def induction_loss(model: Any, batch: Tensor) -> Tensor:
    """Cross-entropy of the predictable (repeated) tokens."""
    logits, labels = predictable_positions(model, batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def induction_accuracy(model: Any, batch: Tensor) -> Tensor:
    """Fraction of the predictable tokens predicted exactly."""
    logits, labels = predictable_positions(model, batch)
    return (logits.argmax(-1) == labels).float().mean()


def next_token_loss(model: Any, batch: Tensor) -> Tensor:
    """Ordinary language-model loss over every position (to train the base model)."""
    logits = logits_of(model(batch))
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def tiny_gpt2(
    vocab: int = 32,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    d_model: int = 64,
    n_positions: int = 64,
    seed: int = 0,
):
    """A small randomly initialised ``transformers.GPT2LMHeadModel`` (dropout off)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "tiny_gpt2 needs transformers: pip install 'subnet_interp[hf]'."
        ) from error
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=BOS,
        eos_token_id=BOS,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()
