"""Lean masked layers, and several mask samples in one forward pass.

While a learnable mask trains, every masked ``nn.Linear`` / transformers ``Conv1D`` gets an
instance-attribute ``forward`` that reads the unmasked weight, builds the masked weight from the
mask parameters and multiplies. Its autograd function keeps only the layer's input for backward
(which the layer keeps anyway); backward rebuilds the masked weight, so no masked weight, mask or
mask intermediate of any layer lives between forward and backward. Where the method trains the
weights too, backward also returns their gradient, taken through the same rebuilt product.

Gumbel-sigmoid masks (Csordás et al. 2021) see each batch through ``S`` independent mask
samples, sample ``s`` on the ``s``-th equal part of the batch. One sample at a time, that is
``S`` forward and backward passes on ``1/S`` of the batch each. Csordás' code instead applies the
``S`` masked weights of a layer to their parts of its input in one pass; so do these layers,
one sample's masked weight at a time, so the model runs once per step.

The maths and the order of every floating-point operation on the weights are those of the
layer-by-layer loop (same noise, same parts, same products): masks and scores come out
bit-identical (tested). A run is fused only where that holds: every targeted weight is a plain
``nn.Linear`` / ``Conv1D`` weight under zero ablation, and every such layer sees inputs whose
leading dimension is the batch's. The first forward that breaks this raises
:class:`NotFusable` before anything is updated, and the loop falls back to the layer-by-layer
path (or reports it, when ``sample_batching="fused"`` was asked for).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _loop, adapters
from ._ablations import Ablation
from ._attach import Attachment, _Location, _real_mask

SAMPLE_BATCHING = ("auto", "fused", "sequential")


class NotFusable(RuntimeError):
    """A forward pass cannot apply the mask samples side by side (the reason is the message)."""


def _is_linear(module: nn.Module) -> bool | None:
    """True for a plain ``nn.Linear``, False for transformers' ``Conv1D``, None otherwise
    (subclasses included: their forward may do more than the matmul)."""
    cls = adapters.model_class(module)  # through the class parametrize derives
    if cls is nn.Linear:
        return True
    return False if adapters.is_conv1d(module) else None


def unfusable_reason(attachment: Attachment) -> str | None:
    """Why ``attachment``'s masks cannot be applied side by side, or None if they can."""
    if type(attachment.ablation) is not Ablation:
        return f"training under the {attachment.ablation.name!r} ablation"
    for loc in attachment._locations:
        where = f"{loc.slot.location[0]}.{loc.attribute}"
        if loc.shadow is not None:
            return f"{where} is FSDP-sharded"
        if loc.attribute != "weight" or _is_linear(loc.module) is None:
            return f"{where} is not the weight of a plain nn.Linear or transformers Conv1D"
        if len(loc.module.parametrizations[loc.attribute]) != 1:
            return f"{where} carries another parametrization"
        if "forward" in vars(loc.module):
            return f"{where}'s layer has its forward replaced (e.g. by another library's hook)"
    return None


class SampleBatching:
    """The fused forwards of one run: install with :meth:`set_samples`, undo with :meth:`remove`."""

    def __init__(self, attachment: Attachment):
        self.attachment = attachment
        self.batch_size = 0
        self.installed: list[tuple[nn.Module, Callable]] = []  # (layer, its fused forward)

    def set_samples(
        self,
        functions: Sequence[Mapping[str, Callable[[Tensor], Tensor]]],
        params: Mapping[str, Tensor],
        batch_size: int,
        *,
        fill: float = 1.0,
    ) -> None:
        """Make every targeted layer compute sample ``s`` on part ``s`` of a batch of
        ``batch_size`` examples; ``functions[s][name](params[name])`` is that sample's mask of
        target ``name``. Nothing mask- or weight-sized is kept for backward: the backward pass
        rebuilds the masked weights from ``params`` (the functions must return the same values
        every call)."""
        self.batch_size = batch_size
        for loc in self.attachment._locations:
            loc.slot.mask = None
            loc.slot.checkpointed = False
            loc.slot.compute = _refuse(loc)  # a read outside the fused forward
            present = [t for t in loc.targets if t.name in params]

            def build(
                weight: Tensor, leaves: Sequence[Tensor], part: int, loc=loc, present=present
            ) -> Tensor:
                sample = functions[part]
                canonical = {
                    t.name: sample[t.name](leaf) for t, leaf in zip(present, leaves, strict=True)
                }
                return weight * _real_mask(loc, weight, canonical, present, fill)

            leaves = [params[t.name] for t in present]
            forward = _make_forward(loc, self, build, leaves, len(functions))
            loc.module.forward = forward
            self.installed.append((loc.module, forward))

    def remove(self) -> None:
        """Put every layer's own forward back and clear the masks; idempotent."""
        for module, forward in self.installed:
            if module.__dict__.get("forward") is forward:
                del module.forward
        self.installed = []
        for loc in self.attachment._locations:
            loc.slot.compute = None
            loc.slot.mask = None


