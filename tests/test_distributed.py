"""Mask training under torch.distributed (2 CPU processes, gloo), data-parallel and with FSDP2
(fully_shard) sharding the weights and mask parameters: the same mask as one process over the
same global batches and seed, identical on every rank, one writer."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import subnet_interp as si

HERE = pathlib.Path(__file__).parent
STEPS = 60
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def torchrun(*args, env_extra=None):
    # this checkout's package, not an installed one
    path = os.pathsep.join([str(HERE), str(HERE.parent)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def iou(a, b):
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union


@pytest.mark.parametrize(
    "method,ablation",
    [("continuous_sparsification_lepori", "zero"), ("hard_concrete", "zero"),
     ("continuous_sparsification_lepori", "patch")],
)  # fmt: skip
def test_two_processes_find_the_single_process_mask(method, ablation, tmp_path, monkeypatch):
    out = tmp_path / "mask"
    done = torchrun(
        str(HERE / "_distributed_task.py"), str(out), str(STEPS),
        env_extra={"SI_TEST_METHOD": method, "SI_TEST_ABLATION": ablation},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [si.Subnetwork.load(tmp_path / f"mask.rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0] == ranks[1]  # identical masks on all ranks
    sys.path.insert(0, str(HERE))
    import _distributed_task as task_module

    single = si.find(
        task_module.model(), method, task_module.loss, task_module.data(0, 1), steps=STEPS,
        progress=False, generator=torch.Generator().manual_seed(0),
        ablation=task_module.ablation(ablation),
    ).subnetwork  # fmt: skip
    # all-reduce sums in another order than one process: a gate at the threshold may flip
    assert iou(ranks[0], single) >= 0.99


def test_two_processes_train_a_mixture_of_experts_as_one(tmp_path):
    # each token's routing depends on the token alone: the shards route as the global batch does
    # (one rank's shard alone gives a mask of IoU 0.6 with this one). Data-parallel, then sharded
    # by FSDP2: the fused experts module runs on every rank, routed tokens or not.
    pytest.importorskip("transformers")
    out = tmp_path / "mask"
    done = torchrun(
        str(HERE / "_distributed_task.py"), str(out), "4", env_extra={"SI_TEST_MODEL": "moe"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [si.Subnetwork.load(tmp_path / f"mask.rank{r}.safetensors") for r in (0, 1)]
    sharded = [si.Subnetwork.load(tmp_path / f"mask.fsdp.rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0] == ranks[1] and sharded[0] == sharded[1]
    assert "blocks.0.mlp.experts.3.W_out" in ranks[0].names and 0 < ranks[0].density() < 1
    sys.path.insert(0, str(HERE))
    import _distributed_task as task_module

    single = si.find(
        task_module.moe(), "continuous_sparsification_lepori", task_module.moe_loss,
        task_module.moe_data(0, 1), steps=4, progress=False,
        generator=torch.Generator().manual_seed(0),
    ).subnetwork  # fmt: skip
    assert iou(ranks[0], single) >= 0.99 and iou(sharded[0], single) >= 0.99


@pytest.mark.parametrize("sharded", [False, True], ids=["data-parallel", "fsdp"])
def test_a_nan_on_one_rank_stops_every_rank_at_its_step(sharded, tmp_path):
    # the finiteness flag is all-reduced on the device and read at log points: every step
    # (as an immediate check) or every 10, after steps 4 to 9 were skipped on the device
    def stopped(log_every):
        out = tmp_path / f"every{log_every}"
        script = ["_fsdp_task.py", str(out), "mlp", "continuous_sparsification_lepori", "20"]
        if not sharded:
            script = ["_distributed_task.py", str(out), "20"]
        env = {"SI_TEST_NAN_AT": "1:3", "SI_TEST_LOG_EVERY": str(log_every)}
        done = torchrun(str(HERE / script[0]), *script[1:], env_extra=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert [pathlib.Path(f"{out}.rank{r}.stopped").read_text() for r in (0, 1)] == ["3", "3"]
        return [si.Subnetwork.load(f"{out}.rank{r}.safetensors") for r in (0, 1)]

    at_once, later = stopped(1), stopped(10)
    assert later[0] == later[1] == at_once[0] == at_once[1]
    assert later[0].density() > 0  # the updates were skipped: NaN parameters would keep none


def test_cli_find_under_torchrun_writes_once(tmp_path):
    config = {
        "model": "_distributed_task:model",
        "data": "_distributed_task:data",
        "loss": "_distributed_task:loss",
        "method": "continuous_sparsification_lepori",
        "steps": 20,
        "out": str(tmp_path / "found.safetensors"),
        "checkpoint": str(tmp_path / "run.ckpt"),
        "checkpoint_every": 5,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    done = torchrun("-m", "subnet_interp.cli", "find", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    found = si.Subnetwork.load(tmp_path / "found.safetensors")
    assert found.meta["method"] == "continuous_sparsification_lepori"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "found.safetensors", "run.ckpt"
    ]  # fmt: skip


def test_cli_find_shards_the_model_with_fsdp(tmp_path):
    config = {
        "model": "_distributed_task:wrapped_model",
        "data": "_distributed_task:data",
        "loss": "_distributed_task:loss",
        "method": "hard_concrete",
        "steps": 20,
        "shard": "*",  # `*` matches dots too: `body` is sharded, not also its layers inside
        "out": str(tmp_path / "found.safetensors"),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    done = torchrun("-m", "subnet_interp.cli", "find", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    assert "sharded 1 module(s) matching '*' (body) and the model over 2 processes" in done.stdout
    sys.path.insert(0, str(HERE))
    import _distributed_task as task_module

    single = si.find(
        task_module.wrapped_model(), "hard_concrete", task_module.loss, task_module.data(0, 1),
        steps=20, progress=False, generator=torch.Generator().manual_seed(0),
    ).subnetwork  # fmt: skip
    assert iou(si.Subnetwork.load(tmp_path / "found.safetensors"), single) >= 0.99


def test_cli_find_explains_a_bad_config(tmp_path, capsys):
    from subnet_interp.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "x:y", "steps": 3, "colour": "red"}))
    assert main(["find", str(path)]) == 2
    error = capsys.readouterr().err
    assert "missing keys ['data', 'loss', 'method', 'out']" in error
    assert "unknown keys ['colour']" in error


@pytest.mark.parametrize(
    "kind,method",
    [("mlp", "continuous_sparsification_lepori"), ("gpt2", "hard_concrete"),
     ("gpt2+checkpointing", "gumbel_sigmoid")],
)  # fmt: skip
def test_fsdp_two_processes_find_the_single_process_mask(kind, method, tmp_path):
    # FSDP2 on CPU with gloo (torch 2.13 supports it): weights and mask parameters sharded
    out = tmp_path / "mask"
    done = torchrun(str(HERE / "_fsdp_task.py"), str(out), kind, method, "40")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [si.Subnetwork.load(tmp_path / f"mask.rank{r}.safetensors") for r in (0, 1)]
    runs = [torch.load(tmp_path / f"mask.rank{r}.pt") for r in (0, 1)]
    assert ranks[0] == ranks[1]
    sys.path.insert(0, str(HERE))
    import _fsdp_task

    model, loss, batches, _, probe = _fsdp_task.build(kind)
    hparams = _fsdp_task.HPARAMS.get(method, {})
    single = si.find(
        model, si.methods.create(method, **hparams), loss, batches, steps=40, progress=False,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    # gradients are averaged in another summation order than one process: a gate exactly at
    # the threshold may flip, and the losses agree to float32 rounding
    assert iou(ranks[0], single.subnetwork) >= 0.99
    for key in ("loss", "penalty", "density"):
        torch.testing.assert_close(
            torch.tensor(runs[0]["history"][key]), torch.tensor(single.history[key]),
            rtol=1e-4, atol=1e-6,
        )  # fmt: skip
    with torch.no_grad(), si.masked(model, ranks[0]):
        expected = _fsdp_task.logits(model, probe)
    for run in runs:
        # si.masked on the sharded model computes what it computes on the unsharded one
        torch.testing.assert_close(run["masked_logits"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run["full_logits"], _fsdp_task.logits(model, probe))
        assert run["unchanged"] and run["grads"] == []
        assert run["recompute_masks"]  # the meta says how the sharded run sampled masks


FSDP_ERRORS = r"""
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor
import pytest
import subnet_interp as si
from subnet_interp.tasks import planted_mlp

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
task = planted_mlp()
model = task.model
fully_shard(model[0], mesh=mesh)
fully_shard(model, mesh=mesh)  # the root unit owns model[2]: FSDP keeps it gathered after forward
before = {n: p.full_tensor() for n, p in model.state_dict().items()}
hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
flags = [p.requires_grad for p in model.parameters()]
assert all(flags)
batches = task.batches(64)

