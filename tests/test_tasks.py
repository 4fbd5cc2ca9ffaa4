"""Synthetic tasks: their data have the structure they claim."""

from __future__ import annotations

import pytest
import torch

from subnet_interp.tasks import (
    VOCAB,
    add_mul_batches,
    add_mul_network,
    exact_accuracy,
    ioi_accuracy,
    ioi_batches,
    repeated_tokens,
    train,
)
from subnet_interp.tasks.arithmetic import digit_loss
from subnet_interp.tasks.templates import TOKEN, encode


def test_ioi_answer_is_the_name_that_is_not_repeated():
    tokens, right, wrong = ioi_batches(1, 50)[0]
    assert tokens.shape == (50, 15)
    names = tokens[:, [2, 4]]
    assert torch.all(tokens[:, 10] == wrong)  # the repeated subject
    assert torch.all((names == right[:, None]).any(1) & (names == wrong[:, None]).any(1))
    assert torch.all(right != wrong)
    assert max(VOCAB.index(w) for w in VOCAB) == len(VOCAB) - 1


def test_ioi_encode_rejects_unknown_words():
    with pytest.raises(KeyError, match=r"\['bob'\] are not in the task's vocabulary"):
        encode("when bob")
    assert encode("mary") == [TOKEN["mary"]]


def test_ioi_accuracy_of_a_perfect_oracle():
    batch = ioi_batches(1, 16)[0]

    def oracle(tokens):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], len(VOCAB))
        logits[torch.arange(tokens.shape[0]), -1, batch[1]] = 1.0
        return logits

    assert float(ioi_accuracy(oracle, batch)) == 1.0


def test_repeated_tokens_repeat_with_varying_lengths():
    batches = repeated_tokens(6, 4, generator=torch.Generator().manual_seed(0))
    assert len({b.shape[1] for b in batches}) > 1
    for b in batches:
        half = (b.shape[1] - 1) // 2
        assert torch.equal(b[:, 1 : 1 + half], b[:, 1 + half :]) and torch.all(b[:, 0] == 0)


def test_add_mul_targets_and_learnability():
    x, y = add_mul_batches(1, 64, ops=("mul",), generator=torch.Generator().manual_seed(0))[0]
    assert x.shape == (64, 42) and y.shape == (64, 2)
    assert torch.all(x[:, -1] == 1)  # the multiply code
    a = x[:, 0:10].argmax(1) + 10 * x[:, 10:20].argmax(1)
    b = x[:, 20:30].argmax(1) + 10 * x[:, 30:40].argmax(1)
    assert torch.equal((a * b) % 100, y[:, 0] + 10 * y[:, 1])
    with pytest.raises(ValueError, match="ops must be a non-empty subset"):
        add_mul_batches(1, ops=("div",))
    net = add_mul_network(hidden=(64,))
    data = add_mul_batches(1, 32, ops=("add",), generator=torch.Generator().manual_seed(1))
    train(net, digit_loss, data, steps=300, lr=1e-2)  # memorises one batch: the loss is learnable
    assert float(exact_accuracy(net, data[0])) > 0.9


def test_previous_token_classes_labels_the_token_before():
    from subnet_interp.tasks import previous_token_classes

    ((tokens, labels),) = previous_token_classes(
        1, 8, vocab=10, seq_len=6, classes=3, first_label=2
    )
    assert (labels[:, :2] == -100).all()
    assert torch.equal(labels[:, 2:], tokens[:, 1:-1] % 3)
    with pytest.raises(ValueError, match="first_label must be in"):
        previous_token_classes(1, 8, seq_len=6, first_label=6)
