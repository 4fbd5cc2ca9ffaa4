"""No host-device sync inside a training step: the non-finite-loss check stays on the device,
the host reads it at log points only, and a step after a non-finite loss leaves the parameters
exactly as they were (so the error still names the first bad step and the last good mask)."""

from __future__ import annotations

import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import torch

import subnet_interp as si
from subnet_interp import _loop, _train
from subnet_interp.methods import _weights
from subnet_interp.tasks import planted_mlp

# what reads a tensor's value on the host (a device sync when the tensor is on an accelerator)
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__format__")
# reads of tensors that live on the host whatever the device: the per-step mask seeds come from
# a CPU generator, and torch's Adam keeps its step count on the CPU unless capturable or fused
HOST_ONLY = {
    ("_train.py", "_samplers"),
    ("adam.py", "_single_tensor_adam"),
    ("optimizer.py", "_get_value"),
    ("_loop.py", "step_while_finite"),  # only where the flag is on the CPU (tested below)
}
MASK_METHODS = [
    "gumbel_sigmoid",
    "hard_concrete",
    "continuous_sparsification",
    "continuous_sparsification_lepori",
]
STEP_FUNCTIONS = [(_train, "_step"), (_weights, "_weight_step")]
# where a step may read: between rounds (a method's reset of the mask parameters, e.g.
# continuous sparsification's, waits for the check of the losses so far, as a log point does)
HOST_POINTS = [(_train, "_end_round")]


def task():
    return planted_mlp(generator=torch.Generator().manual_seed(0))


def count_step_reads(monkeypatch) -> Counter:
    """Patch the tensor reads to count, by (file, caller), those made inside a training step."""
    reads: Counter = Counter()
    inside = [False]

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0]:
                caller = sys._getframe(1).f_code
                reads[(Path(caller.co_filename).name, caller.co_name)] += 1
            return original(self, *args, **kwargs)

        return read

    def inside_is(value, original):
        def call(*args, **kwargs):
            was, inside[0] = inside[0], value
            try:
                return original(*args, **kwargs)
            finally:
                inside[0] = was

        return call

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for module, name in STEP_FUNCTIONS:
        monkeypatch.setattr(module, name, inside_is(True, getattr(module, name)))
    for module, name in HOST_POINTS:
        monkeypatch.setattr(module, name, inside_is(False, getattr(module, name)))
    return reads


@pytest.mark.parametrize(
    "method, options",
    [*((m, {}) for m in [*MASK_METHODS, "lottery_ticket", "lt_sft"]),
     ("hard_concrete", {"recompute_masks": True}),
     pytest.param(
         "continuous_sparsification_lepori", {"mask_optimizer": "adafactor"},
         marks=pytest.mark.xfail(
             strict=True, reason="torch's Adafactor reads parameter and update norms on the host"
         ),
     ),
     ("gumbel_sigmoid", {"mask_dtype": torch.bfloat16})],
)  # fmt: skip
def test_a_training_step_reads_no_tensor_on_the_host(method, options, monkeypatch):
    planted = task()
    reads = count_step_reads(monkeypatch)
    si.find(
        planted.model, method, planted.loss_fn, planted.batches(32), steps=6, log_every=2,
        progress=False, generator=torch.Generator().manual_seed(0), **options,
    )  # fmt: skip
    assert sum(reads.values()) > 0 or method in ("lottery_ticket", "lt_sft")  # it counts
    assert {where: n for where, n in reads.items() if where not in HOST_ONLY} == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [*MASK_METHODS, "lottery_ticket"])
