"""Hierarchical modules (Watanabe et al. 2019): Ward's tree, its cuts, and independent
sub-networks recovered as clades."""

from __future__ import annotations

import pytest
import torch

from subnet_interp.analysis import hierarchical_modules, plot_dendrogram
from subnet_interp.analysis.hierarchical import cut_linkage, leaf_order, ward_linkage
from subnet_interp.tasks import independent_mlps


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    pairs = torch.stack([labels, truth], 1).unique(dim=0)
    return len(pairs) == len(labels.unique()) == len(truth.unique())


def coarsens(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Every true group lies inside one cluster."""
    return all(len(labels[truth == group].unique()) == 1 for group in truth.unique())


def test_ward_linkage_matches_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    ours = ward_linkage(points)
    theirs = torch.from_numpy(hierarchy.linkage(points.double().numpy(), "ward"))
    torch.testing.assert_close(ours[:, 2], theirs[:, 2])
    assert torch.equal(ours[:, [0, 1, 3]], theirs[:, [0, 1, 3]])


def test_ward_merge_height_of_two_groups_is_the_variance_increase():
    # Ward's criterion: merging groups of sizes a, b raises the within-cluster sum of squares
    # by a b / (a + b) |c_a - c_b|^2, and the reported height is sqrt(2 x that increase).
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(5, 3, generator=gen) * 0.01
    right = torch.randn(7, 3, generator=gen) * 0.01 + torch.tensor([10.0, 0.0, 0.0])
    points = torch.cat([left, right])
    linkage = ward_linkage(points)
    gap = (left.double().mean(0) - right.double().mean(0)).norm()
    expected = (2 * 5 * 7 / 12) ** 0.5 * gap
    assert float(linkage[-1, 2]) == pytest.approx(float(expected), rel=1e-9)
    assert (linkage[1:, 2] >= linkage[:-1, 2]).all()  # Ward's heights never decrease
    assert torch.equal(cut_linkage(linkage, 2), torch.tensor([0] * 5 + [1] * 7))
    assert sorted(leaf_order(linkage)) == list(range(12))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_split_separates_two_independent_subnetworks(seed):
    task = independent_mlps(2, generator=torch.Generator().manual_seed(seed))
    result = hierarchical_modules(task.model, task.batches())
    assert not result.dead.any()
    assert same_partition(result.cut(2), task.unit_blocks)


def test_three_deeper_subnetworks_are_clades_of_the_tree():
    task = independent_mlps(3, d_hidden=12, depth=3, generator=torch.Generator().manual_seed(4))
    result = hierarchical_modules(task.model, task.batches())
    assert same_partition(result.cut(3), task.unit_blocks)
    assert coarsens(result.cut(2), task.unit_blocks)  # the top split cuts no block
    assert len(result.cut(4).unique()) == 4


def test_a_blocks_weights_are_enriched_in_its_module():
    task = independent_mlps(2, generator=torch.Generator().manual_seed(0))
    result = hierarchical_modules(task.model, task.batches())
    module_of_block0 = int(result.cut(2)[task.unit_blocks == 0][0])
    report = result.enrichment(task.blocks[0], 2)
    assert report[module_of_block0]["kept_fraction"] == 1.0
    assert report[1 - module_of_block0]["kept_fraction"] == 0.0
    modules = result.as_modules(2)  # inputs and outputs join their block's module
    assert same_partition(modules.labels["input"], task.input_blocks)
    assert same_partition(modules.labels["4.weight"], task.output_blocks)


def test_profiles_keep_the_signs_the_clustering_drops():
    # unit 0 = relu(x0) rises with x0, unit 1 = relu(-x0) falls with it; unit 2 reads x1
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    result = hierarchical_modules(net, [x], features="input")
    assert result.input_correlation[0, 0] > 0.5 and result.input_correlation[1, 0] < -0.5
    assert same_partition(result.cut(2), torch.tensor([0, 0, 1]))  # |v|: one role up to sign
    inputs, _ = result.profiles(3)
    assert inputs[0, 0] > 0.5 and inputs[1, 0] < -0.5
    signed = hierarchical_modules(net, [x], features="input", signs="keep")
    assert not same_partition(signed.cut(2), torch.tensor([0, 0, 1]))


def test_dead_units_are_left_out_and_the_model_is_unchanged():
    task = independent_mlps(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        task.model[0].bias[3] = -1e4  # unit 3 never fires
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = hierarchical_modules(task.model, task.batches())
    assert result.dead.nonzero().flatten().tolist() == [3]
    assert result.cut(2)[3] == -1 and result.linkage.shape[0] == result.n_units - 2
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in task.model.modules())


def test_bad_arguments_are_refused():
    task = independent_mlps(2)
    with pytest.raises(ValueError, match="features must be"):
        hierarchical_modules(task.model, task.batches(), features=("weights",))
    with pytest.raises(ValueError, match="signs must be"):
        hierarchical_modules(task.model, task.batches(), signs="flip")
    with pytest.raises(ValueError, match="at least two weights"):
        hierarchical_modules(task.model, task.batches(), include="0.weight")
    with pytest.raises(ValueError, match="at least 2 examples"):
        hierarchical_modules(task.model, [])
    result = hierarchical_modules(task.model, task.batches())
    with pytest.raises(ValueError, match="n_clusters must be"):
        result.cut(0)


def test_dendrogram_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    task = independent_mlps(2)
    result = hierarchical_modules(task.model, task.batches())
    figure = plot_dendrogram(result, 2, path=str(tmp_path / "tree.png"))
    assert (tmp_path / "tree.png").stat().st_size > 0
    assert len(figure.axes[0].lines) >= result.n_units - 1
