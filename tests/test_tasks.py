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
    ioi_pair_accuracy,
    ioi_pair_logit_diff,
    ioi_pair_loss,
    ioi_pairs,
    repeated_tokens,
    train,
)
from subnet_interp.tasks.arithmetic import digit_loss
from subnet_interp.tasks.templates import S2_POSITION, TOKEN, encode


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


def test_ioi_pairs_differ_only_at_s2_and_flip_the_answer():
    pairs = ioi_pairs(2, 40, generator=torch.Generator().manual_seed(3))
    again = ioi_batches(2, 40, generator=torch.Generator().manual_seed(3))
    for batch, (tokens, right, wrong) in zip(pairs, again, strict=True):
        assert set(batch) == {"tokens", "corrupted", "correct", "repeated"}
        # the clean half is exactly ioi_batches with the same generator
        assert torch.equal(batch["tokens"], tokens)
        assert torch.equal(batch["correct"], right) and torch.equal(batch["repeated"], wrong)
        clean, twin = batch["tokens"], batch["corrupted"]
        assert twin.shape == clean.shape == (40, 15)
        differs = clean != twin
        assert torch.all(differs[:, S2_POSITION])  # every twin changes S2 ...
        differs[:, S2_POSITION] = False
        assert not differs.any()  # ... and nothing else
        # the twin repeats the clean answer, so its answer is the clean repeated name
        names = twin[:, [2, 4]]
        assert torch.all(twin[:, S2_POSITION] == batch["correct"])
        assert torch.all((names == batch["repeated"][:, None]).any(1))
        assert torch.all((names == batch["correct"][:, None]).any(1))


def test_ioi_pair_metrics_of_an_oracle_and_its_twin():
    batch = ioi_pairs(1, 16)[0]

    def oracle(tokens):  # predicts the name in positions 2 / 4 that is not repeated at S2
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], len(VOCAB))
        names = tokens[:, [2, 4]]
        answer = torch.where(names[:, 0] == tokens[:, S2_POSITION], names[:, 1], names[:, 0])
        logits[torch.arange(tokens.shape[0]), -1, answer] = 3.0
        return logits

    assert float(ioi_pair_accuracy(oracle, batch)) == 1.0
    assert float(ioi_pair_logit_diff(oracle, batch)) == 3.0
    assert float(ioi_pair_loss(oracle, batch)) < float(
        ioi_pair_loss(lambda t: 0 * oracle(t), batch)
    )
    flipped = {**batch, "tokens": batch["corrupted"]}  # the same oracle on the twins
    assert float(ioi_pair_logit_diff(oracle, flipped)) == -3.0
    assert float(ioi_pair_accuracy(oracle, flipped)) == 0.0


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
