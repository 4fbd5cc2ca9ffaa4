"""Knowledge-critical subnetworks (Bayazit et al. 2024) with ``si.objectives.knowledge_critical``:
on an MLP computing two separable classifications, removing the found critical subnetwork
drops the target task to chance while the control task stays; the critical weights are the
target task's; the objective's terms and the convention helper are checked on their own."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from torch import nn

import subnet_interp as si
from subnet_interp.objectives import (
    critical_subnetwork,
    knowledge_critical,
    maintenance_loss,
    suppression_loss,
)

D_IN, HIDDEN, CLASSES = 6, 8, 3  # per task


def two_task_mlp(generator, inputs):
    """Task A reads inputs 0..5 through hidden units 0..7 into logits 0..2; task B reads inputs
    6..11 through units 8..15 into logits 3..5. No weight is shared; cross weights are 0. The
    output bias centres the logits on ``inputs``, so the classes are roughly balanced."""
    model = nn.Sequential(nn.Linear(2 * D_IN, 2 * HIDDEN), nn.ReLU(), nn.Linear(2 * HIDDEN, 6))
    w_in = torch.zeros(2 * HIDDEN, 2 * D_IN)
    w_out = torch.zeros(6, 2 * HIDDEN)
    for task in range(2):
        units = slice(task * HIDDEN, (task + 1) * HIDDEN)
        w_in[units, task * D_IN : (task + 1) * D_IN] = torch.randn(
            HIDDEN, D_IN, generator=generator
        )
        w_out[task * CLASSES : (task + 1) * CLASSES, units] = torch.randn(
            CLASSES, HIDDEN, generator=generator
        )
    with torch.no_grad():
        model[0].weight.copy_(w_in)
        model[0].bias.zero_()
        model[2].weight.copy_(w_out)
        model[2].bias.copy_(-model[2](model[1](model[0](inputs))).mean(0))
    planted = {"0.weight": w_in != 0, "2.weight": w_out != 0}
    target_weights = {
        "0.weight": torch.zeros_like(w_in, dtype=torch.bool),
        "2.weight": torch.zeros_like(w_out, dtype=torch.bool),
    }
    target_weights["0.weight"][:HIDDEN, :D_IN] = True
    target_weights["2.weight"][:CLASSES, :HIDDEN] = True
    return model, {n: planted[n] & target_weights[n] for n in planted}


def target_logits(model, batch):
    return model(batch)[:, :CLASSES]


def control_logits(model, batch):
    return model(batch)[:, CLASSES:]


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 2 * D_IN, generator=gen)
    model, target_weights = two_task_mlp(gen, inputs)
    batches = [inputs[i : i + 128] for i in range(0, 512, 128)]
    return model, target_weights, inputs, batches


@pytest.fixture(scope="module")
def found(setup):
    model, _, _, batches = setup
    objective = knowledge_critical(
        model, batches, forward=target_logits, control_forward=control_logits, sparsity=0.3
    )
    # the objective carries the sparsity term (the method's own L0 would push the other way);
    # every gate starts kept (sigmoid(0.5) > 1/2), as a remaining model should
    method = si.methods.create("continuous_sparsification_lepori", l0_lambda=0.0, mask_init=0.5)
    return si.find(model, method, objective, batches, steps=300, progress=False)


def test_removing_the_critical_subnetwork_suppresses_the_target_and_keeps_the_control(setup, found):
    model, _, inputs, _ = setup
    critical = critical_subnetwork(found)
    with torch.no_grad():
        full_target = target_logits(model, inputs).argmax(-1)
        full_control = control_logits(model, inputs).argmax(-1)
    with si.masked(model, ~critical), torch.no_grad():
        target_accuracy = float(
            (target_logits(model, inputs).argmax(-1) == full_target).float().mean()
        )
        control_accuracy = float(
            (control_logits(model, inputs).argmax(-1) == full_control).float().mean()
        )
    majority = float(full_target.bincount(minlength=CLASSES).max()) / len(full_target)
    assert majority < 0.5  # chance: always answering the most frequent class
    assert target_accuracy <= majority + 0.05, (target_accuracy, majority)
    assert control_accuracy >= 0.95, control_accuracy


def test_the_critical_subnetwork_is_made_of_the_target_tasks_weights(setup, found):
    _, target_weights, _, _ = setup
    critical = critical_subnetwork(found)
    removed = sum(int(critical[n].sum()) for n in target_weights)
    inside = sum(int((critical[n] & target_weights[n]).sum()) for n in target_weights)
    union = sum(int((critical[n] | target_weights[n]).sum()) for n in target_weights)
    precision = inside / max(removed, 1)
    assert removed > 0
    assert precision >= 0.9, (precision, inside / union)
    assert critical.density() < 0.5  # sparse: the remaining model keeps most weights


def test_critical_subnetwork_is_the_complement_of_the_kept_mask(found):
    critical = critical_subnetwork(found)
    for name in found.subnetwork.names:
        assert torch.equal(critical[name], ~found.subnetwork[name])
    assert torch.equal(critical_subnetwork(found.subnetwork)["2.weight"], critical["2.weight"])
    with pytest.raises(TypeError):
        critical_subnetwork({"2.weight": torch.ones(3)})


def test_the_loss_terms_are_zero_exactly_at_their_goals():
    assert float(suppression_loss(torch.zeros(4, 5))) == pytest.approx(0.0, abs=1e-6)
    assert float(suppression_loss(torch.tensor([[5.0, 0.0, 0.0]]))) > 1.0
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert float(maintenance_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(maintenance_loss(logits, -logits)) > 0.1


def test_the_objective_leaves_the_model_unchanged_and_reads_a_full_kept_fraction(setup):
    model, _, _, batches = setup
    before = snapshot(model)
    objective = knowledge_critical(model, batches[:1], forward=target_logits)
    assert float(objective.kept_fraction(model).detach()) == pytest.approx(1.0)
    loss = objective(model, batches[0])  # no mask: nothing is critical, controls are exact
    assert objective.last["critical_density"] == pytest.approx(0.0, abs=1e-6)
    assert objective.last["maintenance"] == pytest.approx(0.0, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(objective.last["suppression"], abs=1e-5)
    assert_bit_exact(model, before)
    with pytest.raises(ValueError, match="`control_data` yielded no batches"):
        knowledge_critical(model, [])
    with pytest.raises(ValueError, match="`sparsity` must be a non-negative number"):
        knowledge_critical(model, batches, sparsity=-1.0)
    assert si.objectives.knowledge_critical is knowledge_critical
