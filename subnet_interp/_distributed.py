"""Rank, averaging and sharding helpers: data parallelism under torch.distributed and FSDP2.

Everything here is a no-op (or returns its input) outside an initialised process group of two or
more processes, so the training loops call it unconditionally. ``torch.distributed`` is imported
only inside the functions that need it: some builds of torch lack it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._types import model_class

World = tuple[int, int]  # (rank, world size)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (checked without importing
    torch.distributed where it is unavailable)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def fsdp_mesh(model: object, root: nn.Module):
    """The device mesh of a model sharded with FSDP2's ``fully_shard``; ``None`` if no parameter
    of ``root`` is a DTensor.

    Every FSDP module is resharded first (``FSDPModule.reshard``), so the parameters are the
    sharded DTensors FSDP manages (after a forward without backward, FSDP keeps the root's
    parameters gathered). Only FSDP2's layout is accepted: every DTensor parameter on one 1-D
    mesh, sharded on dim 0. Tensor parallelism, HSDP and mixture-of-experts models whose
    experts are separate modules (each run only where tokens were routed to it) get a clear
    error; experts fused in one module (transformers 5) are accepted.
    """
    name_of_model = model_class(model).__qualname__
    fsdp_modules = reshard(root)
    sharded = [(name, p) for name, p in root.named_parameters() if is_dtensor(p)]
    if not sharded:
        return None
    from torch.distributed.tensor import Shard

    name, first = sharded[0]
    mesh = first.device_mesh
    for name, param in sharded:
        if param.device_mesh != mesh or mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"{name_of_model}'s parameter {name!r} is a DTensor on {param.device_mesh} with "
                f"placements {param.placements}. subnet_interp supports models sharded by "
                "FSDP2's fully_shard on one 1-D mesh (every parameter Shard(0)); tensor "
                "parallelism and HSDP (2-D meshes) are not supported. Shard the model with "
                "`fully_shard(block, mesh=init_device_mesh(device, (world_size,)))`."
            )
    import torch.distributed as dist

    if mesh.size() != dist.get_world_size():
        raise ValueError(
            f"{name_of_model} is sharded over {mesh.size()} of the {dist.get_world_size()} "
            "processes of the default group; subnet_interp averages mask gradients over the "
            "whole group, so shard over all of them (one mesh of world_size devices), or run "
            "one process group per model."
        )
    experts = _expert_counts(getattr(root, "config", None))
    if experts and not _fused_experts(root):
        raise ValueError(
            f"{name_of_model} is a mixture-of-experts model ({experts}) sharded with FSDP2 "
            "whose experts are separate modules (or not in a module named `experts`). "
            "subnet_interp gathers a sharded mask while its module runs, and such experts run "
            "on some ranks and not others, so the ranks' collectives would not match. Run it "
            "unsharded (data-parallel under torchrun), or store the experts fused as "
            "transformers 5 does (one `experts` module with [expert, ...] tensors, which runs "
            "on every rank)."
        )
    if not fsdp_modules:
        raise ValueError(
            f"{name_of_model}'s parameter {name!r} is a sharded DTensor, but no module of the "
            "model is an FSDP module: the weights are never gathered for the forward pass. "
            "Shard the model with FSDP2's fully_shard (or pass the unsharded model)."
        )
    return mesh


def reshard(root: nn.Module) -> list[nn.Module]:
    """Reshard every FSDP2 module under ``root`` (FSDP keeps the root's parameters gathered
    after a forward without backward), so its parameters are the sharded ones; returns them."""
    if "torch.distributed.fsdp" not in sys.modules:  # never imported: nothing is FSDP-sharded
        return []
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.reshard()
    return modules


_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _expert_counts(config: object, depth: int = 0) -> dict[str, int]:
    """Expert counts above 1 in a transformers config or its sub-configs (``text_config`` of
    multimodal models, ``ffn_config`` of DBRX, ...)."""
    if config is None or depth > 2:
        return {}
    found = {
        key: value
        for key in _EXPERT_KEYS
        if isinstance(value := getattr(config, key, None), int) and value > 1
    }
    for key, value in vars(config).items() if hasattr(config, "__dict__") else ():
        if hasattr(value, "to_dict") and hasattr(value, "__dict__"):  # a nested config
            found.update({f"{key}.{k}": v for k, v in _expert_counts(value, depth + 1).items()})
    return found


def _fused_experts(root: nn.Module) -> bool:
    """Whether every module named ``experts`` under ``root`` holds its experts fused in 3-D
    ``[expert, ...]`` tensors (transformers 5's layout): such a module runs on every rank,
    whether or not a rank routed tokens to each expert, so its masks gather on every rank."""
    found = [m for name, m in root.named_modules() if name.rsplit(".", 1)[-1] == "experts"]
    return bool(found) and all(
        not isinstance(m, nn.ModuleList) and any(p.dim() == 3 for p in m.parameters(recurse=False))
        for m in found
    )


def world() -> World | None:
    """``(rank, world_size)`` inside an initialised ``torch.distributed`` group of 2 or more."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def together(world: World | None, device: torch.device, what: str, action, *args):
    """Run ``action`` on this rank; under torch.distributed every rank then learns whether all
    succeeded, so one rank's failure (a full disk, an unreadable file) stops every rank instead
    of leaving the others waiting in the next collective."""
    if world is None:
        return action(*args)
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    try:
        result = action(*args)
    except Exception as caught:  # re-raised below, after the others know
        error = caught
    rank, size = world
    failed = torch.tensor([rank if error is not None else size], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)  # the first rank that failed, if any
    if error is not None:
        raise error
    if int(failed.item()) < size:
        raise RuntimeError(f"Process {int(failed.item())} failed while {what}; its error says why.")
    return result


def nothing(*args) -> None:
    """The action of ranks that take no part in a :func:`together` step (e.g. non-writers)."""
    return None


def global_batch_size(size: int, world: World | None, device: torch.device) -> int:
    """Examples in the step's global batch: the sum of the ranks' shards (per-example
    regularisers scale by it, as in one process over the global batch)."""
    if world is None:
        return size
    import torch.distributed as dist

    total = torch.tensor([size], dtype=torch.int64, device=device)  # nccl: on the GPU
    dist.all_reduce(total)
    return int(total.item())


def finite_everywhere(loss: Tensor, world: World | None) -> Tensor:
    """Whether the loss is finite on every rank, as a 0-dim bool on its device (no host sync;
    all ranks stop together, or none does)."""
    finite = torch.isfinite(loss)
    if world is None:
        return finite
    import torch.distributed as dist

    flag = finite.to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.reshape(()).bool()


def average_gradients(tensors: Sequence[Tensor], world_size: int) -> None:
    """Data parallelism as DDP does it: every rank's gradients replaced by their mean, in one
    all-reduce over a flat buffer per dtype. Each rank's loss is the mean over its own shard, so
    with equal shards this is the gradient of the mean over the global batch."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for tensor in tensors:
        if tensor.grad is None:
            tensor.grad = torch.zeros_like(tensor)
        by_dtype.setdefault(tensor.grad.dtype, []).append(tensor.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def average(value: Tensor, world: World | None) -> Tensor:
    """The mean of ``value`` over the ranks (``value`` itself outside torch.distributed)."""
    if world is None:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / world[1]


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a sharded tensor (shares its memory); a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard(tensor: Tensor, mesh) -> Tensor:
    """``tensor`` (the same on every rank) as a DTensor whose local part is this rank's slice of
    its largest dim (the same layout FSDP2 gives weights); a 0-dim tensor is replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if tensor.dim() == 0:
        placement = Replicate()
    else:
        placement = Shard(max(range(tensor.dim()), key=lambda d: tensor.shape[d]))
    # src_data_rank=None: every rank slices its own copy, no communication
    return distribute_tensor(tensor.detach(), mesh, [placement], src_data_rank=None)


def gathered(params: Tensor) -> Tensor:
    """The whole parameter tensor as a plain tensor; for a sharded one an all-gather whose
    backward averages the ranks' gradients into each rank's shard (a reduce-scatter), which is
    data-parallel training's gradient of the mean loss over the global batch."""
    if not is_dtensor(params):
        return params
    from torch.distributed.tensor import Partial, Replicate

    whole = params.redistribute(params.device_mesh, [Replicate()])
    return whole.to_local(grad_placements=[Partial("avg")])


def full(value: Tensor) -> Tensor:
    """A DTensor gathered into a plain tensor (bool via uint8: gloo has no bool collectives)."""
    if not is_dtensor(value):
        return value
    if value.dtype == torch.bool:
        return value.to(torch.uint8).full_tensor().bool()
    return value.full_tensor()


def replicating(mesh):
    """Regularisers of sharded parameters may combine them with plain tensors (a Lagrange
    multiplier, a constant): those count as replicated on every rank."""
    if mesh is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def plain_grads(values) -> None:
    """Plain tensors (e.g. Lagrange multipliers) that met sharded parameters in the regulariser
    got DTensor gradients; their optimisers need plain ones (the same on every rank)."""
    for value in values:
        if isinstance(value, Tensor) and not is_dtensor(value) and is_dtensor(value.grad):
            value.grad = full(value.grad)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` from a shard's checkpoint: the state of sharded parameters
    back as DTensors laid out like them (the checkpoint holds their local parts)."""
    for param, entry in optimizer.state.items():
        if not is_dtensor(param):
            continue
        from torch.distributed.tensor import DTensor

        local_part = param.to_local()
        for key, value in entry.items():
            if key == "step":  # a plain scalar even for sharded parameters
                continue
            if (
                isinstance(value, Tensor)
                and not is_dtensor(value)
                and value.shape == local_part.shape
            ):
                entry[key] = DTensor.from_local(
                    value.to(local_part.device), param.device_mesh, param.placements,
                    run_check=False, shape=param.shape, stride=param.stride(),
                )  # fmt: skip


def check_sharded_reads(reads: Mapping[str, int], world: World | None, device) -> None:
    """Refuse targets whose sharded weight was never read through its module's forward
    (``reads``: target name -> reads during one loss, from ``Attachment.shadow_reads``)."""
    reads = dict(reads)
    if world is not None:  # every rank decides alike
        import torch.distributed as dist

        counts = torch.tensor(list(reads.values()), dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        reads = dict(zip(reads, counts.tolist(), strict=True))
    unread = [name for name, count in reads.items() if count == 0]
    if unread:
        raise RuntimeError(
            f"The FSDP-sharded weights of {unread[:6]}{' ...' if len(unread) > 6 else ''} were "
            "not read through their own module's forward during the loss, so their masks "
            "could not apply (subnet_interp masks a sharded weight while its module's forward "
            "runs). Exclude these targets, or check that loss_fn calls the model's forward."
        )


__all__ = [
    "World",
    "average",
    "average_gradients",
    "check_sharded_reads",
    "finite_everywhere",
    "fsdp_mesh",
    "full",
    "gathered",
    "global_batch_size",
    "is_dtensor",
    "local",
    "nothing",
    "plain_grads",
    "replicating",
    "reshard",
    "shard",
    "shard_optimizer_state",
    "together",
    "world",
]
