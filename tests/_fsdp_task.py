"""The FSDP2 runs of tests/test_distributed.py, importable by the processes torchrun starts.

``python -m torch.distributed.run --nproc_per_node=2 _fsdp_task.py OUT MODEL METHOD STEPS``
shards MODEL (``mlp``: the planted MLP, every Linear and the root; ``gpt2``: a tiny GPT-2,
every block and the root; ``gpt2+checkpointing``: the same with activation checkpointing of
the blocks) with ``fully_shard`` over a 1-D gloo mesh, runs si.find on this
rank's shard of each global batch, and saves the mask of each rank, the masked model's logits
on a fixed batch, and whether the weights came back unchanged. With ``SI_TEST_NAN_AT`` set
(see ``_distributed_task.nan_on``) it saves the mask a NaN loss stopped the run at instead.
"""

from __future__ import annotations

import os
import sys

import torch

from subnet_interp.tasks import induction_loss, planted_mlp, repeated_tokens, tiny_gpt2

HPARAMS = {
    # one mask sample per batch (Gumbel's default is 4): then the samples see the same examples
    # as in one process over the global batch
    "gumbel_sigmoid": {"mask_samples": 1},
    # the Lagrangian: multipliers that meet the sharded mask parameters in the penalty
    "hard_concrete": {"target_density": 0.5},
}


def build(kind: str):
    """(model, loss, global batches, blocks to shard, probe input)"""
    if kind == "mlp":
        task = planted_mlp(generator=torch.Generator().manual_seed(0))
        batches = list(task.batches(64))
        blocks = [m for m in task.model if isinstance(m, torch.nn.Linear)]
        return task.model, task.loss_fn, batches, blocks, batches[0][0]
    assert kind in ("gpt2", "gpt2+checkpointing"), kind
    model = tiny_gpt2(seed=0)
    batches = list(repeated_tokens(8, 16, generator=torch.Generator().manual_seed(1)))
    return model, induction_loss, batches, list(model.transformer.h), batches[0]


def shard_of(batch, rank: int, world: int):
    if isinstance(batch, torch.Tensor):
        return batch.chunk(world)[rank]
    return type(batch)(shard_of(b, rank, world) for b in batch)


def logits(model, probe):
    out = model(probe)
    return getattr(out, "logits", out).detach()


def main(out: str, kind: str, method: str, steps: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import subnet_interp as si

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, loss, batches, blocks, probe = build(kind)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (world,))
    if kind.endswith("+checkpointing"):
        # activation checkpointing of the blocks, as large FSDP runs use it: the blocks' forward
        # (mask gathering and sampling included) runs again in backward
        from torch.distributed._composable import checkpoint

        for block in blocks:
            checkpoint(block)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    hparams = HPARAMS.get(method, {})
    if os.environ.get("SI_TEST_NAN_AT"):  # the parameters are DTensors: the skip works locally
        from _distributed_task import LOG_EVERY, find_or_stop, nan_on

        found = find_or_stop(out, rank, lambda: si.find(
            model, si.methods.create(method, **hparams), nan_on(loss, rank),
            [shard_of(b, rank, world) for b in batches], steps=steps, progress=False,
            generator=torch.Generator().manual_seed(0), log_every=LOG_EVERY,
        ))  # fmt: skip
        found.save(f"{out}.rank{rank}.safetensors")
        dist.destroy_process_group()
        return
    result = si.find(
        model, si.methods.create(method, **hparams), loss, [shard_of(b, rank, world) for b in batches], steps=steps,
        progress=False, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    result.subnetwork.save(f"{out}.rank{rank}.safetensors")
    with torch.no_grad(), si.masked(model, result.subnetwork):
        masked_logits = logits(model, probe)
    full_logits = logits(model, probe)
    after = {n: p.full_tensor() for n, p in model.state_dict().items()}
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    torch.save(
        {
            "masked_logits": masked_logits,
            "full_logits": full_logits,
            "unchanged": unchanged,
            "history": result.history,
            "grads": [n for n, p in model.named_parameters() if p.grad is not None],
            "recompute_masks": result.subnetwork.meta["recompute_masks"],
        },
        f"{out}.rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
