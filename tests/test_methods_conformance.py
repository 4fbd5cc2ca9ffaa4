"""One conformance suite every registered method must pass (scikit-learn style)."""

from __future__ import annotations

import pytest
import torch

import subnet_interp as si
from subnet_interp.tasks import planted_delta, planted_mlp, planted_sensitivity, planted_teacher

# Per method: which planted task suits it, hyper-parameters that make it converge in a few
# hundred steps on that task (its defaults are the paper's, tuned to much longer runs and
# cross-entropy losses), the steps, and the IoU it must reach with the planted set.
#   frozen: weights fixed at a solution; the planted weights are necessary, the rest irrelevant.
#   teacher: random-init student, sparse linear teacher (methods that train weights).
#   delta: a pretrained map whose fine-tuning task changes a planted sparse set (LT-SFT).
#   sensitivity: the frozen task with shifted targets (loss off its minimum), for one-shot
#   gradient methods, which see nothing on a task solved exactly.
TASKS = {
    "frozen": planted_mlp,
    "teacher": planted_teacher,
    "delta": planted_delta,
    "sensitivity": planted_sensitivity,
}
SETTINGS = {
    "gumbel_sigmoid": dict(task="frozen", hparams={}, steps=300, iou=0.95),
    "continuous_sparsification_lepori": dict(task="frozen", hparams={}, steps=300, iou=0.95),
    "hard_concrete": dict(
        task="frozen", hparams=dict(dataset_size=1, l0_lambda=1e-2, lr=5e-2), steps=600, iou=0.9
    ),
    "continuous_sparsification": dict(
        task="teacher", hparams=dict(lr=1e-2, weight_lr=1e-2, l1_lambda=1e-3), steps=600, iou=0.9
    ),
    "lottery_ticket": dict(
        task="teacher", hparams=dict(lr=1e-2, target_density=0.25), steps=200, iou=0.9
    ),
    "lt_sft": dict(task="delta", hparams=dict(lr=1e-2, density=0.05), steps=200, iou=0.95),
    # one-shot attribution; the planted density is 0.16, so the mask can equal the planted set
    "attribution": dict(task="sensitivity", hparams=dict(density=0.16), steps=8, iou=1.0),
    # baselines: no planted recovery expected (iou=None); the rest of the suite applies
    "magnitude": dict(task="frozen", hparams={}, steps=None, iou=None),
    "random": dict(task="frozen", hparams={}, steps=None, iou=None),
}


def iou(a: si.Subnetwork, b: si.Subnetwork) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union


def make_task(name: str):
    return TASKS[SETTINGS[name]["task"]](generator=torch.Generator().manual_seed(0))


def run(name: str, task, seed: int = 1, steps: int | None = None):
    setting = SETTINGS[name]
    return si.find(
        task.model,
        si.methods.create(name, **setting["hparams"]),
        task.loss_fn,
        task.batches(64),
        steps=steps or setting["steps"],
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )


def test_every_registered_method_has_conformance_settings():
    missing = sorted(set(si.methods.names()) - set(SETTINGS))
    assert not missing, f"add conformance settings for {missing}"


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def outcome(request):
    """Every registered method through the library's conformance kit (si.testing.check_method):
    declaration, bad hyper-parameters, planted recovery, bit-exact restore, meta, result fields,
    save/load, determinism and (learnable masks) exact resume from a checkpoint."""
    name = request.param
    setting = SETTINGS[name]
    report = si.testing.check_method(
        si.methods.get(name),
        hparams=setting["hparams"],
        steps=setting["steps"],
        min_iou=setting["iou"] or 0.0,
    )
    print(f"{name}: IoU with planted = {report.iou:.3f}, density = {report.density:.3f}")
    return dict(name=name, task=report.planted, result=report.result, report=report)


def test_passes_the_conformance_kit(outcome):
    report = outcome["report"]
    expected = {"declaration", "bad_hparams", "restore", "meta", "result", "save_load"}
    expected |= {"determinism"}
    assert expected <= set(report.passed)
    learns = SETTINGS[outcome["name"]]["iou"] is not None
    assert ("recovery" in report.passed) == learns
    if not learns:
        assert "recovery" in report.skipped
    assert report.task == SETTINGS[outcome["name"]]["task"]


def test_keeps_task_loss_low(outcome):
    name, task, result = outcome["name"], outcome["task"], outcome["result"]
    if SETTINGS[name]["iou"] is None:
        pytest.skip("baseline: not expected to solve the task")
    if SETTINGS[name]["task"] == "sensitivity":  # the mask alone is as good as the dense net
        with si.masked(task.model, result.subnetwork):
            masked_loss = task.loss()
        with si.masked(task.model, ~result.subnetwork):
            ablated_loss = task.loss()
        assert (
            masked_loss == pytest.approx(task.loss(), rel=1e-4) and ablated_loss > 2 * masked_loss
        )
    elif SETTINGS[name]["task"] == "frozen":
        with si.masked(task.model, result.subnetwork):
            masked_loss = task.loss()
        with si.masked(task.model, ~task.planted):
            ablated_loss = task.loss()
        assert masked_loss < 0.05 * ablated_loss
    elif name == "lottery_ticket":  # the retrained ticket is about as good as the dense net
        dense = result.history["loss"][0]  # round 0 trains the dense network
        assert result.history["final_ticket_loss"][0] < 1.5 * dense + 0.05
    elif name == "lt_sft":  # the sparse delta solves the fine-tuning task
        with torch.no_grad(), si.delta_applied(task.model, result.delta):
            tuned = task.loss()
        assert tuned < 0.1 * task.loss()
    else:  # trained jointly with its mask: the training loss fell far below the start
        assert result.history["loss"][-1] < 0.2 * result.history["loss"][0]


