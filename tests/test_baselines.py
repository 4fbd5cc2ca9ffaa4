"""magnitude and random baselines: exact counts."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))


def no_loss(m, b):
    return m(b).sum()


@pytest.mark.parametrize("density", [0.0, 0.13, 0.5, 1.0])
def test_magnitude_is_exact_global_top_k(density):
    net = model()
    sub = si.find(
        net,
        si.methods.create("magnitude", density=density),
        no_loss,
        [torch.zeros(1, 7)],
        progress=False,
    ).subnetwork
    flat = torch.cat([net[0].weight.abs().flatten(), net[2].weight.abs().flatten()])
    k = round(density * flat.numel())
    kept = torch.cat([sub["0.weight"].flatten(), sub["2.weight"].flatten()])
    assert int(kept.sum()) == k
    if 0 < k < flat.numel():
        assert flat[kept].min() >= flat[~kept].max()


def test_magnitude_per_target_keeps_density_in_each():
    net = model()
    method = si.methods.create("magnitude", density=0.25, scope="per_target")
    sub = si.find(net, method, no_loss, [torch.zeros(1, 7)], progress=False).subnetwork
    for name, weight in (("0.weight", net[0].weight), ("2.weight", net[2].weight)):
        assert int(sub[name].sum()) == round(0.25 * weight.numel())
        assert weight.abs()[sub[name]].min() >= weight.abs()[~sub[name]].max()


def test_random_matches_per_target_counts_exactly():
    gen = torch.Generator().manual_seed(0)
    reference = si.Subnetwork(
        {"a": torch.rand(40, 30, generator=gen) < 0.1, "b": torch.rand(17, generator=gen) < 0.7}
    )
    for seed in range(5):
        control = si.random_like(reference, torch.Generator().manual_seed(seed))
        for name in reference:
            assert int(control[name].sum()) == int(reference[name].sum())
    assert si.random_like(reference, torch.Generator().manual_seed(1)) != si.random_like(
        reference, torch.Generator().manual_seed(2)
    )


def test_random_method_density_and_uniformity():
    net = torch.nn.Linear(50, 40)
    hits = torch.zeros(40, 50)
    for seed in range(200):
        sub = si.find(
            net,
            si.methods.create("random", density=0.3),
            no_loss,
            [torch.zeros(1, 50)],
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        ).subnetwork
        assert int(sub["weight"].sum()) == 600
        hits += sub["weight"]
    # every position kept with probability 0.3: mean 60 hits out of 200, sd ~6.5
    assert abs(float(hits.mean()) - 60) < 1e-6
    assert float(hits.min()) > 30 and float(hits.max()) < 90


def test_bad_density_is_rejected():
    with pytest.raises(ValueError, match="density must be in"):
        si.methods.create("magnitude", density=1.5)
    with pytest.raises(ValueError, match="scope must be"):
        si.methods.create("magnitude", scope="layer")


def test_training_methods_require_steps():
    with pytest.raises(ValueError, match="needs `steps`, the number of optimisation steps"):
        si.find(torch.nn.Linear(2, 2), "gumbel_sigmoid", no_loss, [torch.zeros(1, 2)])
