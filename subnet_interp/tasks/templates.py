"""A templated language-like task on a tiny vocabulary: indirect-object identification
(Wang et al. 2023) in miniature, for GPT-2-style models.

``"when N1 and N2 went to the PLACE , N2 gave a OBJECT to"`` -> ``N1``: the answer is the name
that was not repeated. The metric is the logit difference between the right name and the
repeated one (``si.analysis.logit_difference``).

For patching (interchange ablation), :func:`ioi_pairs` pairs each prompt with its name-swapped
twin: the same prompt with the repeated name (S2) replaced by the other name, so that the
twin's answer is the clean prompt's repeated name and the other way round. Everything but the
name that decides the answer stays, so patching asks which weights carry *that* information.
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
"""Every word of the IOI templates; a token id is a word's index here."""
TOKEN = {word: index for index, word in enumerate(VOCAB)}
S2_POSITION = 10
"""Index of the repeated name (S2) in every prompt (``<bos>`` is position 0)."""


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


def ioi_pairs(
    n_batches: int = 8, batch_size: int = 32, *, generator: torch.Generator | None = None
) -> list[dict[str, Tensor]]:
    """Batches of name-swapped counterfactual pairs, for ``si.PatchAblation("corrupted")``.

    Each batch is a dict with ``tokens [B, 15]`` (the prompts of :func:`ioi_batches` with the same
    ``generator``), ``corrupted [B, 15]`` (the same prompts with the repeated name at
    :data:`S2_POSITION` replaced by the other name, so their answer is flipped), ``correct [B]``
    (the clean answer) and ``repeated [B]`` (the clean prompt's repeated name, which is the
    corrupted prompt's answer).
    """
    batches = []
    for tokens, right, wrong in ioi_batches(n_batches, batch_size, generator=generator):
        corrupted = tokens.clone()
        corrupted[:, S2_POSITION] = right
        batches.append(
            {"tokens": tokens, "corrupted": corrupted, "correct": right, "repeated": wrong}
        )
    return batches


def ioi_pair_logits(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(last-position logits on batch["tokens"], correct, repeated)`` for
    ``si.analysis.logit_difference``."""
    return logits_of(model(batch["tokens"]))[:, -1], batch["correct"], batch["repeated"]


def ioi_pair_loss(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the correct name at the last position of ``batch["tokens"]``."""
    logits, right, _ = ioi_pair_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, right)


def ioi_pair_logit_diff(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Mean logit of the correct name minus the repeated one at the last position of
    ``batch["tokens"]`` (positive when the model is right; a model that solves the task scores
    about minus that with ``tokens`` set to the twins, whose answer is the repeated name)."""
    logits, right, wrong = ioi_pair_logits(model, batch)
    picked = logits.gather(1, torch.stack([right, wrong], 1))
    return (picked[:, 0] - picked[:, 1]).mean()


def ioi_pair_accuracy(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Fraction of ``batch["tokens"]`` where the correct name outscores the repeated one."""
    logits, right, wrong = ioi_pair_logits(model, batch)
    return (logits.gather(1, right[:, None]) > logits.gather(1, wrong[:, None])).float().mean()
