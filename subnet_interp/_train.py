"""The shared training loop of every learnable-mask method.

Weights stay frozen (no gradients, no optimizer state); only the methods' mask parameters
train. Masks reach the model through the same parametrization ``si.masked`` uses, so the
loop works for every model family an adapter handles.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _checkpoint
from ._attach import ZERO, Attachment
from ._fingerprint import canonical_copy, read_canonical
from ._subnetwork import Subnetwork
from ._types import Target
from .adapters import is_dtensor
from .methods._base import FindContext, FindResult, Method


@dataclass
class TrainState:
    """Mutable per-run state of a learnable-mask method (schedules read and write it)."""

    step: int
    total_steps: int
    round: int = 0
    rounds: int = 1
    round_step: int = 0
    steps_per_round: int = 0
    temperature: float = 1.0
    # examples in the current batch (before splitting among mask samples); under
    # torch.distributed, in the global batch if the method's reads_batch_size() says it reads it
    batch_size: int = 1
    aux: dict[str, Any] = field(default_factory=dict)


class MaskMethod(Method):
    """A method that learns a mask by gradient descent on per-gate parameters.

    Subclasses (frozen dataclasses) implement the gate maths; :func:`train_masks` runs them.
    The ``granularity`` field of every subclass chooses one gate per weight (``"weight"``),
    per unit (``"neuron"``) or per attention head (``"head"``).
    """

    granularity: str

    def rounds(self) -> int:
        return 1

    def samples_per_batch(self) -> int:
        """Independent mask samples per batch; the batch is split evenly among them."""
        return 1

    def reads_batch_size(self) -> bool:
        """Whether the method reads ``TrainState.batch_size`` (under torch.distributed it is
        then summed over the ranks every step, one small all-reduce)."""
        return False

    @abc.abstractmethod
    def init_parameters(
        self,
        target: Target,
        gate_shape: tuple[int, ...],
        weight: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """Initial mask parameters for one target (a float tensor of ``gate_shape``)."""

    @abc.abstractmethod
    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        """The (soft, differentiable) gate values used for one forward pass."""

    @abc.abstractmethod
    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        """The sparsity regulariser; ``weights[i]`` is how many weights gate tensor i covers each."""

    @abc.abstractmethod
    def final_mask(self, params: Tensor) -> Tensor:
        """The binary mask (bool, gate shape) the parameters stand for."""

    @abc.abstractmethod
    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        """The optimiser of the mask parameters (the paper's)."""

    def weight_optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer | None:
        """For methods that train weights jointly with the mask (``trains_weights``)."""
        return None

    def rewind_step(self, steps_per_round: int) -> int | None:
        """Step (of the first round) whose weights the ticket keeps; ``None``: no rewinding."""
        return None

    def on_step(self, state: TrainState) -> None:
        """Update schedules (temperature, ...) before step ``state.step``."""

    def after_step(self, state: TrainState) -> None:
        """After the mask optimiser's step (e.g. a dual ascent step)."""

    def on_round_end(self, params: Sequence[Tensor], state: TrainState) -> None:
        """Between rounds (methods with ``rounds() > 1``): e.g. reset parameters."""

    def grad_clip(self) -> float | None:
        return None

    def run(self, context: FindContext) -> FindResult:
        return train_masks(self, context)


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split a batch (tensor, tuple/list, or mapping of them) into ``parts`` along dim 0."""
    if parts == 1:
        return [batch]
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] < parts:
            raise ValueError(
                f"Cannot split a batch of {tuple(batch.shape)} into {parts} mask samples: the "
                f"batch needs at least {parts} examples. Use bigger batches or fewer mask "
                "samples (e.g. mask_samples=1)."
            )
        return list(torch.tensor_split(batch, parts, dim=0))
    if isinstance(batch, Mapping):
        pieces = {k: split_batch(v, parts) for k, v in batch.items()}
        return [_same_mapping(batch, {k: pieces[k][i] for k in batch}) for i in range(parts)]
    if isinstance(batch, (tuple, list)):
        pieces = [split_batch(v, parts) for v in batch]
        return [type(batch)(p[i] for p in pieces) for i in range(parts)]
    return [batch] * parts  # non-tensor leaves (ints, strings) go to every part


def batch_size(batch: Any) -> int:
    """The leading dimension of the first tensor in a (nested) batch; 1 if there is none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (tuple, list))
        else ()
    )
    for item in items:
        size = batch_size(item)
        if isinstance(item, (Tensor, Mapping, tuple, list)) and size:
            return size
    return 1


