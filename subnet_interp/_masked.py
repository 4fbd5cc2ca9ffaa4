"""The user-facing ways to put masks on a model (``si.masked``, ``si.delta_applied``) and the one
preparation step every caller goes through before it attaches anything (:func:`prepare`)."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import adapters
from ._ablations import Ablation, resolve_ablation
from ._attach import AddDelta, Attachment
from ._fingerprint import fingerprint
from ._subnetwork import Subnetwork
from ._types import NotFoundError, Target, describe_tensor


@dataclass(frozen=True)
class Prepared:
    """A model resolved and checked for attaching masks: its adapter, the module holding its
    weights, every target it has, and the FSDP device mesh if it is sharded."""

    model: Any
    adapter: adapters.Adapter
    root: nn.Module
    available: Mapping[str, Target]
    mesh: Any

    def attachment(self, names, ablation: str | Ablation = "zero") -> Attachment:
        """An :class:`Attachment` of the targets ``names`` (masks are set on it next)."""
        targets = {n: self.available[n] for n in names}
        return Attachment(
            self.root, targets, resolve_ablation(ablation), adapter=self.adapter, model=self.model
        )


def prepare(
    model: object,
    masks: Mapping[str, Tensor] | None = None,
    *,
    recorded_fingerprint: str | None = None,
    strict: bool = True,
) -> Prepared:
    """Resolve ``model``'s family and check it can take masks; nothing is attached yet.

    Every entry point that attaches masks (``si.masked``, ``si.delta_applied``, ``si.find``,
    ``ablation_effect``) starts here, so they refuse the same models with the same errors:
    the adapter's own check (e.g. a TransformerLens bridge before ``enable_compatibility_mode``
    ends), a sharded model's layout, then ``masks`` (names, shapes, dtypes, devices) and, with
    ``strict``, the fingerprint the masks were found on.
    """
    adapter = adapters.resolve(model)
    adapter.check_attachable(model)
    root = adapter.root(model)
    mesh = adapters.fsdp_mesh(model, root)  # validates a sharded model's layout
    available = adapter.all_targets(model)
    if masks is not None:
        validate_masks(model, masks, available, root)
    if strict and recorded_fingerprint is not None:
        check_fingerprint(model, recorded_fingerprint)
    return Prepared(model, adapter, root, available, mesh)


def validate_masks(
    model: object,
    masks: Mapping[str, Tensor],
    available: Mapping[str, Target],
    root: nn.Module,
) -> None:
    """Check names, shapes, dtypes and devices of canonical masks against the model."""
    for name, mask in masks.items():
        if name not in available:
            hint = _unknown_name_hint(name, available)
            names = list(available)
            shown = ", ".join(names[:30]) + (
                f", ... ({len(names) - 30} more)" if len(names) > 30 else ""
            )
            raise NotFoundError(
                f"Mask target {name!r} is not a maskable weight of this "
                f"{type(model).__qualname__}.{hint} Available: {shown}."
            )
        if not isinstance(mask, Tensor):
            raise TypeError(f"Mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}.")
        target = available[name]
        if tuple(mask.shape) != target.shape:
            raise ValueError(
                f"Mask for {name!r} has shape {tuple(mask.shape)}, expected {target.shape} "
                f"(axes {target.axes}). Was it found on a different model or layout?"
            )
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(
                f"Mask for {name!r} has dtype {mask.dtype}; expected torch.bool (binary) or a "
                "floating dtype (soft mask). Convert it with `mask.bool()` or `mask.float()`."
            )
        real = adapters.real_tensor(root.get_submodule(target.module), target.attribute)
        if mask.device != real.device:
            raise ValueError(
                f"Mask for {name!r} is on {mask.device} but the weight is on {real.device} "
                f"({describe_tensor(real)}). Move the subnetwork with `.to({str(real.device)!r})`."
            )


def _unknown_name_hint(name: str, available: Mapping[str, Target]) -> str:
    if any(char in name for char in "*?["):
        hits = [n for n in available if fnmatch.fnmatchcase(n, name)]
        if hits:
            return (
                f" It is a glob pattern matching {len(hits)} targets ({hits[:6]}"
                f"{', ...' if len(hits) > 6 else ''}); masks are keyed by exact canonical names, "
                "one mask per target. Expand the pattern with `si.targets(model, include=...)`."
            )
    real = adapters.real_name_hint(name, available)
    if real:
        return real
    close = difflib.get_close_matches(name, list(available), n=3)
    return f" Closest: {close}." if close else ""


def check_fingerprint(model: object, recorded: str) -> None:
    """Raise if ``model``'s weights are not those a subnetwork was found on."""
    actual = fingerprint(model)
    if actual != recorded:
        raise ValueError(
            f"This subnetwork was found on a model with fingerprint {recorded!r}, but this "
            f"model's fingerprint is {actual!r}: its weights differ (another checkpoint, a "
            "fine-tuned copy, or weights processed by e.g. fold_ln). Pass strict=False to "
            "apply it anyway."
        )