LOW_MEMORY = [  # (method, mask_dtype, mask_optimizer): options that keep planted recovery
    ("gumbel_sigmoid", torch.bfloat16, "paper"),
    ("continuous_sparsification_lepori", torch.bfloat16, "paper"),
    ("continuous_sparsification_lepori", torch.bfloat16, "adafactor"),
    ("hard_concrete", torch.bfloat16, "paper"),
    ("hard_concrete", torch.bfloat16, "adafactor"),
    ("continuous_sparsification", torch.bfloat16, "paper"),
    ("continuous_sparsification", torch.float32, "adafactor"),
]


@pytest.mark.parametrize(
    "name,dtype,optimizer", LOW_MEMORY, ids=[f"{n}-{str(d)[6:]}-{o}" for n, d, o in LOW_MEMORY]
)
def test_low_memory_options_still_recover_the_planted_subnetwork(name, dtype, optimizer):
    setting = SETTINGS[name]
    task = make_task(name)
    result = si.find(
        task.model,
        si.methods.create(name, **setting["hparams"]),
        task.loss_fn,
        task.batches(64),
        steps=setting["steps"],
        generator=torch.Generator().manual_seed(1),
        progress=False,
        mask_dtype=dtype,
        mask_optimizer=optimizer,
        recompute_masks=True,
    )
    assert iou(result.subnetwork, task.planted) >= setting["iou"] - 0.05
    assert result.subnetwork.meta["mask_dtype"] == str(dtype)[6:]
    assert result.subnetwork.meta["mask_optimizer"] == optimizer


def test_mask_parameters_take_the_requested_dtype():
    seen = []

    class Spy(si.methods.get("continuous_sparsification_lepori")):
        def sample(self, params, state, generator):
            seen.append(params.dtype)
            return super().sample(params, state, generator)

    task = make_task("continuous_sparsification_lepori")
    si.find(task.model, Spy(), task.loss_fn, task.batches(8), steps=2, progress=False,
            mask_dtype=torch.bfloat16)  # fmt: skip
    assert seen and set(seen) == {torch.bfloat16}
    with pytest.raises(ValueError, match="`mask_dtype` must be torch.float32"):
        si.find(task.model, "gumbel_sigmoid", task.loss_fn, task.batches(8), steps=2,
                mask_dtype=torch.int8)  # fmt: skip
    with pytest.raises(ValueError, match="`mask_optimizer` must be 'paper' or 'adafactor'"):
        si.find(task.model, "gumbel_sigmoid", task.loss_fn, task.batches(8), steps=2,
                mask_optimizer="sgd")  # fmt: skip


@pytest.mark.parametrize("name", ["gumbel_sigmoid", "hard_concrete", "continuous_sparsification"])
def test_recomputed_masks_train_exactly_as_stored_ones(name):
    outcomes = []
    for recompute in (False, True):
        task = make_task(name)
        result = si.find(
            task.model,
            si.methods.create(name, **SETTINGS[name]["hparams"]),
            task.loss_fn,
            task.batches(64),
            steps=40,
            generator=torch.Generator().manual_seed(3),
            progress=False,
            recompute_masks=recompute,
        )
        outcomes.append(result)
    assert outcomes[0].subnetwork == outcomes[1].subnetwork
    assert outcomes[0].history == outcomes[1].history


LEARNABLE = [
    "gumbel_sigmoid",
    "continuous_sparsification_lepori",
    "hard_concrete",
    "continuous_sparsification",
]


@pytest.mark.parametrize("name", LEARNABLE)
def test_the_lean_memory_preset_is_a_tested_low_memory_option(name):
    """``memory="lean"`` resolves to bf16 + recompute + the method's lean optimiser, a
    combination whose planted recovery LOW_MEMORY above tests."""
    task = make_task(name)
    result = si.find(
        task.model,
        si.methods.create(name, **SETTINGS[name]["hparams"]),
        task.loss_fn,
        task.batches(64),
        steps=2,
        progress=False,
        memory="lean",
    )
    meta = result.subnetwork.meta
    expected = "paper" if name in ("gumbel_sigmoid", "continuous_sparsification") else "adafactor"
    assert (meta["mask_dtype"], meta["mask_optimizer"], meta["recompute_masks"]) == (
        "bfloat16",
        expected,
        True,
    )
    assert (name, torch.bfloat16, expected) in LOW_MEMORY


def test_the_lean_preset_refuses_options_it_sets():
    task = make_task("continuous_sparsification_lepori")
    with pytest.raises(
        ValueError, match="memory='lean' sets mask_dtype.*mask_optimizer='adafactor'"
    ):
        si.find(task.model, "continuous_sparsification_lepori", task.loss_fn, task.batches(8),
                steps=2, memory="lean", mask_optimizer="adafactor", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="`memory` must be 'default' or 'lean', got 'small'"):
        si.find(task.model, "continuous_sparsification_lepori", task.loss_fn, task.batches(8),
                steps=2, memory="small", progress=False)  # fmt: skip
