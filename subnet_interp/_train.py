"""The shared training loop of every learnable-mask method (``MaskMethod``).

Weights stay frozen (no gradients, no optimizer state) unless the method trains them; the
methods' mask parameters train. Masks reach the model through the same parametrization
``si.masked`` uses, so the loop works for every model family an adapter handles. The method
interface is in ``methods/_base.py``, rank and shard helpers in ``_distributed.py``, the run's
checkpoints in ``_checkpoint.py`` and the pieces the weight-training loop shares in ``_loop.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _checkpoint, _distributed, _fused, _loop, _step_hooks
from ._attach import Attachment
from ._checkpoint import RunState
from ._checkpoint import save as _save  # a module global, looked up at each save
from ._fingerprint import canonical_copy, read_canonical
from ._loop import NonFiniteLossError, batch_size, endless, split_batch
from ._subnetwork import Subnetwork
from .methods._base import FindContext, FindResult, MaskMethod, TrainState

HISTORY = ("step", "loss", "penalty", "density", "temperature")


def train_masks(method: MaskMethod, context: FindContext) -> FindResult:
    """Run a learnable-mask method; returns the final binary subnetwork and its history."""
    plan, run = _setup(method, context)
    # everything that can fail before training is above: from here on the model is modified
    # and the `finally` below restores it
    attachment = Attachment(
        context.root,
        context.targets,
        context.ablation,
        adapter=context.adapter,
        model=context.model,
    )
    bar = _loop.progress_bar(context.steps, method.name, show=context.progress, rank=plan.rank)
    try:
        plan.fused = _fused.sample_batching(plan, attachment)
        start = _resume(plan, run, bar)
        if _step_hooks.eligible(plan, run):  # on the parameters a resumed run trains
            plan.hooked = _step_hooks.HookedSteps(plan, run)
        for step in range(start, context.steps):
            loss, penalty = _step(plan, run, attachment, step)
            if step % context.log_every == 0 or step == context.steps - 1:
                plan.watch.check(lambda: _last_good(plan, run))  # the host reads it here only
                _log(plan, run, step, loss, penalty, bar)
            _save_if_due(plan, run, step)
            bar.update(1)
    finally:
        bar.close()
        if plan.fused is not None:
            plan.fused.remove()
        if plan.hooked is not None:
            plan.hooked.remove()
        attachment.remove()
    return _finish(plan, run)


@dataclass
class _Plan:
    """What a run derives once from its method and context (the changing state is a
    :class:`RunState`)."""

    method: MaskMethod
    context: FindContext
    names: list[str]  # target names, in the order of the mask parameters
    per_gate: list[int]  # weights each gate of a target covers
    total_weights: int
    samples: int  # mask samples per batch
    steps_per_round: int
    rewind_at: int | None  # the step whose weights a ticket keeps
    clip: float | None
    synced: list[Tensor]  # plain tensors whose gradients are averaged over the ranks
    world: _distributed.World | None
    checkpoint: Path | None  # this rank's checkpoint file
    base: Path | None  # the checkpoint path the user gave
    identity: dict[str, Any]  # what a checkpoint must match
    unchecked_reads: bool  # sharded: whether the first loss is still to be checked
    watch: _loop.FiniteWatch = field(default_factory=_loop.FiniteWatch)  # losses, on the device
    fused: _fused.SampleBatching | None = None  # the mask samples side by side in one forward
    hooked: _step_hooks.HookedSteps | None = None  # mask steps inside a step's one backward

    @property
    def rank(self) -> int:
        return 0 if self.world is None else self.world[0]

    @property
    def processes(self) -> int:
        return 1 if self.world is None else self.world[1]


def _setup(method: MaskMethod, context: FindContext) -> tuple[_Plan, RunState]:
    """The run's fixed plan and its initial state (mask parameters, optimisers, seeds)."""
    params = _initial_parameters(method, context)
    weight_params = _trained_weights(method, context)
    weight_optimizer = method.weight_optimizer(weight_params) if method.trains_weights else None
    rounds = method.rounds()
    steps_per_round = max(1, context.steps // rounds)
    optimizer = _mask_optimizer(method, list(params.values()), context)
    # per-step, per-target seeds: a mask is re-sampled identically when its weight is read again
    # (e.g. recomputed in backward), and drawing them on the CPU costs no device sync
    generator = context.generator
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    extras = list(context.extra_parameters)
    run = RunState(
        params=params,
        optimizer=optimizer,
        seed_source=torch.Generator().manual_seed(seed),
        state=TrainState(
            step=0, total_steps=context.steps, rounds=rounds, steps_per_round=steps_per_round
        ),
        history={key: [] for key in HISTORY},
        root=context.root,
        weight_optimizer=weight_optimizer,
        extras=extras,
        extra_optimizer=torch.optim.Adam(extras, lr=context.extra_lr) if extras else None,
    )
    synced = list(params.values()) + extras
    synced += weight_params if weight_optimizer is not None else []
    targets = [context.targets[n] for n in params]
    world = _distributed.world()
    plan = _Plan(
        method=method,
        context=context,
        names=list(params),
        per_gate=[t.numel // max(1, math.prod(t.gate_shape(method.granularity))) for t in targets],
        total_weights=sum(t.numel for t in targets),
        samples=method.samples_per_batch(),
        steps_per_round=steps_per_round,
        rewind_at=method.rewind_step(steps_per_round) if method.trains_weights else None,
        clip=method.grad_clip(),
        synced=[p for p in synced if not _distributed.is_dtensor(p)],  # sharded: in backward
        world=world,
        unchecked_reads=context.mesh is not None,
        **_checkpoint_files(context, world),
    )
    return plan, run


def _initial_parameters(method: MaskMethod, context: FindContext) -> dict[str, Tensor]:
    """Every target's mask parameters, sharded like the weights under FSDP2."""
    params: dict[str, Tensor] = {}
    for name, target in context.targets.items():
        weight = read_canonical(context.root, target).detach()
        gate_shape = target.gate_shape(method.granularity)
        init = method.init_parameters(target, gate_shape, weight, context.generator)
        if context.init_probabilities is not None:
            init = method.params_for_probability(
                _gate_mean(context.init_probabilities[name].to(weight.device), gate_shape)
            ).to(init.dtype)
        init = init.to(device=context.device, dtype=context.mask_dtype)
        del weight  # a gathered copy under FSDP2: freed before the next target's
        if context.mesh is not None:
            init = _distributed.shard(init, context.mesh)
        params[name] = init.requires_grad_(True)
    return params


def _gate_mean(values: Tensor, gate_shape: tuple[int, ...]) -> Tensor:
    """Per-weight values averaged over the weights each gate covers (gate shape)."""
    dims = [d for d, (v, g) in enumerate(zip(values.shape, gate_shape, strict=True)) if g == 1 != v]
    return values.mean(dim=dims, keepdim=True) if dims else values


def _trained_weights(method: MaskMethod, context: FindContext) -> list[Tensor]:
    """The model parameters that require grad (those a method that trains weights trains)."""
    weight_params = [p for p in context.root.parameters() if p.requires_grad]
    if method.trains_weights and not weight_params:
        raise ValueError(
            f"{method.name} trains weights jointly with the mask, but no parameter of the model "
            "requires grad."
        )
    return weight_params


def _checkpoint_files(context: FindContext, world: _distributed.World | None) -> dict[str, Any]:
    """The ``checkpoint``, ``base`` and ``identity`` fields of the plan."""
    identity = dict(context.run_identity)
    if context.checkpoint is None:
        return {"checkpoint": None, "base": None, "identity": identity}
    base = Path(context.checkpoint)
    if context.mesh is None:
        return {"checkpoint": base, "base": base, "identity": identity}
    # sharded mask state: every rank writes its own shard, ``<checkpoint>.rank<r>-of-<n>``
    rank, processes = world if world is not None else (0, 1)
    return {
        "checkpoint": _checkpoint.shard_file(base, rank, processes),
        "base": base,
        "identity": {**identity, "shard": [rank, processes]},
    }


def _resume(plan: _Plan, run: RunState, bar: tqdm) -> int:
    """Load the run's checkpoint if there is one; returns the first step to run."""
    context = plan.context
    if plan.checkpoint is None or not _checkpoint.resuming(
        plan.base, plan.checkpoint, context.mesh, plan.processes, plan.world, context.device
    ):
        return 0
    _distributed.together(
        plan.world, context.device, "restoring the checkpoint", _restore, plan, run
    )
    start = run.step + 1
    if context.mesh is not None and plan.world is not None:
        _checkpoint.check_same_step(start, plan.base, plan.world, context.device)
    _loop.skip(context.batches, start)  # the data position: one batch per step
    bar.update(start)
    return start


def _restore(plan: _Plan, run: RunState) -> None:
    """The checkpoint into ``run``, and the method's own state back to the method."""
    method, context = plan.method, plan.context
    _checkpoint.restore(
        plan.checkpoint,
        plan.identity,
        run,
        context.device,
        lambda: _mask_optimizer(method, list(run.params.values()), context),
    )
    if run.extra_state:
        method.load_extra_state(run.state, run.extra_state, context.device)


def _step(plan: _Plan, run: RunState, attachment: Attachment, step: int) -> tuple[Tensor, Tensor]:
    """One training step; returns its task loss (mean over mask samples) and regulariser."""
    _begin_step(plan, run, step)
    context, state = plan.context, run.state
    batch = next(context.batches)
    state.batch_size = batch_size(batch)
    if plan.method.reads_batch_size():
        state.batch_size = _distributed.global_batch_size(
            state.batch_size, plan.world, context.device
        )
    loss = _task_loss(plan, run, attachment, batch, step)
    hooked = plan.hooked is not None and plan.hooked.armed
    if hooked:  # the masks stepped inside backward, each with its own penalty term
        penalty = plan.hooked.finish()
    else:
        with _distributed.replicating(context.mesh):
            penalty = plan.method.penalty(list(run.params.values()), plan.per_gate, state)
            if penalty.requires_grad:
                penalty.backward()
    _update(plan, run, stepped_in_backward=hooked)
    return loss, penalty


def _begin_step(plan: _Plan, run: RunState, step: int) -> None:
    """Round and schedule fields for ``step``; the ticket's weights at the rewind step."""
    state = run.state
    round_index = min(step // plan.steps_per_round, state.rounds - 1)
    if round_index != state.round:
        _end_round(plan, run)
    state.step, state.round = step, round_index
    state.round_step = step - round_index * plan.steps_per_round
    if plan.rewind_at is not None and step == min(plan.rewind_at, plan.context.steps - 1):
        run.rewound = canonical_copy(plan.context.root, plan.context.targets)
    plan.method.on_step(state)


def _end_round(plan: _Plan, run: RunState) -> None:
    """Between rounds: the method's reset, then a fresh mask optimiser."""
    plan.watch.check(lambda: _last_good(plan, run))  # before the reset changes the mask
    params = list(run.params.values())
    plan.method.on_round_end(params, run.state)
    run.optimizer = _mask_optimizer(plan.method, params, plan.context)


def _task_loss(plan: _Plan, run: RunState, attachment: Attachment, batch: Any, step: int) -> Tensor:
    """Forward and backward of each mask sample on its share of the batch; the mean loss."""
    context = plan.context
    size = batch_size(batch)
    if plan.fused is not None and size >= plan.samples:
        seeds = run.seed_source.get_state()
        _arm(plan, True)  # one backward pass
        loss = _fused.fused_loss(plan, batch, size, step, lambda: _samplers(plan, run), run.params)
        if loss is not None:
            return loss
        run.seed_source.set_state(seeds)  # not fusable: the sequential loop draws the same noise
    chunks = split_batch(batch, plan.samples)
    _arm(plan, len(chunks) == 1)  # several backward passes accumulate: step after them
    loss_sum = torch.zeros((), device=context.device)
    sizes = [batch_size(chunk) for chunk in chunks]
    for chunk, part in zip(chunks, sizes, strict=True):
        samplers = {n: partial(f, run.params[n]) for n, f in _samplers(plan, run).items()}
        if context.recompute_masks or context.mesh is not None:
            attachment.set_mask_functions(samplers)
        else:
            attachment.set_masks({name: sample() for name, sample in samplers.items()})
        attachment.on_batch(chunk)
        loss = context.loss_fn(context.model, chunk)
        if plan.unchecked_reads:
            reads = attachment.shadow_reads()
            _distributed.check_sharded_reads(reads, plan.world, context.device)
            plan.unchecked_reads = False
        _loop.check_loss(loss, step)
        plan.watch.observe(loss, step, plan.world)  # a non-finite loss: the update is skipped
        # each part weighs its share of the examples: a mean over the batch's examples
        share = loss / len(chunks) if len(set(sizes)) == 1 else loss * (part / sum(sizes))
        share.backward()
        loss_sum = loss_sum + share.detach()
    attachment.set_masks({})
    return loss_sum


def _arm(plan: _Plan, one_backward: bool) -> None:
    """Let the masks step inside this step's backward when it is the only one."""
    if plan.hooked is not None and one_backward:
        plan.hooked.arm()
    elif plan.hooked is not None:
        plan.hooked.disarm()


def _samplers(plan: _Plan, run: RunState) -> dict[str, Any]:
    """One fresh mask sample function per target, of its mask parameters (each returns the
    same sample every call)."""
    context = plan.context
    seeds = torch.randint(2**62, (len(plan.names),), generator=run.seed_source).tolist()
    return {
        name: _sampler(
            plan.method,
            run.state,
            seed,
            context.targets[name].shape,
            context.device,
        )
        for name, seed in zip(plan.names, seeds, strict=True)
    }


def _last_good(plan: _Plan, run: RunState) -> Subnetwork:
    """The mask as of the last good step (for the error at a non-finite loss): the updates
    since were skipped, so it is the mask the parameters stand for now."""
    return Subnetwork(_final_masks(plan, run))


def _update(plan: _Plan, run: RunState, stepped_in_backward: bool = False) -> None:
    """Average the gradients over the ranks, clip them, and step every optimiser (the mask and
    weight optimisers' steps were taken inside backward when ``stepped_in_backward``)."""
    if plan.context.mesh is not None:
        _distributed.plain_grads(run.state.aux.values())
    if plan.world is not None:
        _distributed.average_gradients(plan.synced, plan.world[1])
    if plan.clip is not None:
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), plan.clip, foreach=True)
    left = [run.extra_optimizer]
    if not stepped_in_backward:
        left = [run.optimizer, run.weight_optimizer, *left]
    for optimizer in left:
        if optimizer is not None:
            _loop.step_while_finite(optimizer, plan.watch)
            optimizer.zero_grad(set_to_none=True)
    plan.method.after_step(run.state)


def _log(plan: _Plan, run: RunState, step: int, loss: Tensor, penalty: Tensor, bar: tqdm) -> None:
    """Append the step to the history (on the device) and report it to the callbacks."""
    method = plan.method
    with torch.no_grad():
        kept = _loop.stacked(
            [
                _distributed.full(method.final_mask(p).sum()) * g
                for p, g in zip(run.params.values(), plan.per_gate, strict=True)
            ]
        ).sum()
    history = run.history
    history["step"].append(torch.tensor(float(step)))
    history["loss"].append(_distributed.average(loss.detach(), plan.world))
    history["penalty"].append(_distributed.full(penalty.detach()).float())
    history["density"].append(kept / max(1, plan.total_weights))
    history["temperature"].append(torch.tensor(float(run.state.temperature)))
    # the device's values in one read (float() of each would wait for the device three times)
    read = ("loss", "penalty", "density")
    on_device = torch.stack([history[k][-1].to(history["loss"][-1].device) for k in read])
    record = dict(zip(read, on_device.tolist(), strict=True))
    record = {k: record[k] if k in record else float(v[-1]) for k, v in history.items()}
    _loop.report(step, record, plan.context.callbacks, bar)


def _save_if_due(plan: _Plan, run: RunState, step: int) -> None:
    """Checkpoint after every ``checkpoint_every`` steps and after the last one."""
    context = plan.context
    last = step == context.steps - 1
    if plan.checkpoint is None or not ((step + 1) % context.checkpoint_every == 0 or last):
        return
    plan.watch.check(lambda: _last_good(plan, run))  # never save a run past a non-finite loss
    run.step = step
    run.extra_state = plan.method.extra_state(run.state)
    writes = plan.rank == 0 or context.mesh is not None  # one writer, or each rank its shard
    _distributed.together(
        plan.world, context.device, "saving the checkpoint",
        _save if writes else _distributed.nothing, plan.checkpoint, plan.identity, run,
    )  # fmt: skip


def _final_masks(plan: _Plan, run: RunState) -> dict[str, Tensor]:
    """The binary masks the parameters stand for now, in the targets' shapes."""
    targets = plan.context.targets
    with torch.no_grad():
        return {
            name: _distributed.full(plan.method.final_mask(params))
            .expand(targets[name].shape)
            .clone()
            for name, params in run.params.items()
        }


def _final_scores(plan: _Plan, run: RunState) -> dict[str, Tensor]:
    """The method's continuous scores of the parameters now (float32, the targets' shapes)."""
    targets = plan.context.targets
    with torch.no_grad():
        return {
            name: _distributed.full(plan.method.scores(params))
            .to(torch.float32)
            .expand(targets[name].shape)
            .clone()
            for name, params in run.params.items()
        }


def _finish(plan: _Plan, run: RunState) -> FindResult:
    """The run's result: final masks and scores, the history as floats, a ticket's weights."""
    masks = _final_masks(plan, run)
    floats = {k: torch.stack(v).cpu().tolist() if v else [] for k, v in run.history.items()}
    weights = None
    if plan.method.trains_weights:
        weights = run.rewound
        if weights is None:
            weights = canonical_copy(plan.context.root, plan.context.targets)
    return FindResult(Subnetwork(masks), floats, weights, scores=_final_scores(plan, run))


def _sampler(
    method: MaskMethod,
    state: TrainState,
    seed: int,
    shape: tuple[int, ...],
    device: torch.device,
):
    """A function returning the same mask sample each call (its noise comes from ``seed``).
    Every call falls within one step (forward, and the recomputation in its backward), so it
    reads the step's ``state`` as it is."""

    def sample(params: Tensor) -> Tensor:
        generator = torch.Generator(device=device).manual_seed(seed)
        return method.sample(_distributed.gathered(params), state, generator).expand(shape)

    return sample


def _mask_optimizer(
    method: MaskMethod, params: Sequence[Tensor], context: FindContext
) -> torch.optim.Optimizer:
    """The method's optimiser, or Adafactor at the method's ``lr`` (``mask_optimizer``)."""
    if context.mask_optimizer == "paper":
        return method.optimizer(params)
    lr = getattr(method, "lr", None)
    if lr is None:
        raise ValueError(f"{method.name} has no `lr`; mask_optimizer='adafactor' needs one.")
    return torch.optim.Adafactor(params, lr=lr, foreach=True)


__all__ = [
    "MaskMethod",  # re-exported: the interface lives in methods/_base.py
    "NonFiniteLossError",  # re-exported from _loop
    "TrainState",
    "batch_size",
    "endless",
    "split_batch",
    "train_masks",
]