@contextlib.contextmanager
def masked(
    model: object,
    subnetwork: Subnetwork | Mapping[str, Tensor],
    *,
    ablation: str | Ablation = "zero",
    strict: bool = True,
) -> Iterator[object]:
    """Context manager: inside it, ``model`` computes with the subnetwork's weights only.

    Args:
        model: a plain ``nn.Module`` or a supported wrapper (TransformerLens, nnsight,
            Hugging Face).
        subnetwork: a :class:`Subnetwork`, or a mapping of canonical name -> mask tensor; a
            float mask is a soft mask (gradients flow through it).
        ablation: what stands where the mask is 0 (``"zero"`` or an :class:`Ablation`).
        strict: check the subnetwork's recorded model fingerprint against ``model``.

    Nested use composes: an inner ``masked`` multiplies its mask onto the outer one (for
    zero ablation, the intersection of the two subnetworks). On exit, also on exception,
    every weight is bit-exactly what it was and the ``state_dict`` has its original keys.

    A ``torch.compile``-d model (``torch.compile(model)`` or ``model.compile()``) takes the same
    masks: they attach to the model underneath, its compiled forward computes with them
    exactly as the eager one does, and the first masked call compiles once; later ``masked``
    blocks on the same model reuse that graph whatever their masks (each masked module keeps
    one parametrized class, the one Dynamo's guards check).
    """
    if isinstance(subnetwork, Subnetwork):
        masks: Mapping[str, Tensor] = subnetwork.masks
        recorded = subnetwork.meta.get("fingerprint")
    elif isinstance(subnetwork, Mapping):
        masks, recorded = subnetwork, None
    else:
        raise TypeError(
            f"`subnetwork` must be an si.Subnetwork or a mapping name -> mask tensor, got "
            f"{type(subnetwork).__name__}."
        )
    attachment = prepare(model, masks, recorded_fingerprint=recorded, strict=strict).attachment(
        masks, ablation
    )
    try:
        attachment.set_masks(masks)
        yield model
        reads = attachment.shadow_reads()
    finally:
        attachment.remove()
    unread = [name for name, count in reads.items() if count == 0]
    if unread and len(unread) < len(reads):
        warnings.warn(
            f"The FSDP-sharded weights of {unread[:6]}{' ...' if len(unread) > 6 else ''} were not "
            "read through their own module's forward while masked (others were), so their masks "
            "had no effect: a parent module reads them directly. Results differ from the "
            "unsharded model's; exclude those targets or run this on the unsharded model.",
            stacklevel=3,
        )


@contextlib.contextmanager
def delta_applied(
    model: object, delta: Mapping[str, Tensor], *, scale: float = 1.0
) -> Iterator[object]:
    """Context manager: inside it, each target computes with ``weight + scale * delta[name]``.

    ``delta`` maps canonical names to float tensors (e.g. ``FindResult.delta`` of ``lt_sft``);
    several deltas compose by nesting. Weights are never written: on exit they are bit-exactly
    what they were.
    """
    if not isinstance(delta, Mapping):
        hint = (
            " It is a FindResult: pass its `.delta` (lt_sft's sparse weight change)."
            if hasattr(delta, "delta") and hasattr(delta, "subnetwork")
            else ""
        )
        raise TypeError(
            f"`delta` must map target names to float tensors, got {type(delta).__name__}." + hint
        )
    prepared = prepare(model, delta)
    for name, value in delta.items():
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"delta[{name!r}] has dtype {value.dtype}; a weight delta is a float tensor "
                "(e.g. `FindResult.delta` of lt_sft). To keep or remove weights by a binary "
                "mask, use `si.masked` instead."
            )
    attachment = prepared.attachment(delta, AddDelta())
    try:
        attachment.set_masks({n: scale * d for n, d in delta.items()}, fill=0.0)
        yield model
    finally:
        attachment.remove()


__all__ = [
    "Prepared",
    "check_fingerprint",
    "delta_applied",
    "masked",
    "prepare",
    "validate_masks",
]
