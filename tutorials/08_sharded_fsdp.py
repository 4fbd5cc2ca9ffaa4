# %% [markdown]
# # Masks for a model sharded with FSDP2
#
# When a model's weights and mask state do not fit one device, shard the model with FSDP2
# (`torch.distributed.fsdp.fully_shard`) and call `si.find` in every process, each with its
# own shard of the data. The mask parameters are sharded like the weights: each process holds
# and optimises a slice, a layer's whole mask is gathered only while that layer computes, and
# the gradients are averaged back onto the slices. The result is the mask one process finds
# over the same global batches.
#
# This tutorial runs two CPU processes (gloo) on a small GPT-2 trained for induction, so that
# it runs anywhere; on GPUs the same code runs under `torchrun` with NCCL (see the README).
# Processes are started with `torch.multiprocessing.spawn`, which re-imports this file in each
# child, hence the `if __name__ == "__main__":` guard at the bottom.

# %%
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import subnet_interp as si
from subnet_interp.tasks import (
    induction_accuracy,
    induction_loss,
    next_token_loss,
    repeated_tokens,
    tiny_gpt2,
    train,
)

FAST = os.environ.get("SUBNET_INTERP_FAST") == "1"
TRAIN_STEPS, MASK_STEPS = (200, 60) if FAST else (1500, 600)
WORLD = 2
# hard-concrete gates with Edge Pruning's Lagrangian: the mask is driven to a target density
METHOD = si.methods.create("hard_concrete", target_density=0.3, lr=0.1)


def mask_batches():
    return repeated_tokens(32, 16, generator=torch.Generator().manual_seed(2))


def held_out():
    return repeated_tokens(4, 64, generator=torch.Generator().manual_seed(1))


# %% [markdown]
# ## What every process runs
#
# Build the model, shard it (each transformer block is one FSDP unit, then the whole model),
# find the mask on this process's half of every batch, and evaluate the masked model on this
# process's half of the held-out data. `si.masked` works on the sharded model too: every
# process enters it and runs the forward pass, as with any FSDP forward.


# %%
def worker(rank: int, port: int, weights: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = tiny_gpt2()
    model.load_state_dict(torch.load(weights))
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = model.transformer.h[0].attn.c_attn.weight.to_local()
    if rank == 0:
        print(
            f"process 0 holds {tuple(local.shape)} of c_attn's {tuple(model.transformer.h[0].attn.c_attn.weight.shape)}"
        )

    mine = [batch.chunk(WORLD)[rank] for batch in mask_batches()]
    found = si.find(model, METHOD, induction_loss, mine, steps=MASK_STEPS, progress=False)

    with torch.no_grad(), si.masked(model, found.subnetwork):
        accuracy = torch.stack(
            [induction_accuracy(model, b.chunk(WORLD)[rank]) for b in held_out()]
        )
    total = accuracy.mean().reshape(1)
    dist.all_reduce(total)
    if rank == 0:
        found.subnetwork.save(out)
        print(
            f"sharded run: density {found.subnetwork.density():.3f}, held-out accuracy of the masked model {float(total) / WORLD:.3f}"
        )
    dist.destroy_process_group()


# %% [markdown]
# ## Train the model, start the processes, compare with one process


# %%
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    torch.manual_seed(0)
    model = tiny_gpt2()
    data = repeated_tokens(TRAIN_STEPS, 32, generator=torch.Generator().manual_seed(0))
    train(model, next_token_loss, data, steps=TRAIN_STEPS, lr=1e-3)
    with torch.no_grad():
        full = float(torch.stack([induction_accuracy(model, b) for b in held_out()]).mean())
    print(f"trained {TRAIN_STEPS} steps: held-out accuracy on repeated tokens {full:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, "model.pt")
        out = os.path.join(folder, "sharded.safetensors")
        torch.save(model.state_dict(), weights)
        mp.spawn(worker, args=(free_port(), weights, out), nprocs=WORLD, join=True)
        sharded = si.Subnetwork.load(out)

    # the same method, seed and global batches in one process
    single = si.find(
        model, METHOD, induction_loss, mask_batches(), steps=MASK_STEPS, progress=False
    )
    inter = (sharded & single.subnetwork).kept()
    union = (sharded | single.subnetwork).kept()
    print(
        f"one process:  density {single.subnetwork.density():.3f}; IoU with the sharded run's mask {inter / union:.4f}"
    )
    assert inter / union > 0.99, "the sharded run should find the single-process mask"


if __name__ == "__main__":
    main()
