"""The task of tests/test_distributed.py, importable by the processes torchrun starts."""

from __future__ import annotations

import os
import sys

import torch

import subnet_interp as si
from subnet_interp.tasks import planted_mlp

METHOD = os.environ.get("SI_TEST_METHOD", "continuous_sparsification_lepori")
ABLATION = os.environ.get("SI_TEST_ABLATION", "zero")
MODEL = os.environ.get("SI_TEST_MODEL", "mlp")  # or "moe": a tiny Mixtral


def task():
    return planted_mlp(generator=torch.Generator().manual_seed(0))


def model():
    return task().model


def wrapped_model():
    """The planted MLP inside a container: module paths ``body``, ``body.0``, ``body.2``."""
    from collections import OrderedDict

    return torch.nn.Sequential(OrderedDict(body=model()))


def data(rank: int, world_size: int):
    """Each global batch of 64 split into ``world_size`` equal shards; this rank's shard, each
    input with its counterfactual twin (the global batch rolled by one example)."""
    return [
        (x.chunk(world_size)[rank], y.chunk(world_size)[rank],
         x.roll(1, 0).chunk(world_size)[rank])
        for x, y in task().batches(64)
    ]  # fmt: skip


def loss(net, batch):
    return task_loss(net, batch[:2])


def moe():
    """A tiny Mixtral: 1 block, 4 experts, 2 per token, random weights."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=8, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=20,
        max_position_embeddings=16,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).eval()


def fsdp_moe(world_size: int):
    """:func:`moe` sharded with FSDP2's ``fully_shard`` (each block, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = moe()
    mesh = init_device_mesh("cpu", (world_size,))
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded


def moe_data(rank: int, world_size: int):
    """Global batches of 8 random sequences of 8 tokens; this rank's equal shard of each."""
    tokens = torch.randint(0, 20, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    return [batch.chunk(world_size)[rank] for batch in tokens]


def moe_loss(net, batch):
    """Next-token cross-entropy."""
    logits = net(batch).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def ablation(kind: str):
    """``"zero"``, or patching with each input's twin."""
    return si.PatchAblation(lambda net, batch: net(batch[2])) if kind == "patch" else "zero"


_TASK = task()
task_loss = _TASK.loss_fn
NAN_AT = os.environ.get("SI_TEST_NAN_AT")  # "rank:step": that rank's loss is NaN at that step
LOG_EVERY = int(os.environ.get("SI_TEST_LOG_EVERY", "10"))  # the host reads the flag then


def nan_on(loss_fn, rank: int):
    """``loss_fn``, NaN on rank ``NAN_AT`` at its step (one call per step: one mask sample)."""
    if NAN_AT is None:
        return loss_fn
    bad_rank, bad_step = map(int, NAN_AT.split(":"))
    calls = []

    def loss(net, batch):
        calls.append(1)
        value = loss_fn(net, batch)
        return value * float("nan") if rank == bad_rank and len(calls) - 1 == bad_step else value

    return loss


def find_or_stop(out: str, rank: int, find):
    """``find()``'s subnetwork; at a non-finite loss, the error's, and its step in a file."""
    try:
        return find().subnetwork
    except si.NonFiniteLossError as error:
        with open(f"{out}.rank{rank}.stopped", "w") as file:
            file.write(str(error.step))
        return error.subnetwork


def main(out: str, steps: int) -> None:
    """Run si.find on this rank's shard and save this rank's mask (to compare ranks)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    build, loss_fn, shards = (moe, moe_loss, moe_data) if MODEL == "moe" else (model, loss, data)
    found = find_or_stop(out, rank, lambda: si.find(
        build(), METHOD, nan_on(loss_fn, rank), shards(rank, world), steps=steps, progress=False,
        generator=torch.Generator().manual_seed(0), ablation=ablation(ABLATION),
        log_every=LOG_EVERY,
    ))  # fmt: skip
    found.save(f"{out}.rank{rank}.safetensors")
    if MODEL == "moe" and world > 1:  # the same again with the model sharded by FSDP2
        sharded = fsdp_moe(world)
        found = si.find(
            sharded, METHOD, moe_loss, shards(rank, world), steps=steps, progress=False,
            generator=torch.Generator().manual_seed(0),
        ).subnetwork  # fmt: skip
        found.save(f"{out}.fsdp.rank{rank}.safetensors")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
