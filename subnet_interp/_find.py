"""``si.find``: run any registered method on any supported model."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from . import _checkpoint, adapters
from ._ablations import ZERO, Ablation
from ._find_checks import (
    check_ablation,
    check_loss_fn,
    check_sharded_run,
    compiled_sample_batching,
    detach_new_caches,
    digest,
    init_probabilities,
    memory_options,
    tensor_attributes,
)
from ._fingerprint import fingerprint
from ._fused import SAMPLE_BATCHING
from ._loop import endless
from ._masked import Prepared, prepare
from ._registry import check_hparams
from ._types import NotFoundError, Target, describe_tensor
from .methods import registry
from .methods._base import Callback, FindContext, FindResult, MaskMethod, Method


def select_targets(
    prepared: Prepared,
    targets: str | Iterable[str] | Mapping[str, Target] | None,
) -> dict[str, Target]:
    """The targets ``si.find``'s ``targets=`` argument selects (patterns, names, or a mapping
    ``si.targets`` returned) among those of the prepared model; refuses an empty selection."""
    available = prepared.available
    if isinstance(targets, Mapping):
        chosen = {}
        for name, target in targets.items():
            if name not in available or available[name] != target:
                raise NotFoundError(
                    f"Target {name!r} was not produced by si.targets(model) for this model; pass "
                    "names or patterns, or the mapping si.targets(model, ...) returns."
                )
            chosen[name] = target
    else:
        chosen = adapters.select(available, targets, family=prepared.adapter.family)
    if not chosen:
        raise ValueError(
            "No weights selected to mask: the target selection is empty. Available: "
            f"{list(available)[:20]}."
        )
    return chosen


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        items = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _device_batches(data: Iterable[Any], device: torch.device) -> Iterator[Any]:
    for batch in endless(data):
        yield to_device(batch, device)


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=source, device=source.device).item())
    return torch.Generator(device=device).manual_seed(seed)


def find(
    model: Any,
    method: str | Method,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    data: Iterable[Any] | None,
    *,
    targets: str | Iterable[str] | Mapping[str, Target] | None = None,
    steps: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    log_every: int = 10,
    inplace: bool = False,
    mask_dtype: torch.dtype = torch.float32,
    mask_optimizer: str = "paper",
    recompute_masks: bool = False,
    sample_batching: str = "auto",
    memory: str = "default",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    extra_parameters: Iterable[Tensor] | torch.nn.Module | None = None,
    extra_lr: float = 1e-3,
    ablation: str | Ablation = "zero",
    init_scores: Mapping[str, Tensor] | FindResult | None = None,
) -> FindResult:
    """Find a subnetwork of ``model`` with a registered method.

    Args:
        model: a plain ``nn.Module`` or a supported wrapper (TransformerLens, nnsight, HF).
        method: a registered name (``si.methods.names()``) or a method instance, e.g.
            ``si.methods.create("gumbel_sigmoid", alpha=1e-3)``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the task loss; called with the
            object you passed as ``model``. ``None`` for the baselines that never read it
            (``magnitude``, ``random``).
        data: an iterable of batches (a list, a ``DataLoader``); re-iterated when exhausted.
            ``None`` for ``magnitude`` and ``random``.
        targets: glob pattern(s) or the mapping ``si.targets`` returns; default: every weight
            matrix except embeddings.
        steps: optimisation steps (required by every method that trains; ignored by
            ``magnitude`` and ``random``).
        device: where to train; the model is moved there for the run and back afterwards.
            Default: the device of the model's weights.
        generator: the source of all randomness (mask init and sampling); default: seed 0.
        callbacks: ``callback(step, record)`` called every ``log_every`` steps with floats
            (``loss``, ``penalty``, ``density``, ``temperature``).
        progress: show a tqdm progress bar.
        log_every: how often (in steps) history is recorded and callbacks run.
        inplace: for methods that train weights (``lottery_ticket``, ``lt_sft``,
            ``continuous_sparsification``): train the model itself instead of a deep copy.
        mask_dtype: dtype of the mask parameters of learnable methods, and so of their
            gradients and optimiser state: ``torch.float32`` (16 bytes per gate with Adam) or
            ``torch.bfloat16`` (8 bytes; see benchmarks/mask_memory.py for what fits).
        mask_optimizer: ``"paper"`` (the method's own optimiser: Adam, or SGD with
            momentum for ``continuous_sparsification`` as Savarese et al.) or ``"adafactor"`` (``torch.optim.Adafactor`` at the method's learning rate:
            factored second moments and no first moment, so almost no per-gate state). Both
            memory options are off the papers' recipes; the conformance tests show the planted
            subnetwork is still recovered.
        recompute_masks: learnable methods sample each target's mask when the model reads the
            weight and recompute it in the backward pass (activation checkpointing of the
            mask), instead of building every mask up front and keeping the intermediates: the
            step then holds no mask-sized temporaries besides the masked weight the layer
            saves. Same masks and history as without it; costs a second elementwise pass
            (about 1-10% per step on a GPT-2-style model on CPU, more on tiny models). Always
            on for FSDP-sharded models (a layer's mask is gathered only while it computes).
        sample_batching: how learnable methods with frozen weights run a step. ``"auto"``
            (default): while the mask trains, every masked ``nn.Linear`` / transformers
            ``Conv1D`` computes its own masked matmul and keeps nothing weight-sized for
            backward (the masked weight is rebuilt there from the mask parameters, one layer
            and one sample at a time); with several mask samples (``gumbel_sigmoid``'s
            ``mask_samples``) each part of the batch meets its own sample in the same single
            forward pass, as Csordás et al.'s code does, and ``loss_fn`` runs once on the
            whole batch. It falls back to the layer-by-layer path by itself where it cannot
            apply (other weight owners, e.g. einsum weights; a layer whose inputs do not lead
            with the batch dimension; ablations other than zero; sharded weights).
            ``"sequential"``: always the layer-by-layer path (the parametrization, one forward
            per mask sample on its part of the batch, ``loss_fn`` on each part, each part's loss
            weighted by its share of the examples). Parts are ``torch.tensor_split``'s on both
            paths. For a loss that is a mean over the batch's examples the two give the same
            masks (bit-identical masks, scores and losses when the batch splits evenly); for
            other losses (a sum; a mean over tokens of padded sequences, as transformers'
            ``labels`` loss) they differ, and ``"auto"``'s one loss on the whole batch is
            Csordás et al.'s. ``"fused"``: refuse to fall back (an error says why).
            Sequence-first layers whose sequence length happens to equal the batch size cannot
            be told apart from batch-first ones: use ``"sequential"`` for them.
        memory: ``"default"``, or ``"lean"``: the low-memory preset for learnable methods,
            ``mask_dtype=torch.bfloat16``, ``recompute_masks=True`` and the method's
            ``lean_mask_optimizer`` (``"adafactor"``, except ``gumbel_sigmoid``, whose planted
            recovery needs Adam's first moment); measured in ``benchmarks/mask_memory.py``.
            Combine it with none of those three options.
        checkpoint: a file path for learnable-mask methods: every ``checkpoint_every`` steps
            (and at the end) the run's whole state is written there atomically (mask
            parameters, optimiser state, schedule position, seed generator, history, and the
            weights for methods that train them); if the file exists, the run resumes from it
            and ends with exactly the mask an uninterrupted run gives. ``data`` must yield the
            same batches in the same order again (a list or a seeded loader): the run skips the
            batches of the steps already done. A checkpoint of a different run is refused.
            Under ``torch.distributed`` rank 0 writes it; on an FSDP2-sharded model every rank
            writes its shard of the mask state to ``<checkpoint>.rank<r>-of-<n>``.
        extra_parameters: tensors (or a module's parameters) trained alongside the mask by
            their own Adam (``extra_lr``), from the same loss: e.g. a probe that ``loss_fn``
            applies to the model's activations (``subnet_interp.probing``). They are trained in
            place and must not belong to the model (its weights stay frozen).
        ablation: what the removed weights compute while the mask trains: ``"zero"`` (the
            default), ``si.MeanAblation(reference_data)``, ``si.ResampleAblation(...)``,
            ``si.ReinitAblation()`` or ``si.PatchAblation(counterfactual)`` (each batch's
            counterfactual twin runs, without grad, before the masked forward; the removed part
            of every masked weight computes on its layer's input in that run). Judge the mask
            under the same ablation (``ablation_effect`` / ``faithfulness_curve`` /
            ``si.masked`` take the same objects). Applies to the methods that learn from the
            loss; ``lt_sft`` removes no weight (its subnetwork is a sparse weight difference)
            and takes only ``"zero"``. For ``lottery_ticket`` the pruned weights keep their
            values and compute on the ablation's input.
        init_scores: warm-start a learnable-mask method from scores (e.g. the ``scores`` of
            an ``attribution`` run, as MIB submissions warm-started mask learning with EAP-IG),
            a mapping over exactly the selected targets or a ``FindResult``. The weights are
            ranked (highest first, ties by position) and each starts kept with probability
            ``0.05 + 0.9 * q``, ``q`` its rank quantile (1 for the best, 0 for the worst); a
            neuron or head gate starts at the mean over its weights. Each method inverts its
            own keep probability (``MaskMethod.params_for_probability``).

    Returns:
        ``FindResult(subnetwork, history)``; ``subnetwork.meta`` records the method, its
        hyper-parameters, the steps and the model fingerprint.

    Several processes: call it in every process of an initialised ``torch.distributed`` group
    with that process's shard of the data. Mask gradients are averaged as DDP averages
    gradients; every rank returns the same subnetwork. A model sharded with FSDP2's
    ``fully_shard`` is supported by ``gumbel_sigmoid``, ``continuous_sparsification_lepori`` and
    ``hard_concrete``: their mask parameters are sharded like the weights.

    The model's weights are left bit-exactly as they were (methods that train weights work on
    a copy unless ``inplace=True``), and so are its ``requires_grad`` flags, train/eval modes
    and device.

    ``torch.compile``: pass the compiled model (``torch.compile(model)``, or a model compiled
    in place with ``model.compile()``) and ``loss_fn`` runs its compiled forward. Targets and
    fingerprint are the uncompiled model's, so the subnetwork applies to either. Each step's
    masks are sampled outside the compiled graph and read by it as tensors, so the graph
    compiles once per run (not once per step), with the same masks and history as the eager
    run with ``sample_batching="sequential"``: on a compiled model ``"auto"`` runs one mask
    sample at a time, and ``recompute_masks=True`` and ``sample_batching="fused"`` (which
    sample inside the forward, where Dynamo breaks the graph) are refused. Speed-ups on CPU
    are in ``benchmarks/compile_speed.py``.
    """
    resolved = registry.resolve(method, base=Method)
    if steps is None and resolved.needs_steps:
        raise ValueError(
            f"Method {resolved.name!r} needs `steps`, the number of optimisation steps (or, "
            "for attribution, of batches its scores average over), e.g. steps=1000."
        )
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    check_hparams(resolved)
    if loss_fn is None or data is None:
        if resolved.learns_from_loss:
            missing = "loss_fn" if loss_fn is None else "data"
            raise TypeError(
                f"Method {resolved.name!r} learns from the task loss, so `{missing}` is "
                "required: loss_fn(model, batch) -> scalar tensor and an iterable of batches. "
                "Only the baselines that never read them (magnitude, random) take None."
            )
        data = () if data is None else data  # never iterated
        loss_fn = loss_fn if loss_fn is not None else _unread_loss
    else:
        check_loss_fn(loss_fn)
    if mask_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"`mask_dtype` must be torch.float32, torch.bfloat16 or torch.float16, got {mask_dtype!r}."
        )
    if not isinstance(recompute_masks, bool):
        raise TypeError(f"`recompute_masks` must be True or False, got {recompute_masks!r}.")
    if sample_batching not in SAMPLE_BATCHING:
        raise ValueError(
            f"`sample_batching` must be one of {', '.join(map(repr, SAMPLE_BATCHING))}, got "
            f"{sample_batching!r}."
        )
    if mask_optimizer not in ("paper", "adafactor"):
        raise ValueError(
            f"`mask_optimizer` must be 'paper' or 'adafactor', got {mask_optimizer!r}."
        )
    mask_dtype, mask_optimizer, recompute_masks = memory_options(
        memory, resolved, mask_dtype, mask_optimizer, recompute_masks
    )
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be a positive int, got {log_every!r}.")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be a positive int, got {checkpoint_every!r}.")
    if isinstance(extra_parameters, torch.nn.Module):
        extra_parameters = list(extra_parameters.parameters())
    extras = list(extra_parameters or ())
    if (checkpoint is not None or extras) and not isinstance(resolved, MaskMethod):
        learnable = [n for n in registry.names() if issubclass(registry.get(n), MaskMethod)]
        raise ValueError(
            f"`checkpoint=` and `extra_parameters=` work with the learnable-mask methods "
            f"{learnable}; {resolved.name!r} is not one (lottery_ticket checkpoints its rounds "
            "with its own `checkpoint_dir` hyper-parameter)."
        )
    for tensor in extras:
        if (
            not isinstance(tensor, Tensor)
            or not tensor.is_floating_point()
            or not tensor.requires_grad
        ):
            raise ValueError(
                "`extra_parameters` must be floating tensors that require grad (e.g. "
                f"probe.parameters()); got {describe_tensor(tensor) if isinstance(tensor, Tensor) else type(tensor).__name__}."
            )
    if not (isinstance(extra_lr, (int, float)) and extra_lr > 0):
        raise ValueError(f"`extra_lr` must be a positive number, got {extra_lr!r}.")
    resolved_ablation = check_ablation(ablation, resolved)
    prepared = prepare(model)
    adapter, mesh = prepared.adapter, prepared.mesh
    if mesh is not None:
        check_sharded_run(resolved, device, mask_optimizer, resolved_ablation)
    chosen = select_targets(prepared, targets)
    sample_batching = compiled_sample_batching(
        model, prepared.root, sample_batching, recompute_masks, mesh
    )
    owned = {id(p) for p in prepared.root.parameters()}
    if any(id(t) in owned for t in extras):
        raise ValueError(
            "`extra_parameters` include parameters of the model itself; the model's weights "
            "stay frozen while masks train. Keep the probe outside the model and apply it in "
            "loss_fn."
        )
    probabilities = init_probabilities(init_scores, resolved, chosen)
    print_before = fingerprint(model)
    run = {  # what defines the run: recorded in the result's meta and checked on resume
        "method": resolved.name,
        "hparams": dataclasses.asdict(resolved),
        "steps": steps,
        "mask_dtype": str(mask_dtype).removeprefix("torch."),
        "mask_optimizer": mask_optimizer,
        "fingerprint": print_before,
        "targets": list(chosen),
    }
    if resolved_ablation is not ZERO:  # (absent for zero: checkpoints written before it resume)
        run["ablation"] = resolved_ablation.name
    if probabilities is not None:  # (likewise absent without it)
        run["init_scores"] = digest(probabilities)
    user_model = model
    user_root = adapter.root(model)
    # (a copy may still run some of the original's code, e.g. hooks bound to its modules)
    user_cached = tensor_attributes(user_root)
    snapshot = None  # the weights to put back, where the method trains the model itself
    if resolved.trains_weights and not inplace:
        if adapter.copyable(model):
            model = _copy_model(model)
        else:  # train the model itself, then put its weights back
            snapshot = {k: v.detach().clone() for k, v in adapter.root(model).state_dict().items()}
    root = adapter.root(model)
    first = next(iter(chosen.values()))
    model_device = adapters.real_tensor(root.get_submodule(first.module), first.attribute).device
    run_device = torch.device(device) if device is not None else model_device
    if run_device.type == "meta":
        raise ValueError(
            "device='meta' holds no data: the model's weights could not be moved back from it. "
            "Pass a device that computes, e.g. 'cpu' or 'cuda', or None for the model's own."
        )

    flags = {name: p.requires_grad for name, p in root.named_parameters()}
    modes = {name: m.training for name, m in root.named_modules()}
    # the run starts from no gradients and leaves the model's own as they were
    grads = {name: p.grad for name, p in root.named_parameters() if p.grad is not None}
    moved = run_device != model_device
    cached = tensor_attributes(root)
    try:
        for p in root.parameters():
            p.grad = None
        if moved:
            root.to(run_device)
        if not resolved.trains_weights:
            for p in root.parameters():
                p.requires_grad_(False)
        root.eval()  # dropout off, as Csordás et al. and NeuroSurgeon train masks
        context = FindContext(
            model=model,
            root=root,
            targets=chosen,
            loss_fn=loss_fn,
            batches=_device_batches(data, run_device),
            steps=steps or 0,
            device=run_device,
            generator=_device_generator(generator, run_device),
            adapter=adapter,
            callbacks=tuple(callbacks),
            progress=progress,
            log_every=log_every,
            mask_dtype=mask_dtype,
            mask_optimizer=mask_optimizer,
            recompute_masks=recompute_masks,
            sample_batching=sample_batching,
            extra_parameters=extras,
            extra_lr=float(extra_lr),
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            mesh=mesh,
            ablation=resolved_ablation,
            init_probabilities=probabilities,
            run_identity=_checkpoint.jsonable(
                {**run, "extra_parameters": [list(t.shape) for t in extras]}
            ),
        )
        result = resolved.run(context)
        if snapshot is not None:
            result = _own_tensors(result)
    finally:
        if mesh is not None:
            # an error after a forward leaves FSDP's gathered parameters registered; the flags
            # belong to the sharded ones
            adapters.reshard(root)
        _restore(root, flags, modes, model_device if moved else None, grads)
        detach_new_caches(root, cached)
        if user_root is not root:
            detach_new_caches(user_root, user_cached)
        if snapshot is not None:
            root.load_state_dict(snapshot)
    if not (resolved.trains_weights and inplace) and fingerprint(user_model) != print_before:
        raise RuntimeError(
            f"Method {resolved.name!r} changed the model's weights; this is a bug in the method "
            "(weights must only change on a copy). Please report it."
        )
    meta = {
        **run,
        "recompute_masks": recompute_masks or mesh is not None,  # always so when sharded
        "family": adapter.family,
        "ablation": resolved_ablation.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subnet_interp_version": _version(),
    }
    subnetwork = result.subnetwork.to(model_device).with_meta(**meta)
    scores = _scores_like(result.scores, subnetwork, resolved.name)
    return dataclasses.replace(result, subnetwork=subnetwork, scores=scores)


def _scores_like(scores: Any, subnetwork: Any, method: str) -> dict[str, torch.Tensor] | None:
    """A method's scores as float32 on the masks' device, checked against the masks' layout."""
    if scores is None:
        return None
    if list(scores) != list(subnetwork.names) or any(
        tuple(scores[n].shape) != tuple(subnetwork[n].shape) for n in subnetwork.names
    ):
        raise RuntimeError(
            f"Method {method!r} returned scores whose targets or shapes differ from its masks'; "
            "this is a bug in the method (scores are laid out like the masks). Please report it."
        )
    return {n: s.detach().to(subnetwork.device, torch.float32) for n, s in scores.items()}


def _own_tensors(result: Any) -> Any:
    """``result`` with its weights, state and delta cloned, so that putting the model's weights
    back does not change them."""

    def own(mapping: Any) -> Any:
        if mapping is None:
            return None
        return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in mapping.items()}

    changes = {
        f: own(getattr(result, f)) for f in ("weights", "state", "delta") if hasattr(result, f)
    }
    return dataclasses.replace(result, **changes)


def _copy_model(model: Any) -> Any:
    # a module may keep an activation from its last forward as a plain attribute (the bridge's
    # attention keeps ``_captured_pre_ln_residual``); after a forward with grad it is a non-leaf
    # tensor, which deepcopy refuses: copy it detached (it is a cache, not state)
    memo: dict[int, Any] = {}
    if isinstance(model, nn.Module):
        for module in model.modules():
            for value in vars(module).values():
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    memo[id(value)] = value.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as error:
        raise TypeError(
            f"This method trains weights, so it works on a copy of the model, but a "
            f"{type(model).__qualname__} could not be deep-copied ({error}). Pass inplace=True to "
            "train the model itself (save its state_dict first if you need it)."
        ) from error


def _unread_loss(model: Any, batch: Any) -> Tensor:
    """The ``loss_fn`` of a baseline run given none (it never reads one)."""
    raise RuntimeError("This method does not read the task loss; none was given.")


def _restore(
    root: nn.Module,
    flags: Mapping[str, bool],
    modes: Mapping[str, bool],
    device: torch.device | None,
    grads: Mapping[str, Tensor],
) -> None:
    if device is not None:
        root.to(device)
    for name, p in root.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
        p.grad = grads.get(name)
    for name, m in root.named_modules():
        if name in modes:
            m.training = modes[name]


def _version() -> str:
    from . import __version__

    return __version__


__all__ = ["find", "to_device"]