def untouched():
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    model.reshard()  # FSDP keeps the root's gathered parameters after a forward
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all("weight" not in m.__dict__ for m in model.modules())
    after = {n: p.full_tensor() for n, p in model.state_dict().items()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    print("ok")

def refused(error, match, call):
    with pytest.raises(error, match=match):
        call()
    untouched()

find = lambda method="hard_concrete", **kw: si.find(
    model, method, task.loss_fn, batches, steps=2, progress=False, **kw)
refused(ValueError, r"FSDP2.*'continuous_sparsification' is not one", lambda: find("continuous_sparsification"))
refused(ValueError, r"FSDP2.*'magnitude' is not one", lambda: find(si.methods.create("magnitude", density=0.5)))
control = si.find(model, si.methods.create("random", density=0.3), task.loss_fn, batches,
                  progress=False).subnetwork  # reads no weight: works sharded, same on all ranks
unsharded = planted_mlp().model
assert control == si.find(unsharded, si.methods.create("random", density=0.3), task.loss_fn,
                          batches, progress=False).subnetwork
untouched()
refused(ValueError, "cannot move an FSDP2-sharded model", lambda: find(device="cpu"))
refused(ValueError, "mask_optimizer='adafactor'", lambda: find(mask_optimizer="adafactor"))
refused(ValueError, r"ablation=PatchAblation\(\) does not work on FSDP-sharded models",
        lambda: find(ablation=si.PatchAblation(lambda m, b: m(b[0]))))
found = si.find(model, "hard_concrete", task.loss_fn, batches, steps=2, progress=False).subnetwork
untouched()
def fails_after_forward(net, batch):  # FSDP keeps the root's parameters gathered then
    net(batch[0])
    raise ZeroDivisionError("in loss_fn")
refused(ZeroDivisionError, "in loss_fn", lambda: si.find(
    model, "hard_concrete", fails_after_forward, batches, steps=2, progress=False))
# analysis on the sharded model (every rank, its own data): as on the unsharded model
from subnet_interp.analysis import ablation_effect, loss as loss_metric
effect = ablation_effect(model, found, loss_metric(task.loss_fn), batches[:2], controls=3,
                         generator=torch.Generator().manual_seed(0))
reference = ablation_effect(unsharded, found, loss_metric(task.loss_fn), batches[:2], controls=3,
                            generator=torch.Generator().manual_seed(0))
assert abs(effect.kept - reference.kept) < 1e-5 and abs(effect.removed - reference.removed) < 1e-5
assert torch.allclose(effect.controls, reference.controls, atol=1e-5)
untouched()
refused(ValueError, "'mean' ablation does not work on FSDP-sharded",
        lambda: si.masked(model, found, ablation=si.MeanAblation(batches[:1])).__enter__())
with si.masked(model, found):  # an exception inside the forward leaves no shadow behind
    with pytest.raises(RuntimeError):
        model(torch.zeros(3, 99))
untouched()

class ReadsChildWeight(nn.Module):  # the parent reads lin.weight: lin's forward never runs
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.other = nn.Linear(4, 4)
    def forward(self, x):
        return self.other(x @ self.lin.weight.T)
odd = ReadsChildWeight()
fully_shard(odd, mesh=mesh)
masks = {n: torch.ones(4, 4, dtype=torch.bool) for n in ("lin.weight", "other.weight")}
with pytest.warns(UserWarning, match=r"\['lin.weight'\] were not read through their own"):
    with si.masked(odd, masks):
        odd(torch.randn(2, 4))
with pytest.raises(RuntimeError, match=r"\['lin.weight'\] were not read through their own module"):
    si.find(odd, "hard_concrete", lambda m, b: m(b).square().mean(), [torch.randn(8, 4)],
            steps=2, progress=False)
assert len(odd.lin._forward_pre_hooks) == 0 and "weight" not in odd.lin.__dict__
print("ok")

import transformers  # a mixture of experts stored as separate modules: they run on some ranks
moe = transformers.MixtralForCausalLM(transformers.MixtralConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1))
for layer in moe.model.layers:  # as transformers 4 stored them (fused experts are accepted)
    layer.mlp.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
    fully_shard(layer, mesh=mesh)
