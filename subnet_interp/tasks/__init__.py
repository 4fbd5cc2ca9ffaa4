"""Synthetic tasks with known answers, for tests, tutorials and benchmarks."""

from .induction import (
    induction_accuracy,
    induction_loss,
    next_token_loss,
    predictable_positions,
    repeated_tokens,
    tiny_gpt2,
)
from .planted import PlantedTask, planted_delta, planted_mlp, planted_teacher
from .training import logits_of, train

__all__ = [
    "PlantedTask",
    "induction_accuracy",
    "induction_loss",
    "logits_of",
    "next_token_loss",
    "planted_delta",
    "planted_mlp",
    "planted_teacher",
    "predictable_positions",
    "repeated_tokens",
    "tiny_gpt2",
    "train",
]
