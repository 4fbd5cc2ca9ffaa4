"""Circuit probing (Lepori, Pavlick & Serre 2023): on a model whose MLP block writes a known
intermediate variable h(a, b) next to distractors, the probe finds the subnetwork computing h
(held-out k-NN accuracy high), finds nothing for a random labelling of the same inputs, and
removing the h-subnetwork breaks the task; the soft nearest-neighbour loss and k-NN are
checked on their own."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from torch import nn

from subnet_interp import probing
from subnet_interp.probing import circuit_probe, knn_predict, soft_nearest_neighbor_loss

N = 9  # a, b in 0 .. 8
MOD = 3  # h = (a + b) mod 3; the task's answer is g(h) = (h + 1) mod 3


class ResidualMLP(nn.Module):
    """r0 = [onehot(a), onehot(b), 1, 0...]; r1 = r0 + mlp(r0); logits = unembed(r1).

    The MLP (bias-free, so masks scale it homogeneously) has MOD*MOD units computing
    h = (a + b) mod 3 as ANDs of residue classes (the constant-1 input is the threshold), which
    write onehot(h) into three stream dimensions; and distractor units that write a random
    vector per value of a and of b (three times larger) into other dimensions, so the full
    update clusters by (a, b), not h.
    The unembedding reads only the h dimensions.
    """

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.d_in = 2 * N + 1
        h_dims = list(range(self.d_in, self.d_in + MOD))
        copy_dims = list(range(h_dims[-1] + 1, h_dims[-1] + 9))
        d_model = copy_dims[-1] + 1
        units = MOD * MOD + 2 * N
        w_in = torch.zeros(units, d_model)
        w_out = torch.zeros(d_model, units)
        for i in range(MOD):
            for j in range(MOD):
                unit = i * MOD + j
                w_in[unit, [a for a in range(N) if a % MOD == i]] = 1.0
                w_in[unit, [N + b for b in range(N) if b % MOD == j]] = 1.0
                w_in[unit, 2 * N] = -1.0
                w_out[h_dims[(i + j) % MOD], unit] = 1.0
        for k in range(2 * N):  # a random code of a and of b
            unit = MOD * MOD + k
            w_in[unit, k] = 1.0
            w_out[copy_dims, unit] = 3.0 * torch.randn(len(copy_dims), generator=generator)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, units, bias=False), nn.ReLU(), nn.Linear(units, d_model, bias=False)
        )
        self.unembed = nn.Linear(d_model, MOD, bias=False)
        with torch.no_grad():
            self.mlp[0].weight.copy_(w_in)
            self.mlp[2].weight.copy_(w_out)
            self.unembed.weight.zero_()
            for h in range(MOD):
                self.unembed.weight[(h + 1) % MOD, h_dims[h]] = 1.0
        self.unembed.weight.requires_grad_(False)
        self.d_model = d_model

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        stream = torch.zeros(len(pairs), self.d_model)
        stream[torch.arange(len(pairs)), pairs[:, 0]] = 1.0
        stream[torch.arange(len(pairs)), N + pairs[:, 1]] = 1.0
        stream[:, 2 * N] = 1.0
        stream = stream + self.mlp(stream)
        return self.unembed(stream)


PAIRS = torch.cartesian_prod(torch.arange(N), torch.arange(N))
ORDER = torch.randperm(len(PAIRS), generator=torch.Generator().manual_seed(0))
TRAIN, TEST = PAIRS[ORDER[:54]], PAIRS[ORDER[54:]]  # held-out (a, b) pairs
# Off the paper's defaults, for 300 steps on 54 examples: mask logits start at 0.05 (in Lepori
# et al.'s grid 0.1, 0.05, 0, -0.05; from 0 a few of the AND units' inputs end pruned) and the
# loss's temperature is 0.3 (at 1 the mask keeps parts of the (a, b) code: k-NN 0.78)
OPTIONS = {"steps": 300, "mask_init": 0.05, "temperature": 0.3, "progress": False}


def h_of(pairs):
    return (pairs[:, 0] + pairs[:, 1]) % MOD


def answer(pairs):
    return (h_of(pairs) + 1) % MOD


def accuracy(model, batch):
    pairs, labels = batch
    return (model(pairs).argmax(-1) == labels).float().mean()


@pytest.fixture(scope="module")
def model():
    return ResidualMLP(torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def h_result(model):
    return circuit_probe(
        model, "mlp", [(TRAIN, h_of(TRAIN))], eval_data=[(TEST, h_of(TEST))], ks=(1, 3),
        task_metric=accuracy, task_data=[(PAIRS, answer(PAIRS))], **OPTIONS, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_the_model_computes_the_task_through_h(model):
    assert float(accuracy(model, (PAIRS, answer(PAIRS)))) == 1.0


def test_circuit_probe_finds_h_where_the_full_block_does_not_cluster_by_it(h_result):
    assert h_result.knn_accuracy >= 0.9, h_result
    assert h_result.knn_accuracies[3] >= 0.8
    assert h_result.one_shot_accuracy >= 0.9
    assert h_result.full_model_knn_accuracy < 0.7  # the distractors dominate the full update
    assert h_result.chance < 0.5
    assert 0 < h_result.density < 0.5


def test_removing_the_h_subnetwork_breaks_the_task_and_random_removals_do_not(h_result):
    ablation = h_result.ablation
    assert ablation.full == 1.0
    assert ablation.ablated <= 0.5
    assert ablation.random_mean >= 0.8
    assert ablation.effect >= 0.5


def test_a_random_labelling_is_not_found(model):
    gen = torch.Generator().manual_seed(3)
    random_labels = torch.randint(MOD, (N, N), generator=gen)  # a random function of (a, b)

    def labels(pairs):
        return random_labels[pairs[:, 0], pairs[:, 1]]

    result = circuit_probe(
        model, "mlp", [(TRAIN, labels(TRAIN))], eval_data=[(TEST, labels(TEST))], **OPTIONS,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.knn_accuracy <= 0.6, result


def test_circuit_probe_leaves_the_model_unchanged_and_refuses_a_block_without_weights(model):
    before = snapshot(model)
    circuit_probe(
        model, "mlp", [(TRAIN, h_of(TRAIN))], eval_data=[(TEST, h_of(TEST))], steps=2,
        progress=False,
    )  # fmt: skip
    assert_bit_exact(model, before)
    with pytest.raises(ValueError, match="No maskable weight lies under the module 'mlp.1'"):
        circuit_probe(
            model, "mlp.1", [(TRAIN, h_of(TRAIN))], eval_data=[(TEST, h_of(TEST))], steps=2
        )
    with pytest.raises(ValueError, match="learnable-mask method"):
        circuit_probe(model, "mlp", [], eval_data=[(TEST, h_of(TEST))], steps=2, method="magnitude")
    with pytest.raises(ValueError, match="`eval_data` is empty"):
        circuit_probe(model, "mlp", [(TRAIN, h_of(TRAIN))], eval_data=[], steps=2)


def test_soft_nearest_neighbor_loss_is_low_for_clustered_points_and_high_for_mixed():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = torch.eye(3)[labels] + 0.01 * torch.randn(
        6, 3, generator=torch.Generator().manual_seed(0)
    )
    mixed = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    assert soft_nearest_neighbor_loss(clustered, labels) < soft_nearest_neighbor_loss(mixed, labels)
    with pytest.raises(ValueError, match="No two examples"):
        soft_nearest_neighbor_loss(torch.eye(3), torch.tensor([0, 1, 2]))


def test_knn_predict_votes_among_the_nearest_by_cosine():
    references = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[5.0, 0.2], [0.3, 0.7], [1.0, 0.6]])
    assert knn_predict(references, labels, queries, 1).tolist() == [0, 1, 0]
    assert knn_predict(references, labels, queries, 5).tolist() == [1, 1, 1]  # majority 3 of 5
    assert probing.circuit_probe is circuit_probe


def test_on_a_hugging_face_gpt2_the_block_path_selects_its_canonical_weights():
    pytest.importorskip("transformers")
    from subnet_interp import tasks

    model = tasks.tiny_gpt2(16, n_layer=2, n_head=4, d_model=32, n_positions=8)
    tokens = torch.randint(16, (32, 8), generator=torch.Generator().manual_seed(0))
    data = [(tokens, tokens[:, -1] % 2)]
    before = snapshot(model)
    result = circuit_probe(
        model, "transformer.h.1.attn", data, eval_data=data, steps=3, position=-1, progress=False
    )
    assert list(result.subnetwork.names) == [f"blocks.1.attn.W_{m}" for m in "QKVO"]
    assert_bit_exact(model, before)
