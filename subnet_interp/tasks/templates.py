"""A templated language-like task on a tiny vocabulary: indirect-object identification
(Wang et al. 2023) in miniature, for GPT-2-style models.

``"when N1 and N2 went to the PLACE , N2 gave a OBJECT to"`` -> ``N1``: the answer is the name
that was not repeated. The metric is the logit difference between the right name and the
repeated one (``si.analysis.logit_difference``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .training import logits_of

NAMES = ("mary", "john", "anna", "paul", "lucy", "mark", "emma", "luke")
PLACES = ("store", "park", "school", "beach")
OBJECTS = ("drink", "book", "ball", "gift")
FILLER = ("<bos>", "when", "and", "went", "to", "the", ",", "gave", "a")
VOCAB: tuple[str, ...] = FILLER + NAMES + PLACES + OBJECTS
TOKEN = {word: index for index, word in enumerate(VOCAB)}


def encode(words: str) -> list[int]:
    """Token ids of a space-separated string over :data:`VOCAB`."""
    unknown = [w for w in words.split() if w not in TOKEN]
    if unknown:
        raise KeyError(f"Words {unknown} are not in the task's vocabulary {list(VOCAB)}.")
    return [TOKEN[w] for w in words.split()]


def ioi_batches(
    n_batches: int = 8, batch_size: int = 32, *, generator: torch.Generator | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Batches of ``(tokens [B, 15], correct [B], repeated [B])``: the prompt, the id of the name
    to predict next and the id of the repeated (wrong) name."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        rows, right, wrong = [], [], []
        for _ in range(batch_size):
            a, b = torch.randperm(len(NAMES), generator=gen)[:2].tolist()
            place = PLACES[int(torch.randint(len(PLACES), (1,), generator=gen))]
            obj = OBJECTS[int(torch.randint(len(OBJECTS), (1,), generator=gen))]
            first, second = (
                (NAMES[a], NAMES[b]) if torch.rand(1, generator=gen) < 0.5 else (NAMES[b], NAMES[a])
            )
            repeated = NAMES[b]
            answer = NAMES[a]
            rows.append(
                encode(
                    f"<bos> when {first} and {second} went to the {place} , {repeated} gave a {obj} to"
                )
            )
            right.append(TOKEN[answer])
            wrong.append(TOKEN[repeated])
        batches.append((torch.tensor(rows), torch.tensor(right), torch.tensor(wrong)))
    return batches


def ioi_logits(model: Any, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(last-position logits, correct, repeated)`` for ``si.analysis.logit_difference``."""
    tokens, right, wrong = batch
    return logits_of(model(tokens))[:, -1], right, wrong


def ioi_loss(model: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Cross-entropy of the correct name at the last position."""
    logits, right, _ = ioi_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, right)


def ioi_accuracy(model: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Fraction of prompts where the correct name outscores the repeated one."""
    logits, right, wrong = ioi_logits(model, batch)
    return (logits.gather(1, right[:, None]) > logits.gather(1, wrong[:, None])).float().mean()
