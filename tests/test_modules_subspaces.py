"""Modules (spectral clustering with a shuffle null) and subspaces (principal angles)."""

from __future__ import annotations

import math

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import (
    head_ov,
    module_enrichment,
    modules,
    retained_energy,
    subspace_angles,
)


def block_diagonal_mlp(blocks=2, width=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(blocks * width, blocks * width),
        torch.nn.ReLU(),
        torch.nn.Linear(blocks * width, blocks * width),
    )
    with torch.no_grad():
        for layer in (net[0], net[2]):
            weight = torch.randn(blocks * width, blocks * width, generator=gen) * 0.01
            for b in range(blocks):
                weight[b * width : (b + 1) * width, b * width : (b + 1) * width] = torch.randn(
                    width, width, generator=gen
                )
            layer.weight.copy_(weight)
    return net


def test_block_diagonal_network_splits_into_its_blocks_significantly():
    net = block_diagonal_mlp()
    result = modules(net, None, 2, null_samples=10)
    for labels in result.labels.values():
        assert len(set(labels[:8].tolist())) == 1 and len(set(labels[8:].tolist())) == 1
        assert labels[0] != labels[8]
    assert result.percentile == 0.0 and result.z < -3
    assert result.ncut < float(result.null_ncuts.min())


def test_subnetwork_enrichment_in_a_module():
    net = block_diagonal_mlp()
    result = modules(net, None, 2, null_samples=2)
    masks = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in si.targets(net).items()}
    for name in masks:
        masks[name][:8, :8] = True  # only the first block
    enrichment = module_enrichment(si.Subnetwork(masks), result)
    first = int(result.labels["input"][0])
    assert enrichment[first]["kept_fraction"] == 1.0
    assert enrichment[first]["enrichment"] == pytest.approx(1 / enrichment[first]["chance"])


def test_non_chain_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match="reads 5 inputs but '0.weight' writes 3"):
        modules(net, None, 2)


def test_identical_subspaces_have_zero_angles_and_orthogonal_ones_right_angles():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=gen)
    assert torch.allclose(
        subspace_angles(a, a @ torch.randn(3, 3, generator=gen)), torch.zeros(3), atol=1e-5
    )
    e = torch.eye(6)
    assert torch.allclose(subspace_angles(e[:, :2], e[:, 2:4]), torch.full((2,), math.pi / 2))


def test_random_lines_have_the_expected_angle_distribution():
    gen = torch.Generator().manual_seed(1)
    n, trials = 30, 2000
    cos2 = torch.stack(
        [
            torch.cos(
                subspace_angles(torch.randn(n, 1, generator=gen), torch.randn(n, 1, generator=gen))
            )[0]
            ** 2
            for _ in range(trials)
        ]
    )
    assert float(cos2.mean()) == pytest.approx(1 / n, rel=0.1)  # E[cos^2] = 1/n for random lines


def test_retained_energy():
    m = torch.zeros(4, 3)
    m[0, 0], m[1, 1] = 3.0, 4.0
    assert retained_energy(m, torch.eye(4)[:, :1]) == pytest.approx(9 / 25)
    assert retained_energy(m, torch.eye(4)[:, :2]) == pytest.approx(1.0)


def test_head_ov_masked_by_a_subnetwork():
    pytest.importorskip("transformers")
    from _hf_models import BUILDERS, D

    model = BUILDERS["gpt2"]()
    full = head_ov(model, None, 1, 2)
    assert full.shape == (D, D)
    masks = {
        "blocks.1.attn.W_O": torch.zeros(
            si.targets(model)["blocks.1.attn.W_O"].shape, dtype=torch.bool
        )
    }
    assert torch.count_nonzero(head_ov(model, si.Subnetwork(masks), 1, 2)) == 0
    assert torch.linalg.matrix_rank(full) <= 8  # d_head


def test_lesioning_the_module_a_task_uses_hurts_more_than_random_lesions():
    from subnet_interp.analysis import module_lesions

    net = block_diagonal_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = modules(net, None, 2, null_samples=2)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = net(x)[:, :8]  # the task reads the first block's outputs only

    def evaluate(model):
        with torch.no_grad():
            return float(((model(x)[:, :8] - target) ** 2).mean())

    lesions = module_lesions(net, result, evaluate, n_random=30)
    assert len(lesions) == 2 and {lesion.size for lesion in lesions} == {8}
    used = int(result.labels["0.weight"][0])
    by_module = {lesion.module: lesion for lesion in lesions}
    assert by_module[used].percentile < 0.05  # more damaging than random lesions of 8 neurons
    assert by_module[used].effect > 10 * abs(by_module[1 - used].effect)
    assert by_module[1 - used].percentile > 0.5  # the other module barely matters
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_module_lesions_needs_random_controls():
    from subnet_interp.analysis import module_lesions

    net = block_diagonal_mlp()
    result = modules(net, None, 2, null_samples=2)
    with pytest.raises(ValueError, match="n_random must be at least 1"):
        module_lesions(net, result, lambda m: 0.0, n_random=0)
