"""Attach masks to a model's real weights through ``torch.nn.utils.parametrize``.

While attached, every read of a targeted weight returns the masked weight, so forward
passes, TransformerLens hooks and nnsight traces all see the subnetwork. Detaching removes
exactly the parametrizations it added and puts the original ``Parameter`` objects back, in
their original order, so ``state_dict`` keys and optimizer references are unchanged and the
values are bit-exactly what they were (they are never written to).
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from . import adapters
from ._ablations import ZERO, Ablation, resolve_ablation
from ._types import Target
from .adapters.compiled import compiled_anywhere


class _Slot:
    """The current mask of one real tensor; shared between the attachment and its parametrization.

    Not an ``nn.Module`` on purpose: nothing here may appear in the model's ``state_dict``.
    """

    __slots__ = ("mask", "compute", "checkpointed", "ablation", "location")

    def __init__(self, ablation: Ablation, location: tuple[str, str]):
        self.mask: Tensor | None = None
        # set instead of ``mask``: weight -> masked weight (Attachment.set_mask_functions, and
        # set_masks on sharded weights, whose mask is built when the gathered weight is read)
        self.compute: Callable[[Tensor], Tensor] | None = None
        self.checkpointed = False  # recompute ``compute`` in backward instead of keeping it
        self.ablation = ablation
        self.location = location


class _Masking(nn.Module):
    """The parametrization: ``weight -> ablation.apply(weight, mask)``."""

    def __init__(self, slot: _Slot):
        super().__init__()
        self._slot = slot

    # read inside torch.compile's traces: kept free of runtime type-checking wrappers (the test
    # suite's), which Dynamo would trace into
    @typing.no_type_check
    def forward(self, weight: Tensor) -> Tensor:
        compute = self._slot.compute
        if compute is not None:
            if not (self._slot.checkpointed and torch.is_grad_enabled()):
                return compute(weight)
            # Nothing the mask computation makes is kept for backward: it is recomputed there
            # (the mask functions are deterministic), so a step holds no mask-sized tensors
            # beyond the masked weight the layer itself saves.
            return checkpoint(compute, weight, use_reentrant=False)
        mask = self._slot.mask
        if mask is None:
            return weight
        return self._slot.ablation.apply(weight, mask, self._slot.location)


@dataclass
class _Location:
    module: nn.Module
    attribute: str
    targets: list[Target]
    slot: _Slot
    parametrization: _Masking
    parameter_order: list[str] | None  # set when this attachment made the tensor parametrized
    # FSDP-sharded weights are not parametrized (FSDP swaps the parameter objects itself): the
    # module's forward hooks put the masked gathered weight in front of them (see _Shadow)
    shadow: _Shadow | None = None
    tiles: bool | None = None  # whether the targets' views cover the tensor once (see _tiles)

    @property
    def real(self) -> Tensor:
        if self.shadow is not None:
            return self.module._parameters[self.attribute]
        return self.module.parametrizations[self.attribute].original


class _Shadow:
    """Masks a weight FSDP2 manages. FSDP all-gathers the module's parameters before its
    forward and puts the gathered ``Parameter`` in ``module._parameters``; the pre-hook here
    (registered after FSDP's, so it runs later) shadows it with the masked weight in the
    instance ``__dict__``, which attribute lookup reads first, and the post-hook (also on
    exceptions) removes the shadow. Nested attachments compose: a later pre-hook masks the
    earlier one's shadow."""

    def __init__(self, module: nn.Module, attribute: str, parametrization: _Masking):
        if isinstance(getattr(type(module), attribute, None), property):
            raise ValueError(
                f"{type(module).__qualname__}.{attribute} is a property (e.g. a parametrization "
                "registered before sharding), which an instance attribute cannot stand in front "
                "of: masks cannot attach to it on an FSDP-sharded model. Remove the "
                "parametrization before sharding, or use the unsharded model."
            )
        self.attribute = attribute
        self.parametrization = parametrization
        self.reads = 0
        self.handles = [
            module.register_forward_pre_hook(self.before),
            module.register_forward_hook(self.after, always_call=True),
        ]

    def before(self, module: nn.Module, args: object) -> None:
        name = self.attribute
        weight = module.__dict__.get(name)
        if weight is None:
            weight = module._parameters.get(name)
        if weight is None or adapters.is_dtensor(weight):
            raise RuntimeError(
                f"{type(module).__qualname__}.{name} was still sharded when its forward began: "
                "FSDP did not gather it. Apply fully_shard to this module or one that contains "
                "it (e.g. every transformer block, then the root), and call the model itself "
                "rather than one sub-module."
            )
        self.reads += 1
        module.__dict__[name] = self.parametrization(weight)

    def after(self, module: nn.Module, args: object, output: object) -> None:
        module.__dict__.pop(self.attribute, None)

    def remove(self, module: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        module.__dict__.pop(self.attribute, None)


class AddDelta(Ablation):
    """Not an ablation: the parametrization ``weight -> weight + delta`` of ``delta_applied``."""

    name = "delta"

    def apply(self, weight: Tensor, mask: Tensor, location: tuple[str, str]) -> Tensor:
        return weight + mask


class Attachment:
    """Masks attached to a model. Use :func:`attach` to make one and :meth:`remove` to undo it.

    ``set_masks`` may be called any number of times (e.g. once per training step with a
    freshly sampled soft mask): it only swaps the tensors the parametrizations read.
    """

    def __init__(
        self,
        root: nn.Module,
        targets: Mapping[str, Target],
        ablation: Ablation,
        *,
        adapter: adapters.Adapter | None = None,
        model: object = None,
    ):
        self.root = root
        self._adapter = adapter
        self._model = model
        self._hooked = False
        self.targets = dict(targets)
        self.ablation = ablation
        groups: dict[tuple[str, str], list[Target]] = {}
        for target in self.targets.values():
            groups.setdefault(target.location, []).append(target)
        self._locations: list[_Location] = []
        self._removed = False
        self._handles: list = []
        if type(ablation) not in (Ablation, AddDelta) and any(
            adapters.is_dtensor(adapters.real_tensor(root.get_submodule(path), attribute))
            for path, attribute in groups
        ):
            raise ValueError(
                f"The {ablation.name!r} ablation does not work on FSDP-sharded weights; use zero "
                "ablation (the default), or run it on the unsharded model."
            )
        if type(ablation).hooks is not Ablation.hooks and compiled_anywhere(model, root):
            raise ValueError(
                f"The {ablation.name!r} ablation works through forward hooks, which the graph of "
                "a torch.compile-d model does not run when they are added after it was compiled "
                "(Dynamo does not guard on hooks: torch._dynamo.config.skip_nnmodule_hook_guards), "
                "so the model would silently compute without them. Use the uncompiled model for "
                "this ablation (`compiled._orig_mod`), or zero / reinit ablation."
            )
        ablation.prepare(model, root, self.targets)
        try:
            for (module_path, attribute), members in groups.items():
                module = root.get_submodule(module_path)
                slot = _Slot(ablation, (module_path, attribute))
                masking = _Masking(slot)
                if adapters.is_dtensor(adapters.real_tensor(module, attribute)):
                    shadow = _Shadow(module, attribute, masking)
                    self._locations.append(
                        _Location(module, attribute, members, slot, masking, None, shadow)
                    )
                    continue
                was_parametrized = parametrize.is_parametrized(module, attribute)
                order = None if was_parametrized else list(module._parameters)
                _own_class(module)  # parametrize edits the class: not a shared one
                with _version_kept(adapters.real_tensor(module, attribute)):
                    parametrize.register_parametrization(module, attribute, masking, unsafe=True)
                self._locations.append(_Location(module, attribute, members, slot, masking, order))
            for module in {id(loc.module): loc.module for loc in self._locations}.values():
                _share_class(module)
            self._handles = ablation.hooks(
                root, {loc.slot.location: loc.slot for loc in self._locations}
            )
            if adapter is not None:
                adapter.on_attach(model)
                self._hooked = True
        except BaseException:
            self.remove()
            raise

    def set_masks(self, masks: Mapping[str, Tensor], *, fill: float = 1.0) -> None:
        """Set the canonical masks (bool or float) the model computes with.

        Targets missing from ``masks`` keep every weight; regions of a fused tensor no mask
        covers get ``fill``. No validation here: callers on a hot path (training loops)
        validate once up front.
        """
        for loc in self._locations:
            loc.slot.compute = None
            loc.slot.checkpointed = False
            present = [t for t in loc.targets if t.name in masks]
            if loc.shadow is not None:
                # a sharded weight: build its real-layout mask only when the gathered weight is
                # read, so no more than one layer's mask exists at a time
                loc.slot.mask = None
                if present:
                    loc.slot.compute = _deferred(loc, dict(masks), present, fill)
                continue
            loc.slot.mask = _real_mask(loc, loc.real, masks, present, fill) if present else None

    def on_batch(self, batch: object) -> None:
        """Tell the ablation the model is about to run on ``batch`` (``PatchAblation`` runs the
        batch's counterfactual twin here); loops call it before every forward."""
        self.ablation.on_batch(batch)

    def shadow_reads(self) -> dict[str, int]:
        """How often each FSDP-sharded target's weight was read since the last call (the
        forward hooks count); resets the counts."""
        counts = {}
        for loc in self._locations:
            if loc.shadow is not None:
                for target in loc.targets:
                    counts[target.name] = loc.shadow.reads
                loc.shadow.reads = 0
        return counts

    def set_mask_functions(
        self, functions: Mapping[str, Callable[[], Tensor]], *, fill: float = 1.0
    ) -> None:
        """Like :meth:`set_masks`, but each canonical mask is computed by ``functions[name]()``
        when the model reads the weight, and again in the backward pass instead of keeping its
        intermediates (activation checkpointing of the mask). The functions must return the
        same values every time they are called until the next ``set_*`` call (sample noise from
        a generator seeded the same way each call). Training loops use this to keep memory per
        masked weight down to the masked weight itself.
        """
        if type(self.ablation) is not Ablation:  # ablations with hooks read slot.mask
            self.set_masks({n: f() for n, f in functions.items()}, fill=fill)
            return
        for loc in self._locations:
            loc.slot.mask = None
            present = [t for t in loc.targets if t.name in functions]
            loc.slot.checkpointed = bool(present)
            if not present:
                loc.slot.compute = None
                continue

            def compute(weight: Tensor, loc=loc, present=present) -> Tensor:
                masks = {t.name: functions[t.name]() for t in present}
                return _masked_weight(loc, weight, masks, present, fill)

            loc.slot.compute = compute

    def remove(self) -> None:
        """Detach every mask this attachment added; idempotent."""
        if self._removed:
            return
        self._removed = True
        errors: list[BaseException] = []
        for handle in self._handles:
            handle.remove()
        self._handles = []
        try:
            self.ablation.release()
        except BaseException as error:
            errors.append(error)
        for loc in reversed(self._locations):
            try:
                _remove_one(loc)
            except BaseException as error:  # keep restoring the others
                errors.append(error)
        self._locations.clear()
        if self._hooked:
            self._hooked = False
            try:
                self._adapter.on_detach(self._model)
            except BaseException as error:
                errors.append(error)
        if errors:
            raise errors[0]


def _masked_weight(
    loc: _Location, weight: Tensor, masks: Mapping[str, Tensor], present: list[Target], fill: float
) -> Tensor:
    """What the model computes with at ``loc``: the ablation applied with the real-layout mask."""
    mask = _real_mask(loc, weight, masks, present, fill)
    return loc.slot.ablation.apply(weight, mask, loc.slot.location)


def _deferred(loc: _Location, masks: Mapping[str, Tensor], present: list[Target], fill: float):
    return lambda weight: _masked_weight(loc, weight, masks, present, fill)


def _real_mask(
    loc: _Location, real: Tensor, masks: Mapping[str, Tensor], present: list[Target], fill: float
) -> Tensor:
    """The mask of one real tensor, in its layout and dtype, from canonical masks."""
    if len(loc.targets) == 1 and loc.targets[0].layout.is_identity:
        mask = masks[loc.targets[0].name]
    else:
        # where the targets' views tile the tensor, every entry is written below: no fill first
        covered = len(present) == len(loc.targets) and _tiles(loc, real)
        make = torch.empty if covered else partial(torch.full, fill_value=fill)
        mask = make(real.shape, dtype=real.dtype, device=real.device)
        for target in present:
            mask = target.layout.write_real(masks[target.name], mask)
    return mask if mask.dtype == real.dtype else mask.to(real.dtype)


def _tiles(loc: _Location, real: Tensor) -> bool:
    """Whether every entry of ``real`` lies in exactly one of ``loc``'s target views (checked
    once per location, by writing each target's index through its view and reading it back)."""
    if loc.tiles is None:
        owner = torch.full(real.shape, -1.0, device=real.device)
        for index, target in enumerate(loc.targets):
            owner = target.layout.write_real(torch.full(target.shape, float(index)), owner)
        loc.tiles = bool((owner >= 0).all()) and all(
            bool((t.layout.to_canonical(owner) == i).all()) for i, t in enumerate(loc.targets)
        )
    return loc.tiles


# The parametrized class of each (class, parametrized tensor names): ``register_parametrization``
# derives a new class every time, and ``torch.compile`` guards on a module's class, so without
# this a compiled model would compile again on every entry into ``si.masked``. A cache, not
# state: the classes are equal but for their identity. Held strongly (one small class per
# layer type): Dynamo's guards compare class ids, which a collected class's successor may reuse.
_SHARED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_SHARED = "_subnet_interp_shared"


def _share_class(module: nn.Module) -> None:
    """Give a module whose parametrizations are all masks the class every such module with the
    same original class and parametrized tensors has (the first one's). A module that also
    carries someone else's parametrization keeps its own class (its owner may edit it)."""
    cls = type(module)
    if not parametrize.is_parametrized(module) or cls.__module__ != parametrize.__name__:
        return
    if not all(isinstance(p, _Masking) for ps in module.parametrizations.values() for p in ps):
        return
    key = (cls.__bases__[0], tuple(sorted(module.parametrizations.keys())))
    names = {k for k, v in vars(cls).items() if isinstance(v, property)}
    if names != set(key[1]):  # properties that are not parametrize's: leave the class alone
        return
    shared = _SHARED_CLASSES.get(key)
    if shared is None:
        setattr(cls, _SHARED, True)
        _SHARED_CLASSES[key] = cls
    elif shared is not cls:
        module.__class__ = shared


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own again before ``parametrize`` edits it (it adds and
    deletes properties on the module's class, which other modules may share)."""
    cls = type(module)
    if not vars(cls).get(_SHARED, False):
        return
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__", _SHARED)}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


@contextlib.contextmanager
def _version_kept(tensor: Tensor) -> Iterator[None]:
    """Keep ``tensor``'s autograd version across parametrize's registration and removal.

    Both set the tensor to itself (``set_``), which leaves its data as it was but counts as an
    in-place change: a graph built on the unmasked model before ``si.masked`` (e.g. the full
    model's logits for a KL loss) would refuse to run backward. The counter is put back only
    where the data is still the same storage at the same place."""
    version, address = tensor._version, tensor.data_ptr()
    yield
    reset = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if reset is not None and tensor._version != version and tensor.data_ptr() == address:
        reset((tensor,), (version,))


def _remove_one(loc: _Location) -> None:
    module, attribute = loc.module, loc.attribute
    if loc.shadow is not None:
        loc.shadow.remove(module)
        loc.slot.mask = None
        loc.slot.compute = None
        return
    _own_class(module)  # parametrize edits the class: not a shared one
    plist = module.parametrizations[attribute]
    index = next(i for i, p in enumerate(plist) if p is loc.parametrization)
    if len(plist) == 1:
        with _version_kept(plist.original):
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        if loc.parameter_order is not None and attribute in module._parameters:
            params = module._parameters
            reordered = {k: params[k] for k in loc.parameter_order if k in params}
            reordered.update({k: v for k, v in params.items() if k not in reordered})
            params.clear()
            params.update(reordered)
    else:
        del plist[index]
        _share_class(module)  # still parametrized (an outer attachment): its shared class again
    loc.slot.mask = None
    loc.slot.compute = None


__all__ = ["ZERO", "AddDelta", "Ablation", "Attachment", "resolve_ablation"]