def _same_mapping(original: Mapping, items: dict) -> Mapping:
    try:
        return type(original)(items)  # dict subclasses such as transformers' BatchEncoding
    except TypeError:
        return items


def _track(values: Sequence[Tensor]) -> Tensor:
    return torch.stack([v.detach().float() for v in values])


def train_masks(method: MaskMethod, context: FindContext) -> FindResult:
    """Run a learnable-mask method; returns the final binary subnetwork and its history."""
    targets = context.targets
    device = context.device
    generator = context.generator
    gate_shapes = {n: t.gate_shape(method.granularity) for n, t in targets.items()}
    mesh = context.mesh  # FSDP2: mask parameters are sharded like the weights
    params: dict[str, Tensor] = {}
    for name, target in targets.items():
        weight = read_canonical(context.root, target).detach()
        init = method.init_parameters(target, gate_shapes[name], weight, generator)
        init = init.to(device=device, dtype=context.mask_dtype)
        del weight
        params[name] = (init if mesh is None else _shard(init, mesh)).requires_grad_(True)
    names = list(params)
    param_list = [params[n] for n in names]
    per_gate = [targets[n].numel // max(1, math.prod(gate_shapes[n])) for n in names]
    total_weights = sum(targets[n].numel for n in names)
    samples = method.samples_per_batch()

    rounds = method.rounds()
    steps_per_round = max(1, context.steps // rounds)
    state = TrainState(
        step=0,
        total_steps=context.steps,
        rounds=rounds,
        steps_per_round=steps_per_round,
    )
    history: dict[str, list[Tensor]] = {
        "step": [],
        "loss": [],
        "penalty": [],
        "density": [],
        "temperature": [],
    }
    weight_params = [p for p in context.root.parameters() if p.requires_grad]
    if method.trains_weights and not weight_params:
        raise ValueError(
            f"{method.name} trains weights jointly with the mask, but no parameter of the model "
            "requires grad."
        )
    weight_optimizer = method.weight_optimizer(weight_params) if method.trains_weights else None
    rewind_at = method.rewind_step(steps_per_round) if method.trains_weights else None
    rewound: dict[str, Tensor] | None = None
    optimizer = _mask_optimizer(method, param_list, context)
    # per-step, per-target seeds: a mask is re-sampled identically when its weight is read again
    # (e.g. recomputed in backward), and drawing them on the CPU costs no device sync
    seed_source = torch.Generator().manual_seed(
        int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    )
    clip = method.grad_clip()
    extras = list(context.extra_parameters)
    extra_optimizer = torch.optim.Adam(extras, lr=context.extra_lr) if extras else None
    checkpoint_path = Path(context.checkpoint) if context.checkpoint is not None else None
    identity = dict(context.extras.get("run_identity", {}))
    # everything that can fail before training is above: from here on the model is modified
    # and the `finally` below restores it
    attachment = Attachment(
        context.root, targets, ZERO, adapter=context.adapter, model=context.model
    )
    world = _world()
    rank = 0 if world is None else world[0]
    bar = tqdm(
        total=context.steps,
        disable=not context.progress or rank != 0,
        desc=method.name,
        leave=False,
    )
    synced = param_list + extras + (weight_params if weight_optimizer is not None else [])
    synced = [p for p in synced if not is_dtensor(p)]  # sharded ones are averaged in backward
    processes = 1 if world is None else world[1]
    base_path = checkpoint_path
    if mesh is not None and checkpoint_path is not None:
        # sharded mask state: every rank writes its own shard, ``<checkpoint>.rank<r>-of-<n>``
        checkpoint_path = _shard_file(checkpoint_path, rank, processes)
        identity = {**identity, "shard": [rank, processes]}
    check_reads = mesh is not None
    start = 0
    run = {
        "params": params,
        "optimizer": optimizer,
        "weight_optimizer": weight_optimizer,
        "extras": extras,
        "extra_optimizer": extra_optimizer,
        "seed_source": seed_source,
        "state": state,
        "history": history,
        "root": context.root,
    }
    try:
        if checkpoint_path is not None and _resuming(
            base_path, checkpoint_path, mesh, processes, world, device
        ):
            start, rewound = _together(world, device, "restoring the checkpoint",
                                       _restore, checkpoint_path, identity, run, method,
                                       context)  # fmt: skip
            if mesh is not None and world is not None:
                _check_same_step(start, base_path, world, device)
            optimizer = run["optimizer"]
            for _ in range(start):  # the data position: one batch per step
                next(context.batches)
            bar.update(start)
        for step in range(start, context.steps):
            round_index = min(step // steps_per_round, rounds - 1)
            if round_index != state.round:
                method.on_round_end(param_list, state)
                optimizer = _mask_optimizer(method, param_list, context)
            state.step, state.round = step, round_index
            state.round_step = step - round_index * steps_per_round
            if rewind_at is not None and step == min(rewind_at, context.steps - 1):
                rewound = canonical_copy(context.root, targets)
            method.on_step(state)
            batch = next(context.batches)
            state.batch_size = batch_size(batch)
            if method.reads_batch_size():
                state.batch_size = _global_batch_size(state.batch_size, world, device)
            chunks = split_batch(batch, samples)
            loss_sum = torch.zeros((), device=device)
            for chunk in chunks:
                seeds = torch.randint(2**62, (len(names),), generator=seed_source).tolist()
                samplers = {
                    n: _sampler(method, params[n], state, seed, targets[n].shape, device)
                    for n, seed in zip(names, seeds, strict=True)
                }
                if context.recompute_masks or mesh is not None:
                    attachment.set_mask_functions(samplers)
                else:
                    attachment.set_masks({n: f() for n, f in samplers.items()})
                loss = context.loss_fn(context.model, chunk)
                if check_reads:
                    _check_sharded_reads(attachment, world, device)
                    check_reads = False
                _check_loss(loss, step)
                if not _all_finite(loss.detach(), world):
                    attachment.set_masks({})
                    with torch.no_grad():
                        last = {
                            n: _full(method.final_mask(params[n])).expand(targets[n].shape).clone()
                            for n in names
                        }
                    raise NonFiniteLossError(step, float(loss.detach()), Subnetwork(last))
                (loss / len(chunks)).backward()
                loss_sum = loss_sum + loss.detach() / len(chunks)
            attachment.set_masks({})
            with _replicating(mesh):
                penalty = method.penalty(param_list, per_gate, state)
                if penalty.requires_grad:
                    penalty.backward()
            if mesh is not None:
                _plain_grads(state.aux.values())
            if world is not None:
                _average_gradients(synced, world[1])
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(param_list, clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if weight_optimizer is not None:
                weight_optimizer.step()
                weight_optimizer.zero_grad(set_to_none=True)
            if extra_optimizer is not None:
                extra_optimizer.step()
                extra_optimizer.zero_grad(set_to_none=True)
            method.after_step(state)
            last = step == context.steps - 1
            if step % context.log_every == 0 or last:
                with torch.no_grad():
                    kept = _track(
                        [
                            _full(method.final_mask(p).sum()) * g
                            for p, g in zip(param_list, per_gate, strict=True)
                        ]
                    ).sum()
                history["step"].append(torch.tensor(float(step)))
                history["loss"].append(_average(loss_sum.detach(), world))
                history["penalty"].append(_full(penalty.detach()).float())
                history["density"].append(kept / max(1, total_weights))
                history["temperature"].append(torch.tensor(float(state.temperature)))
                record = {k: float(v[-1]) for k, v in history.items()}
                bar.set_postfix(loss=f"{record['loss']:.4g}", density=f"{record['density']:.4f}")
                for callback in context.callbacks:
                    callback(step, record)
            if checkpoint_path is not None and ((step + 1) % context.checkpoint_every == 0 or last):
                run["optimizer"] = optimizer
                writes = rank == 0 or mesh is not None  # one writer, or each rank its shard
                _together(world, device, "saving the checkpoint",
                          _save if writes else _nothing,
                          checkpoint_path, identity, run, step, rewound)  # fmt: skip
            bar.update(1)
    finally:
        bar.close()
        attachment.remove()
    with torch.no_grad():
        masks = {
            n: _full(method.final_mask(params[n])).expand(targets[n].shape).clone() for n in names
        }
    floats = {k: torch.stack(v).cpu().tolist() if v else [] for k, v in history.items()}
    weights = None
    if method.trains_weights:
        weights = rewound if rewound is not None else canonical_copy(context.root, targets)
    return FindResult(Subnetwork(masks), floats, weights)


def _world() -> tuple[int, int] | None:
    """``(rank, world_size)`` inside an initialised ``torch.distributed`` group of 2 or more."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _local(tensor: Tensor) -> Tensor:
    """This rank's part of a sharded tensor (shares its memory); a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` from a shard's checkpoint: the state of sharded parameters
    back as DTensors laid out like them (the checkpoint holds their local parts)."""
    from torch.distributed.tensor import DTensor

    for param, entry in optimizer.state.items():
        if not is_dtensor(param):
            continue
        local = param.to_local()
        for key, value in entry.items():
            if key == "step":  # a plain scalar even for sharded parameters
                continue
            if isinstance(value, Tensor) and not is_dtensor(value) and value.shape == local.shape:
                entry[key] = DTensor.from_local(
                    value.to(local.device), param.device_mesh, param.placements,
                    run_check=False, shape=param.shape, stride=param.stride(),
                )  # fmt: skip


def _shard_file(base: Path, rank: int, processes: int) -> Path:
    return base.with_name(f"{base.name}.rank{rank}-of-{processes}")


def _resuming(base: Path, path: Path, mesh, processes: int, world, device) -> bool:
    """Whether to resume from ``path`` (``base`` itself, or this rank's shard of it). Refuses,
    on every rank alike, shard files missing on some ranks and checkpoint files written by
    another number of processes or without sharding, rather than silently starting over."""
    exists = path.exists()
    expected = {path.name} | (
        {_shard_file(base, r, processes).name for r in range(processes)}
        if mesh is not None
        else set()
    )
    found = [base.name] if base.exists() else []
    found += [p.name for p in base.parent.glob(glob.escape(base.name) + ".rank*-of-*")]
    foreign = sorted(set(found) - expected)
    flags = [int(exists), int(bool(foreign))]
    if world is not None:
        import torch.distributed as dist

        counts = torch.tensor(flags, device=device)
        dist.all_reduce(counts)
        flags = [int(c) for c in counts.tolist()]
    if flags[1] and not flags[0]:
        layout = f"{processes} FSDP shards" if mesh is not None else "one file"
        raise ValueError(
            f"The checkpoint {str(base)!r} was written in another layout than this run's "
            f"({layout}): found {foreign[:4] or 'them on another rank'}. Resume with the number "
            "of processes and the sharding it was written with, or delete those files (or pass "
            "another `checkpoint=` path) to start over."
        )
    if mesh is None and 0 < flags[0] < processes:
        raise ValueError(
            f"The checkpoint {str(base)!r} exists for {flags[0]} of the {processes} processes: "
            "rank 0 writes it and every rank reads it, so put it on a file system all of them "
            "share (or copy it to each machine) before resuming."
        )
    if mesh is not None and 0 < flags[0] < processes:
        raise ValueError(
            f"Only {flags[0]} of the {processes} shards of the checkpoint {str(base)!r} exist "
            f"(this rank's: {'found' if exists else 'missing'}). Resume with the same number of "
            "processes and all shard files, or delete them to start over."
        )
    return bool(exists)


def _check_same_step(start: int, base: Path, world, device) -> None:
    import torch.distributed as dist

    steps = torch.tensor([start, -start], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if int(steps[0]) != -int(steps[1]):
        raise ValueError(
            f"The shards of the checkpoint {str(base)!r} are from different steps "
            f"({-int(steps[1])} to {int(steps[0])}): a save was interrupted. Delete the shard "
            "files to start over."
        )


def _nothing(*args) -> None:
    return None


def _together(world, device, what: str, action, *args):
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


def _shard(tensor: Tensor, mesh) -> Tensor:
    """``tensor`` (the same on every rank) as a DTensor whose local part is this rank's slice of
    its largest dim (the same layout FSDP2 gives weights); a 0-dim tensor is replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if tensor.dim() == 0:
        placement = Replicate()
    else:
        placement = Shard(max(range(tensor.dim()), key=lambda d: tensor.shape[d]))
    # src_data_rank=None: every rank slices its own copy, no communication
    return distribute_tensor(tensor.detach(), mesh, [placement], src_data_rank=None)


def _gathered(params: Tensor) -> Tensor:
    """The whole parameter tensor as a plain tensor; for a sharded one an all-gather whose
    backward averages the ranks' gradients into each rank's shard (a reduce-scatter), which is
    data-parallel training's gradient of the mean loss over the global batch."""
    if not is_dtensor(params):
        return params
    from torch.distributed.tensor import Partial, Replicate

    whole = params.redistribute(params.device_mesh, [Replicate()])
    return whole.to_local(grad_placements=[Partial("avg")])


def _full(value: Tensor) -> Tensor:
    """A DTensor gathered into a plain tensor (bool via uint8: gloo has no bool collectives)."""
    if not is_dtensor(value):
        return value
    if value.dtype == torch.bool:
        return value.to(torch.uint8).full_tensor().bool()
    return value.full_tensor()


def _replicating(mesh):
    """Regularisers of sharded parameters may combine them with plain tensors (a Lagrange
    multiplier, a constant): those count as replicated on every rank."""
    if mesh is None:
        return contextlib.nullcontext()
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def _plain_grads(values) -> None:
    """Plain tensors (e.g. Lagrange multipliers) that met sharded parameters in the regulariser
    got DTensor gradients; their optimisers need plain ones (the same on every rank)."""
    for value in values:
        if isinstance(value, Tensor) and not is_dtensor(value) and is_dtensor(value.grad):
            value.grad = _full(value.grad)


def _check_sharded_reads(attachment: Attachment, world, device) -> None:
    reads = attachment.shadow_reads()
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


def _global_batch_size(size: int, world: tuple[int, int] | None, device: torch.device) -> int:
    """Examples in the step's global batch: the sum of the ranks' shards (per-example
    regularisers scale by it, as in one process over the global batch)."""
    if world is None:
        return size
    import torch.distributed as dist

    total = torch.tensor([size], dtype=torch.int64, device=device)  # nccl: on the GPU
    dist.all_reduce(total)
    return int(total.item())


def _all_finite(loss: Tensor, world: tuple[int, int] | None) -> bool:
    """Whether the loss is finite on every rank (all ranks stop together, or none does)."""
    finite = torch.isfinite(loss).to(torch.float32).reshape(1)
    if world is not None:
        import torch.distributed as dist

        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _average_gradients(tensors: Sequence[Tensor], world_size: int) -> None:
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


def _average(value: Tensor, world: tuple[int, int] | None) -> Tensor:
    if world is None:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / world[1]


def _save(path: Path, identity, run, step: int, rewound) -> None:
    """Everything needed to continue after ``step`` (see ``_checkpoint``)."""
    tensors: dict[str, Tensor] = {}
    header: dict[str, Any] = {"identity": identity, "step": step}
    for name, value in run["params"].items():
        tensors[f"params/{name}"] = _local(value.detach())
    header["optimizer"] = _checkpoint.flatten_optimizer("optimizer", run["optimizer"], tensors)
    if run["weight_optimizer"] is not None:
        for name, value in run["root"].named_parameters():
            tensors[f"model/{name}"] = value.detach()
        header["weight_optimizer"] = _checkpoint.flatten_optimizer(
            "weight_optimizer", run["weight_optimizer"], tensors
        )
    for index, value in enumerate(run["extras"]):
        tensors[f"extras/{index}"] = value.detach()
    if run["extra_optimizer"] is not None:
        header["extra_optimizer"] = _checkpoint.flatten_optimizer(
            "extra_optimizer", run["extra_optimizer"], tensors
        )
    if rewound is not None:
        for name, value in rewound.items():
            tensors[f"rewound/{name}"] = value
    tensors["seed_source"] = run["seed_source"].get_state()
    state = run["state"]
    plain = {k: v for k, v in state.__dict__.items() if k != "aux"}
    aux: dict[str, Any] = {}
    for key, value in state.aux.items():
        if isinstance(value, Tensor):
            tensors[f"aux/{key}"] = value.detach()
            aux[key] = {"tensor": True}
        elif isinstance(value, torch.optim.Optimizer):
            members = [
                next(k for k, v in state.aux.items() if v is p)
                for group in value.param_groups
                for p in group["params"]
            ]
            aux[key] = {
                "optimizer": type(value).__name__,
                "params": members,
                "state": _checkpoint.flatten_optimizer(f"aux_optimizer/{key}", value, tensors),
            }
        else:
            aux[key] = {"value": value}
    header["state"] = plain
    header["aux"] = aux
    header["history"] = {k: [float(x) for x in v] for k, v in run["history"].items()}
    _checkpoint.write(path, tensors, _checkpoint.jsonable(header))


def _restore(path: Path, identity, run, method: MaskMethod, context: FindContext):
    """Load a checkpoint into the run's objects; returns (first step to run, rewound)."""
    tensors, header = _checkpoint.read(path, identity)
    with torch.no_grad():
        for name, value in run["params"].items():
            _local(value).copy_(tensors[f"params/{name}"])
        if run["weight_optimizer"] is not None:
            for name, value in run["root"].named_parameters():
                if f"model/{name}" in tensors:
                    value.copy_(tensors[f"model/{name}"])
        for index, value in enumerate(run["extras"]):
            value.copy_(tensors[f"extras/{index}"])
    state = run["state"]
    for key, value in header["state"].items():
        setattr(state, key, value)
    for key, entry in header["aux"].items():
        if "tensor" in entry:
            state.aux[key] = tensors[f"aux/{key}"].to(context.device).requires_grad_(True)
        elif "value" in entry:
            state.aux[key] = entry["value"]
    for key, entry in header["aux"].items():
        if "optimizer" in entry:
            optimizer = getattr(torch.optim, entry["optimizer"])(
                [state.aux[p] for p in entry["params"]]
            )
            saved = _checkpoint.unflatten_optimizer(f"aux_optimizer/{key}", entry["state"], tensors)
            optimizer.load_state_dict(saved)
            state.aux[key] = optimizer
    if state.round != 0:  # the optimiser of a later round was made over the same parameters
        run["optimizer"] = _mask_optimizer(method, list(run["params"].values()), context)
    run["optimizer"].load_state_dict(
        _checkpoint.unflatten_optimizer("optimizer", header["optimizer"], tensors)
    )
    _shard_optimizer_state(run["optimizer"])
    if run["weight_optimizer"] is not None:
        run["weight_optimizer"].load_state_dict(
            _checkpoint.unflatten_optimizer("weight_optimizer", header["weight_optimizer"], tensors)
        )
    if run["extra_optimizer"] is not None:
        run["extra_optimizer"].load_state_dict(
            _checkpoint.unflatten_optimizer("extra_optimizer", header["extra_optimizer"], tensors)
        )
    run["seed_source"].set_state(tensors["seed_source"])
    for key, values in header["history"].items():
        run["history"][key] = [torch.tensor(v, device=context.device) for v in values]
    rewound = {
        name[len("rewound/") :]: value.to(context.device)
        for name, value in tensors.items()
        if name.startswith("rewound/")
    }
    return int(header["step"]) + 1, rewound or None


def _sampler(
    method: MaskMethod,
    params: Tensor,
    state: TrainState,
    seed: int,
    shape: tuple[int, ...],
    device: torch.device,
):
    """A function returning the same mask sample each call (its noise comes from ``seed``).
    Every call falls within one step (forward, and the recomputation in its backward), so it
    reads the step's ``state`` as it is."""

    def sample() -> Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        return method.sample(_gathered(params), state, generator).expand(shape)

    return sample


def _mask_optimizer(
    method: MaskMethod, params: Sequence[Tensor], context: FindContext
) -> torch.optim.Optimizer:
    if context.mask_optimizer == "paper":
        return method.optimizer(params)
    lr = getattr(method, "lr", None)
    if lr is None:
        raise ValueError(f"{method.name} has no `lr`; mask_optimizer='adafactor' needs one.")
    return torch.optim.Adafactor(params, lr=lr, foreach=True)


class NonFiniteLossError(FloatingPointError):
    """The task loss became NaN or infinite; training stopped before using it.

    ``step`` is where it happened and ``subnetwork`` the mask the parameters stood for then
    (the last state no non-finite gradient has touched), so the run's work is not lost.
    """

    def __init__(self, step: int, value: float, subnetwork: Subnetwork):
        super().__init__(
            f"The loss was {value} at step {step}; training stopped before the update. The "
            "mask as of the last good step is in this error's `.subnetwork`. Common causes: a "
            "learning rate too high, log(0) or division by zero in loss_fn, or half-precision "
            "overflow (try a float32 model, or a lower lr)."
        )
        self.step = step
        self.value = value
        self.subnetwork = subnetwork


def _check_loss(loss: Any, step: int) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError(
            f"loss_fn must return a scalar tensor; at step {step} it returned "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}. "
            "Reduce it, e.g. with `.mean()`."
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a tensor that does not depend on the masks (requires_grad is "
            "False). Compute the loss from the model's output inside loss_fn, and do not wrap "
            "it in torch.no_grad()."
        )


def endless(data: Any) -> Iterator[Any]:
    """Cycle over ``data`` (re-iterating it each epoch); fail clearly if it is empty or spent."""
    epoch = 0
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                "`data` yielded no batches"
                + (
                    " after its first pass: it is a one-shot iterator "
                    "(e.g. a generator). Pass a list or a DataLoader so it can be re-iterated."
                    if epoch
                    else ". Pass an iterable of batches (a list, a DataLoader)."
                )
            )
        epoch += 1


__all__ = [
    "MaskMethod",
    "NonFiniteLossError",
    "TrainState",
    "endless",
    "split_batch",
    "train_masks",
]
