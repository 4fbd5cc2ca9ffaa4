"""One conformance suite every registered method must pass (scikit-learn style)."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp._checkpoint import jsonable
from subnet_interp.tasks import planted_delta, planted_mlp, planted_teacher

# Per method: which planted task suits it, hyper-parameters that make it converge in a few
# hundred steps on that task (its defaults are the paper's, tuned to much longer runs and
# cross-entropy losses), the steps, and the IoU it must reach with the planted set.
#   frozen: weights fixed at a solution; the planted weights are necessary, the rest irrelevant.
#   teacher: random-init student, sparse linear teacher (methods that train weights).
#   delta: a pretrained map whose fine-tuning task changes a planted sparse set (LT-SFT).
TASKS = {"frozen": planted_mlp, "teacher": planted_teacher, "delta": planted_delta}
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
    name = request.param
    task = make_task(name)
    before = snapshot(task.model)
    flags = [p.requires_grad for p in task.model.parameters()]
    task.model.train()
    result = run(name, task)
    return dict(name=name, task=task, result=result, before=before, flags=flags)


def test_recovers_planted_subnetwork(outcome):
    if SETTINGS[outcome["name"]]["iou"] is None:
        pytest.skip("baseline: not expected to recover a planted subnetwork")
    found, planted = outcome["result"].subnetwork, outcome["task"].planted
    score = iou(found, planted)
    print(f"{outcome['name']}: IoU with planted = {score:.3f}, density = {found.density():.3f}")
    assert score >= SETTINGS[outcome["name"]]["iou"]


def test_keeps_task_loss_low(outcome):
    name, task, result = outcome["name"], outcome["task"], outcome["result"]
    if SETTINGS[name]["iou"] is None:
        pytest.skip("baseline: not expected to solve the task")
    if SETTINGS[name]["task"] == "frozen":
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


def test_model_is_unchanged(outcome):
    model = outcome["task"].model
    assert_bit_exact(model, outcome["before"])
    assert [p.requires_grad for p in model.parameters()] == outcome["flags"]
    assert model.training and all(m.training for m in model.modules())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_meta_records_the_run(outcome):
    result, name = outcome["result"], outcome["name"]
    meta = result.subnetwork.meta
    assert meta["method"] == name
    assert meta["steps"] == SETTINGS[name]["steps"]
    assert meta["fingerprint"] == si.fingerprint(outcome["task"].model)
    expected = {**si.methods.get(name)().hparams(), **SETTINGS[name]["hparams"]}
    assert meta["hparams"] == jsonable(expected)  # tuples are stored as lists
    if si.methods.get(name).needs_steps:
        assert set(result.history) >= {"loss", "density"}
        assert len(result.history["loss"]) == len(result.history["density"]) > 1


def test_save_load_round_trip(outcome, tmp_path):
    sub = outcome["result"].subnetwork
    sub.save(tmp_path / "found.safetensors")
    loaded = si.Subnetwork.load(tmp_path / "found.safetensors")
    assert loaded == sub and dict(loaded.meta) == dict(sub.meta)
    with si.masked(outcome["task"].model, loaded):  # the fingerprint check passes
        pass


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_same_seed_same_mask(name):
    steps = 20 if SETTINGS[name]["steps"] else None
    first = run(name, make_task(name), seed=3, steps=steps)
    second = run(name, make_task(name), seed=3, steps=steps)
    assert first.subnetwork == second.subnetwork
    assert first.history == second.history


def test_weight_training_methods_return_weights(outcome):
    method = si.methods.get(outcome["name"])
    weights = outcome["result"].weights
    if not method.trains_weights:
        assert weights is None
        return
    assert set(weights) == set(outcome["result"].subnetwork.names)
    for name, tensor in weights.items():
        assert tensor.shape == outcome["result"].subnetwork[name].shape


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