def test_a_training_step_on_cuda_never_syncs(method, monkeypatch):
    planted = task()
    model = planted.model.cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in planted.batches(32)]

    def syncs_are_errors(original):
        def step(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return step

    for module, name in STEP_FUNCTIONS:
        monkeypatch.setattr(module, name, syncs_are_errors(getattr(module, name)))
    result = si.find(
        model, method, planted.loss_fn, batches, steps=6, log_every=3, progress=False,
        generator=torch.Generator().manual_seed(0), device="cuda",
    )  # fmt: skip
    assert result.subnetwork.names == si.targets(model).keys()


def poisoned(batches, at: int):
    """``batches`` with the targets of batch ``at`` made NaN (the loss is NaN at step ``at``)."""
    inputs, targets = batches[at]
    return [*batches[:at], (inputs, torch.full_like(targets, float("nan"))), *batches[at + 1 :]]


@pytest.mark.parametrize("method", [*MASK_METHODS, "lottery_ticket", "lt_sft", "attribution"])
def test_a_nan_read_at_a_later_log_point_names_its_step_and_the_last_good_mask(method):
    planted = task()
    data = poisoned(planted.batches(32), at=3)

    def stopped(log_every):
        with pytest.raises(si.NonFiniteLossError) as info:
            si.find(
                task().model, method, planted.loss_fn, data, steps=10, log_every=log_every,
                progress=False, generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
        return info.value

    at_once, later = stopped(log_every=1), stopped(log_every=100)
    assert later.step == at_once.step == 3
    assert str(later) == str(at_once)
    assert "The loss was nan at step 3" in str(later)
    assert later.subnetwork == at_once.subnetwork
    # both read the flag after step 3's update: it was skipped (NaN parameters would stand for
    # no weight; continuous sparsification's mask starts empty, at s0 = 0); the test below
    # checks the parameters bit for bit
    assert later.subnetwork.density() > 0 or method == "continuous_sparsification"


@pytest.mark.parametrize("method", MASK_METHODS)
def test_steps_after_a_nan_leave_the_mask_parameters_bit_exactly(method, monkeypatch):
    planted = task()
    after: list[dict[str, torch.Tensor]] = []  # the mask parameters after each step
    update = _train._update

    def recorded(plan, run, **kwargs):
        update(plan, run, **kwargs)
        after.append({n: p.detach().clone() for n, p in run.params.items()})

    monkeypatch.setattr(_train, "_update", recorded)
    with pytest.raises(si.NonFiniteLossError) as info:
        si.find(
            planted.model, method, planted.loss_fn, poisoned(planted.batches(32), at=3),
            steps=8, log_every=100, progress=False, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert info.value.step == 3
    # the steps ran on, skipped on the device, until the last log point (or, for continuous
    # sparsification, the end of its first round, after step 3 of 8)
    assert len(after) == (4 if method == "continuous_sparsification" else 8)
    moved = [not all(torch.equal(a[n], b[n]) for n in a) for a, b in pairwise(after)]
    assert moved[:2] == [True, True]  # good steps change the parameters ...
    for skipped in after[3:]:  # ... skipped ones leave them as after step 2, bit for bit
        assert all(torch.equal(skipped[n], after[2][n]) for n in skipped)


@pytest.mark.parametrize("fused", [False, True], ids=["restored", "found_inf"])
def test_step_while_finite_steps_bit_exactly_or_not_at_all(fused):
    def setup():
        param = torch.nn.Parameter(torch.linspace(-1, 1, 7))
        param.grad = torch.linspace(0.5, -0.5, 7)
        return param, torch.optim.Adam([param], lr=0.1, fused=fused)

    plain, plain_optimizer = setup()
    plain_optimizer.step()
    finite, nan = _loop.FiniteWatch(), _loop.FiniteWatch()
    finite.observe(torch.tensor(1.0), 0, None)
    nan.observe(torch.tensor(1.0), 0, None)
    nan.observe(torch.tensor(float("nan")), 1, None)
    nan.observe(torch.tensor(2.0), 2, None)  # a later finite loss does not clear it
    for watch, expected in ((finite, plain.detach()), (nan, torch.linspace(-1, 1, 7))):
        param, optimizer = setup()
        on_device = _loop.step_skipping_on_device  # what an accelerator runs: no host read
        on_device(optimizer, watch.ok)
        assert torch.equal(param.detach(), expected)
        if fused and watch is nan:  # the whole step is skipped, Adam's step count included
            assert float(optimizer.state[param]["step"]) == 0.0
        param, optimizer = setup()
        _loop.step_while_finite(optimizer, watch)  # the flag is on the CPU: read on the host
        assert torch.equal(param.detach(), expected)
        assert (param in optimizer.state) == (watch is finite)  # skipped whole, state included
    assert int(nan.step) == 1


def test_a_step_on_the_cpu_neither_copies_nor_restores_the_parameters(monkeypatch):
    """On the CPU the flag is read on the host: no clone of the parameters before the step."""
    cloned = []
    original = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: cloned.append(t) or original(t))
    param = torch.nn.Parameter(torch.ones(5))
    param.grad = torch.ones(5)
    watch = _loop.FiniteWatch()
    watch.observe(torch.tensor(1.0), 0, None)
    _loop.step_while_finite(torch.optim.Adam([param], lr=0.1), watch)
    assert not cloned and not torch.equal(param.detach(), torch.ones(5))
