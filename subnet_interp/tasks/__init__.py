"""Synthetic tasks with known answers, for tests, tutorials and benchmarks."""

from .arithmetic import add_mul_batches, add_mul_network, digit_loss, exact_accuracy
from .composed import ComposedTask, independent_mlps
from .induction import (
    induction_accuracy,
    induction_loss,
    next_token_loss,
    predictable_positions,
    repeated_tokens,
    tiny_gpt2,
)
from .planted import PlantedTask, planted_delta, planted_mlp, planted_sensitivity, planted_teacher
from .previous_token import previous_token_classes
from .regression import two_outputs
from .templates import (
    VOCAB,
    ioi_accuracy,
    ioi_batches,
    ioi_logits,
    ioi_loss,
    ioi_pair_accuracy,
    ioi_pair_logit_diff,
    ioi_pair_logits,
    ioi_pair_loss,
    ioi_pairs,
)
from .training import logits_of, train

__all__ = [
    "ComposedTask",
    "independent_mlps",
    "PlantedTask",
    "VOCAB",
    "ioi_accuracy",
    "ioi_batches",
    "ioi_logits",
    "ioi_loss",
    "ioi_pair_accuracy",
    "ioi_pair_logit_diff",
    "ioi_pair_logits",
    "ioi_pair_loss",
    "ioi_pairs",
    "add_mul_batches",
    "add_mul_network",
    "digit_loss",
    "exact_accuracy",
    "induction_accuracy",
    "induction_loss",
    "logits_of",
    "next_token_loss",
    "planted_delta",
    "planted_mlp",
    "planted_sensitivity",
    "planted_teacher",
    "predictable_positions",
    "previous_token_classes",
    "repeated_tokens",
    "tiny_gpt2",
    "train",
    "two_outputs",
]