def _refuse(loc: _Location) -> Callable[[Tensor], Tensor]:
    def compute(weight: Tensor) -> Tensor:
        raise NotFusable(
            f"{loc.slot.location[0]}.{loc.attribute} was read outside its layer's forward "
            "(the model uses the weight directly)"
        )

    return compute


def _make_forward(
    loc: _Location,
    batching: SampleBatching,
    build: Callable[[Tensor, Sequence[Tensor], int], Tensor],
    leaves: list[Tensor],
    parts: int,
) -> Callable[[Tensor], Tensor]:
    module = loc.module
    is_linear = bool(_is_linear(module))  # Linear stores [out, in]; Conv1D stores [in, out]

    def forward(x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[0] != batching.batch_size:
            raise NotFusable(
                f"{loc.slot.location[0]} sees inputs of shape {tuple(x.shape)}, whose leading "
                f"dimension is not the batch's ({batching.batch_size} examples)"
            )
        weight = parametrize_original(module, loc.attribute)
        if torch.is_grad_enabled():
            return _LeanMaskedMatmul.apply(x, weight, module.bias, build, is_linear, parts, *leaves)
        with torch.no_grad():
            return _matmul(x, weight, module.bias, build, leaves, parts, is_linear)

    return forward


def part_bounds(batch_size: int, parts: int) -> list[tuple[int, int]]:
    """Where each part of a batch starts and ends: ``torch.tensor_split``'s parts (equal, or
    the first ``batch_size % parts`` one example longer), as the sequential loop splits it."""
    size, extra = divmod(batch_size, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _matmul(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    build: Callable[[Tensor, Sequence[Tensor], int], Tensor],
    leaves: Sequence[Tensor],
    parts: int,
    is_linear: bool,
) -> Tensor:
    """Part ``s`` of ``x`` (along dim 0, as :func:`part_bounds`) times sample ``s``'s masked
    weight, plus ``bias``; one masked weight exists at a time. Each part goes through the
    layer's own operation (``F.linear`` for ``nn.Linear``, ``addmm`` for ``Conv1D``), so a
    part's output is the one the layer-by-layer path computes, and the bias is added inside the
    matmul."""
    examples = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, positions, in]
    out = None
    for part, (start, end) in enumerate(part_bounds(x.shape[0], parts)):
        rows = examples[start:end].reshape(-1, x.shape[-1])
        masked = build(weight, leaves, part)
        masked = masked.to(rows.dtype) if masked.dtype != rows.dtype else masked
        if is_linear:
            piece = torch.nn.functional.linear(rows, masked, bias)
        elif bias is None:
            piece = rows @ masked
        else:
            piece = torch.addmm(bias, rows, masked)
        if parts == 1:
            out = piece
            break
        if out is None:
            out = piece.new_empty((examples.shape[0] * examples.shape[1], piece.shape[-1]))
        out[start * examples.shape[1] : end * examples.shape[1]] = piece
    assert out is not None
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """``out[...] = a @ b``, the product written in place where the dtypes allow it."""
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


class _LeanMaskedMatmul(torch.autograd.Function):
    """:func:`_matmul`, keeping only the input (which the layer keeps anyway) for backward: the
    masked weights are rebuilt there, one sample at a time, and their gradient is taken back to
    the mask parameters."""

    @staticmethod
    def forward(ctx, x, weight, bias, build, is_linear, parts, *leaves):
        ctx.build, ctx.is_linear, ctx.parts = build, is_linear, parts
        ctx.save_for_backward(x, weight, *leaves)
        return _matmul(x, weight, bias, build, leaves, parts, is_linear)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *leaves = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        per_example = rows.shape[0] // x.shape[0]
        grad_x = x.new_empty(rows.shape) if ctx.needs_input_grad[0] else None
        copies = [leaf.detach().requires_grad_(leaf.requires_grad) for leaf in leaves]
        trained = [c for c in copies if c.requires_grad]
        if ctx.needs_input_grad[1]:  # a method that trains the weights with the mask
            weight = weight.detach().requires_grad_()
            trained.append(weight)
        sums: list[Tensor | None] = [None] * len(trained)
        for part, (start, end) in enumerate(part_bounds(x.shape[0], ctx.parts)):
            lo, hi = start * per_example, end * per_example
            with torch.enable_grad():
                masked = ctx.build(weight, copies, part)
            dy, inputs = grad_rows[lo:hi], rows[lo:hi].to(grad_rows.dtype)
            plain = masked.detach().to(dy.dtype)
            if ctx.is_linear:  # y = x W^T: dx = dy W, dW = dy^T x
                if grad_x is not None:
                    _mm_into(grad_x[lo:hi], dy, plain)
                grad_masked = dy.t() @ inputs
            else:  # y = x W: dx = dy W^T, dW = x^T dy
                if grad_x is not None:
                    _mm_into(grad_x[lo:hi], dy, plain.t())
                grad_masked = inputs.t() @ dy
            if trained:
                found = torch.autograd.grad(masked, trained, grad_masked.to(masked.dtype))
                sums = [
                    g if total is None else total + g for total, g in zip(sums, found, strict=True)
                ]
        gathered = iter(sums)
        grad_leaves = [next(gathered) if c.requires_grad else None for c in copies]
        grad_weight = next(gathered) if ctx.needs_input_grad[1] else None
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_weight, grad_bias, None, None, None, *grad_leaves


def parametrize_original(module: nn.Module, attribute: str) -> Tensor:
    """The unmasked tensor under this module's (single) parametrization."""
    assert parametrize.is_parametrized(module, attribute)
    return module.parametrizations[attribute].original


def sample_batching(plan: Any, attachment: Attachment) -> SampleBatching | None:
    """The fused forwards of a run where its layers allow them, else None. A method that
    trains the weights too (continuous sparsification) gets the weights' gradients from the
    same rebuilt masked weight."""
    asked = plan.context.sample_batching
    if asked == "sequential":
        return None
    reason = unfusable_reason(attachment)
    if reason is None:
        return SampleBatching(attachment)
    if asked == "fused":
        raise ValueError(_not_fused_message(reason))
    return None


def _not_fused_message(reason: str) -> str:
    return (
        f"sample_batching='fused' cannot apply the mask samples side by side: {reason}. Use "
        "sample_batching='auto' (falls back to one sample at a time) or 'sequential'."
    )


def fused_loss(
    plan: Any,
    batch: Any,
    size: int,
    step: int,
    samplers: Callable[[], Mapping[str, Callable[[Tensor], Tensor]]],
    params: Mapping[str, Tensor],
) -> Tensor | None:
    """Every mask sample on its part of the batch in one forward and backward; None (nothing
    done) when the model turns out not to allow it, after which the run is sequential."""
    context, fused = plan.context, plan.fused
    functions = [samplers() for _ in range(plan.samples)]  # the sequential loop's seeds
    try:
        fused.set_samples(functions, params, size)
        try:
            loss = context.loss_fn(context.model, batch)
        except NotFusable as reason:
            if context.sample_batching == "fused":
                raise ValueError(_not_fused_message(str(reason))) from None
            plan.fused = None
            return None
        _loop.check_loss(loss, step)
        plan.watch.observe(loss, step, plan.world)
        loss.backward()
    finally:
        fused.remove()
    return loss.detach()


__all__ = [
    "SAMPLE_BATCHING",
    "NotFusable",
    "SampleBatching",
    "fused_loss",
    "sample_batching",
    "unfusable_reason",
]
