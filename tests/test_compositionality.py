"""Structural compositionality (Lepori et al. 2023): removing one subroutine's subnetwork breaks
that subroutine and spares the other, on independent sub-networks where that is the truth."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import Subtask, compositionality
from subnet_interp.tasks import independent_mlps


@pytest.fixture(scope="module")
def task():
    return independent_mlps(2, generator=torch.Generator().manual_seed(0))


def subtasks_of(task):
    batches = task.batches()
    return {"A": (task.loss_of(0), batches), "B": (task.loss_of(1), batches)}


def test_removing_a_planted_block_breaks_its_subtask_and_spares_the_other(task):
    planted = {"A": task.blocks[0], "B": task.blocks[1]}
    result = compositionality(task.model, subtasks_of(task), subnetworks=planted, controls=8)
    for own, other in (("A", "B"), ("B", "A")):
        hit, spared = result.cell(own, own), result.cell(own, other)
        assert hit.damage > 0.05
        assert spared.ablated == spared.full  # the other block reads none of these weights
        assert hit.alone == pytest.approx(hit.full, abs=1e-6)  # the block alone computes it
        assert hit.z > spared.z
    damage = result.matrix("damage")
    assert (damage.diagonal() > damage.fliplr().diagonal()).all()


def test_found_subnetworks_show_compositionality_against_random_ablations(task):
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    method = si.methods.create("continuous_sparsification_lepori", l0_lambda=1e-3, lr=0.1)
    result = compositionality(task.model, subtasks_of(task), method=method, steps=200, controls=9)
    for own, other in (("A", "B"), ("B", "A")):
        assert result.subnetworks[own].density() < 0.15
        hit, spared = result.cell(own, own), result.cell(own, other)
        assert hit.z > 3 and hit.p_value == pytest.approx(0.1)  # beats all 9 random ablations
        assert spared.ablated == pytest.approx(spared.full, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
    text = str(result)
    assert "Lepori" in text and len(text.splitlines()) == 4 + 4


def test_a_higher_is_better_metric_counts_damage_the_same_way(task):
    def negative_error(model, batch):
        return -task.loss_of(0)(model, batch)

    subtasks = {
        "A": Subtask(task.loss_of(0), task.batches(), metric=negative_error, higher_is_better=True),
        "B": subtasks_of(task)["B"],
    }
    planted = {"A": task.blocks[0], "B": task.blocks[1]}
    result = compositionality(task.model, subtasks, subnetworks=planted, controls=4)
    assert result.cell("A", "A").higher_is_better
    assert result.cell("A", "A").damage > 0.05 and result.cell("B", "A").damage == 0.0


def test_measure_only_subtasks_get_a_column_but_no_subnetwork(task):
    batches = task.batches()
    subtasks = {
        **subtasks_of(task),
        "both": (lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches),
    }
    planted = {"A": task.blocks[0], "B": task.blocks[1]}
    result = compositionality(
        task.model, subtasks, subnetworks=planted, measure_only=["both"], controls=2
    )
    assert result.subroutines == ("A", "B") and result.subtasks == ("A", "B", "both")
    assert result.matrix().shape == (2, 3)


def test_bad_requests_are_refused(task):
    subtasks = subtasks_of(task)
    with pytest.raises(ValueError, match="no `method`"):
        compositionality(task.model, subtasks)
    with pytest.raises(ValueError, match="not subtasks"):
        compositionality(task.model, subtasks, subnetworks={"C": task.blocks[0]}, method="random")
    with pytest.raises(TypeError, match="must be a Subtask or a tuple"):
        compositionality(task.model, {"A": task.loss_of(0)}, method="random")
    empty = task.blocks[0] - task.blocks[0]
    with pytest.raises(ValueError, match="keeps 0 of"):
        compositionality(task.model, subtasks, subnetworks={"A": empty, "B": task.blocks[1]})
    with pytest.raises(KeyError, match="No cell"):
        compositionality(
            task.model, subtasks, subnetworks={"A": task.blocks[0], "B": task.blocks[1]}, controls=2
        ).cell("A", "C")
