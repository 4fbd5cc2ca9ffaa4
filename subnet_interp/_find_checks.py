"""The argument checks of ``si.find`` that need more than a line: the ablation it trains under,
``init_scores`` (as initial keep probabilities), FSDP-sharded runs and ``loss_fn``."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._ablations import ZERO, Ablation, resolve_ablation
from ._attach import AddDelta
from ._ranking import ranks
from ._types import Target
from .adapters.compiled import compiled_anywhere
from .methods import registry
from .methods._base import FindResult, MaskMethod, Method


def init_probabilities(
    init_scores: Any, method: Method, chosen: Mapping[str, Target]
) -> dict[str, Tensor] | None:
    """``init_scores`` as each weight's initial keep probability (``0.05 + 0.9 * q``, ``q`` its
    rank quantile over all the selected targets), on the CPU."""
    if init_scores is None:
        return None
    if isinstance(init_scores, FindResult):
        if init_scores.scores is None:
            raise ValueError("`init_scores`: this FindResult has no scores.")
        init_scores = init_scores.scores
    if not isinstance(method, MaskMethod):
        raise ValueError(
            f"`init_scores` warm-starts a learnable-mask method's parameters; {method.name!r} "
            "has none. Leave init_scores unset, or use e.g. 'gumbel_sigmoid' or 'hard_concrete'."
        )
    if not isinstance(init_scores, Mapping):
        raise TypeError(
            "`init_scores` must be a mapping of target name -> float tensor (e.g. "
            f"FindResult.scores) or a FindResult, got {type(init_scores).__name__}."
        )
    missing = [n for n in chosen if n not in init_scores]
    extra = [n for n in init_scores if n not in chosen]
    if missing or extra:
        raise ValueError(
            f"`init_scores` must score exactly the selected targets: missing {missing[:6]}, "
            f"not selected {extra[:6]}. Select the same targets (targets=list(init_scores)) or "
            "pass the scores of a run on these targets."
        )
    for name, target in chosen.items():
        value = init_scores[name]
        if isinstance(value, Tensor) and tuple(value.shape) != target.shape:
            raise ValueError(
                f"init_scores[{name!r}] has shape {tuple(value.shape)}, expected {target.shape}."
            )
    order = ranks({n: init_scores[n].detach().cpu() for n in chosen})  # checks dtypes and NaNs
    last = max(1, sum(r.numel() for r in order.values()) - 1)
    return {n: 0.05 + 0.9 * (1.0 - r.to(torch.float32) / last) for n, r in order.items()}


def digest(values: Mapping[str, Tensor]) -> str:
    """A short content hash of float tensors (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, value in values.items():
        h.update(f"{name}{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ablation(ablation: Any, method: Method) -> Ablation:
    """``si.find``'s ``ablation=``, resolved; refused where the method has no removed weights."""
    resolved = resolve_ablation(ablation)
    if resolved is ZERO:
        return resolved
    if isinstance(resolved, AddDelta):
        raise TypeError("`ablation` must be an si.Ablation that stands in for removed weights.")
    if not method.learns_from_loss:
        raise ValueError(
            f"{method.name!r} does not train: its mask does not depend on `ablation` "
            f"({resolved!r}). Leave ablation='zero' here, and judge the mask under that ablation "
            "with ablation_effect(..., ablation=) or faithfulness_curve(..., ablation=)."
        )
    if method.returns_delta:
        raise ValueError(
            f"{method.name!r} removes no weight while it trains (its subnetwork is a sparse "
            "difference of weights, and every other weight keeps its pretrained value), so "
            f"ablation={resolved!r} does not apply; use ablation='zero'."
        )
    return resolved


def check_sharded_run(
    method: Method, device: Any, mask_optimizer: str, ablation: Ablation = ZERO
) -> None:
    """What an FSDP2-sharded model supports (see ``_train.train_masks``)."""
    if ablation is not ZERO:
        raise ValueError(
            f"ablation={ablation!r} does not work on FSDP-sharded models (the removed weights' "
            "input terms need the whole weight); train under zero ablation, or run on the "
            "unsharded model."
        )
    supported = [
        n
        for n in registry.names()
        if issubclass(registry.get(n), MaskMethod) and not registry.get(n).trains_weights
    ]
    if device is not None:
        raise ValueError(
            f"`device={device!r}` cannot move an FSDP2-sharded model: FSDP placed its shards. "
            "Leave `device` unset."
        )
    if method.name == "random":  # reads no weight: the same masks on every rank, by the seed
        return
    if not isinstance(method, MaskMethod) or method.trains_weights:
        raise ValueError(
            f"The model is sharded with FSDP2 (fully_shard); on sharded models si.find runs the "
            f"learnable-mask methods that keep the weights frozen, {supported}, and the "
            f"'random' baseline; {method.name!r} is not one of them. Run it on the unsharded "
            "model."
        )
    if mask_optimizer != "paper":
        raise ValueError(
            f"`mask_optimizer={mask_optimizer!r}` is not supported on FSDP2-sharded models; use "
            "the default 'paper' optimizer."
        )


def compiled_sample_batching(
    model: Any, root: torch.nn.Module, sample_batching: str, recompute_masks: bool, mesh: Any
) -> str:
    """The ``sample_batching`` a run uses; under ``torch.compile`` (``torch.compile(model)``,
    or ``module.compile()`` anywhere in the model) masks must be sampled outside the compiled
    forward, so one sample at a time, each set as a tensor the graph reads (no recompiles)."""
    if not compiled_anywhere(model, root):
        return sample_batching
    why = (
        "samples the masks inside the forward pass, where torch.compile cannot trace them (a "
        "torch.Generator is made there): every step would break the graph"
    )
    if recompute_masks or mesh is not None:
        raise ValueError(
            f"recompute_masks=True{' (always on for FSDP-sharded models)' if mesh else ''} "
            f"{why}. On a compiled model use recompute_masks=False, or pass the uncompiled "
            "model."
        )
    if sample_batching == "fused":
        raise ValueError(
            f"sample_batching='fused' {why}. On a compiled model use sample_batching='auto' "
            "(one mask sample at a time, masks sampled outside the compiled graph), or pass the "
            "uncompiled model."
        )
    return "sequential"


def check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
        raise TypeError(
            f"`loss_fn` is called as loss_fn(model, batch), but {name}{signature} cannot take "
            "those two positional arguments. Give it that signature, e.g. "
            "`lambda model, batch: my_loss(model(batch))`."
        ) from None


__all__ = [
    "compiled_sample_batching",
    "check_ablation",
    "check_loss_fn",
    "check_sharded_run",
    "digest",
    "init_probabilities",
]


MEMORY = ("default", "lean")


def memory_options(
    memory: str, method: Any, mask_dtype: torch.dtype, mask_optimizer: str, recompute: bool
) -> tuple[torch.dtype, str, bool]:
    """``si.find``'s ``memory`` preset resolved into (mask dtype, mask optimizer, recompute)."""
    if memory not in MEMORY:
        raise ValueError(f"`memory` must be 'default' or 'lean', got {memory!r}.")
    if memory == "default":
        return mask_dtype, mask_optimizer, recompute
    if mask_dtype != torch.float32 or mask_optimizer != "paper" or recompute:
        raise ValueError(
            "memory='lean' sets mask_dtype=torch.bfloat16, recompute_masks=True and the "
            "method's low-memory optimiser itself; got also mask_dtype="
            f"{mask_dtype}, mask_optimizer={mask_optimizer!r}, recompute_masks={recompute}. Pass "
            "either the preset or the separate options."
        )
    optimizer = getattr(method, "lean_mask_optimizer", "paper")
    return torch.bfloat16, optimizer, True


def tensor_attributes(root: nn.Module) -> dict[tuple[int, str], int]:
    """Which tensor each module holds as a plain attribute (an activation cache, e.g. the
    bridge's attention keeps ``_captured_pre_ln_residual``), by identity."""
    return {
        (id(module), key): id(value)
        for module in root.modules()
        for key, value in vars(module).items()
        if isinstance(value, Tensor)
    }


def detach_new_caches(root: nn.Module, before: Mapping[tuple[int, str], int]) -> None:
    """Detach the activation caches the run left with their autograd graph: they would keep
    the last step's graph alive and make the model refuse ``copy.deepcopy``. Attributes that
    were there before the run are left as they were."""
    for module in root.modules():
        for key, value in list(vars(module).items()):
            if (
                isinstance(value, Tensor)
                and value.grad_fn is not None
                and before.get((id(module), key)) != id(value)
            ):
                module.__dict__[key] = value.detach()