fully_shard(moe, mesh=mesh)
with pytest.raises(ValueError, match=r"^MixtralForCausalLM is a mixture-of-experts model"):
    si.find(moe, "hard_concrete", lambda m, b: m(b).logits.mean(), [torch.zeros(2, 4).long()],
            steps=1, progress=False)
print("ok")

class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight
twice = nn.Sequential(nn.Linear(4, 4))  # parametrized before sharding: `weight` is a property
torch.nn.utils.parametrize.register_parametrization(twice[0], "weight", Doubled())
fully_shard(twice, mesh=mesh)
with pytest.raises(ValueError, match="is a property"):
    si.masked(twice, {"0.weight": torch.ones(4, 4, dtype=torch.bool)}).__enter__()
assert len(twice[0]._forward_pre_hooks) == 0
print("ok")

replicated = nn.Linear(4, 4)  # tensor-parallel style placement: not FSDP2's layout
replicated.weight = nn.Parameter(distribute_tensor(replicated.weight.detach(), mesh, [Replicate()]))
with pytest.raises(ValueError, match="tensor parallelism and HSDP"):
    si.masked(replicated, {"weight": torch.ones(4, 4, dtype=torch.bool)}).__enter__()
print("ok")
dist.destroy_process_group()
"""


def test_fsdp_unsupported_uses_are_refused_clearly(tmp_path):
    # each refusal names the option and the fix, and leaves the sharded model as it was
    script = tmp_path / "fsdp_errors.py"
    script.write_text(FSDP_ERRORS)
    done = torchrun(str(script))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok") == 2 * 15


FSDP_RESUME = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import subnet_interp as si
from subnet_interp.tasks import planted_mlp

dist.init_process_group("gloo")
rank = dist.get_rank()
folder = sys.argv[1]

def sharded():
    task = planted_mlp(generator=torch.Generator().manual_seed(0))
    mesh = init_device_mesh("cpu", (2,))
    for layer in task.model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(task.model, mesh=mesh)
    data = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in task.batches(64)]
    return task, data

method = si.methods.create("hard_concrete", target_density=0.2)  # Lagrange multipliers too
def go(path=None, **kw):
    task, data = sharded()
    return si.find(task.model, method, task.loss_fn, data, steps=30, progress=False,
                   generator=torch.Generator().manual_seed(0), checkpoint=path, **kw)

whole = go()
class Stop(Exception):
    pass
def stop(step, record):
    if step == 10:  # the callbacks see logged steps; the last checkpoint is after step 9
        raise Stop
path = os.path.join(folder, "run.ckpt")
try:
    go(path, checkpoint_every=5, callbacks=[stop])
except Stop:
    pass
assert sorted(os.listdir(folder)) == ["run.ckpt.rank0-of-2", "run.ckpt.rank1-of-2"]
seen = []
resumed = go(path, checkpoint_every=5, callbacks=[lambda step, record: seen.append(step)])
assert seen == [10, 20, 29], seen  # it resumed after step 9
assert resumed.subnetwork == whole.subnetwork
assert resumed.history == whole.history, (resumed.history, whole.history)
print("same")
if rank == 0:  # each rank's shard holds a strict part of the mask parameters and Adam moments
    from safetensors import safe_open
    total = sum(t.numel for t in si.targets(planted_mlp().model).values())
    for prefix, suffix in (("params/", ""), ("optimizer/", "/exp_avg_sq")):
        sizes = []
        for r in range(2):
            with safe_open(path + f".rank{r}-of-2", framework="pt") as handle:
                sizes.append(sum(handle.get_tensor(k).numel() for k in handle.keys()
                                 if k.startswith(prefix) and k.endswith(suffix)))
        assert 0 < min(sizes) and max(sizes) < total and sum(sizes) == total, (prefix, sizes)
    print("sharded state")
task = planted_mlp(generator=torch.Generator().manual_seed(0))  # not sharded: another layout
try:
    si.find(task.model, method, task.loss_fn, task.batches(64), steps=30, progress=False,
            checkpoint=path)
except ValueError as error:
    assert "was written in another layout than this run's (one file)" in str(error), error
    print("layout refused")
import subnet_interp._train as training
def disk_full(*args):
    raise OSError("No space left on device")
saving = training._save
if rank == 1:
    training._save = disk_full
try:
    go(os.path.join(folder, "other.ckpt"), checkpoint_every=5)
except (OSError, RuntimeError) as error:
    expected = "No space left" if rank == 1 else "Process 1 failed while saving the checkpoint"
    assert expected in str(error), error
    print("stopped together")
training._save = saving
plain = planted_mlp(generator=torch.Generator().manual_seed(0))  # DDP, unsharded
shard = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in plain.batches(64)]
shared = os.path.join(folder, "ddp", "r0", "run.ckpt")
si.find(plain.model, method, plain.loss_fn, shard, steps=5, progress=False, checkpoint=shared)
try:  # as if rank 1 were on another machine, without the file rank 0 wrote
    si.find(plain.model, method, plain.loss_fn, shard, steps=5, progress=False,
            checkpoint=os.path.join(folder, "ddp", f"r{rank}", "run.ckpt"))
except ValueError as error:
    assert "exists for 1 of the 2 processes" in str(error), error
    print("unshared refused")
if rank == 1:
    os.remove(path + ".rank1-of-2")
try:
    go(path, checkpoint_every=5)
except ValueError as error:
    assert "Only 1 of the 2 shards of the checkpoint" in str(error), error
    print("refused")
dist.destroy_process_group()
"""


def test_fsdp_checkpoints_resume_exactly(tmp_path):
    # every rank writes its own shard of the mask state; an interrupted sharded run, resumed,
    # ends exactly where the uninterrupted one does
    script = tmp_path / "fsdp_resume.py"
    script.write_text(FSDP_RESUME)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    done = torchrun(str(script), str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("same", "layout refused", "stopped together", "unshared refused"):
        assert done.stdout.count(line) == 2, (line, done.stdout)
    assert done.stdout.count("sharded state") == 1
    assert done.stdout.count("refused") == 6
