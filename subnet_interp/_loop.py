"""Pieces every training loop shares: the mask loop (``_train``) and the weight-training loop
of the methods that train weights (``methods/_weights``).

Endless batches, the checks of what ``loss_fn`` returned, the error that stops a run at a
non-finite loss, the progress bar and the per-step report to callbacks. This module imports no
method and no loop, so both loops can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import _distributed
from ._subnetwork import Subnetwork


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


def check_loss(loss: Any, step: int) -> None:
    """Refuse what ``loss_fn`` returned unless it is a scalar tensor with a gradient path."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError(
            f"loss_fn must return a scalar tensor; at step {step} it returned "
            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}. "
            "Reduce it, e.g. with `.mean()`."
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a tensor that does not depend on the masks (requires_grad is "
            "False; for a method that trains weights, on the weights). Compute the loss from "
            "the model's output inside loss_fn, and do not wrap it in torch.no_grad()."
        )


class FiniteWatch:
    """Whether every loss so far was finite, kept on the device: no host sync per step.

    :meth:`observe` notes each loss; :func:`step_while_finite` skips the updates on the
    device once one was not finite (as ``torch.amp.GradScaler`` does), so the parameters stay
    as of the last good step; :meth:`check` reads the flag on the host, at log points, and
    raises :class:`NonFiniteLossError` with the first non-finite step and its loss, as a check
    at that step would have.
    """

    def __init__(self) -> None:
        self.ok: Tensor | None = None  # 0-dim bool: no loss so far was non-finite
        self.step: Tensor | None = None  # 0-dim int64: the first non-finite step, else -1
        self.value: Tensor | None = None  # that step's loss (this rank's)

    def observe(self, loss: Tensor, step: int, world: _distributed.World | None) -> None:
        """Note ``loss`` (of ``step``); non-finite on any rank counts on every rank."""
        loss = loss.detach()
        finite = _distributed.finite_everywhere(loss, world)
        if self.ok is None:
            self.ok = torch.ones((), dtype=torch.bool, device=loss.device)
            self.step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.value = torch.zeros_like(loss)
        first = self.ok & ~finite
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)
        self.ok = self.ok & finite

    def check(self, subnetwork: Callable[[], Subnetwork]) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank alike) if a loss was not finite.

        Args:
            subnetwork: called only then; the mask as of the last good step, for the error.
        """
        if self.ok is not None and not bool(self.ok):  # the one host read, at a log point
            raise NonFiniteLossError(int(self.step), float(self.value), subnetwork())


def step_while_finite(optimizer: torch.optim.Optimizer, watch: FiniteWatch) -> None:
    """``optimizer.step()``, skipped once a loss was not finite.

    Where the flag lives on the CPU, reading it waits for no device: the whole step is taken or
    skipped on the host. On an accelerator it is skipped on the device
    (:func:`step_skipping_on_device`).
    """
    ok = watch.ok
    if ok is None:
        optimizer.step()
    elif ok.device.type == "cpu":
        if bool(ok):  # no copy of the parameters, no pass over them to restore them
            optimizer.step()
    else:
        step_skipping_on_device(optimizer, ok)


def step_skipping_on_device(optimizer: torch.optim.Optimizer, ok: Tensor) -> None:
    """``optimizer.step()`` where the 0-dim bool ``ok`` (on the device) is true, without reading
    it on the host.

    An optimiser that takes ``found_inf`` (the fused ones, as ``GradScaler`` uses them) skips
    the whole step, its step count included. Any other steps, then puts its parameters back
    where the flag says so; its own state may take the skipped step, which does not matter:
    the run stops at the next log point, and only the parameters are kept (in the error).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    with torch.no_grad():
        before = [_distributed.local(p.detach()).clone() for p in params]
        optimizer.step()
        for param, old in zip(params, before, strict=True):
            value = _distributed.local(param.detach())  # this rank's part, in place
            torch.where(ok.to(value.device), value, old, out=value)  # True: bit-exactly the step


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


def skip(batches: Iterator[Any], count: int) -> None:
    """Advance ``batches`` by ``count`` (a resumed run continues at the data position of an
    uninterrupted one: one batch per step)."""
    for _ in range(count):
        next(batches)


def progress_bar(total: int, description: str, *, show: bool, rank: int = 0) -> tqdm:
    """A transient progress bar, shown by rank 0 only."""
    return tqdm(total=total, disable=not show or rank != 0, desc=description, leave=False)


def report(
    step: int,
    record: Mapping[str, float],
    callbacks: Sequence[Callable[[int, Mapping[str, float]], None]],
    bar: tqdm | None = None,
) -> None:
    """Show a logged step's loss and density on the bar, then pass the record to callbacks."""
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.4g}", density=f"{record['density']:.4f}")
    for callback in callbacks:
        callback(step, record)


def stacked(values: Sequence[Tensor]) -> Tensor:
    """Detached float32 values as one tensor (history is kept on the device: no host sync)."""
    return torch.stack([v.detach().float() for v in values])


def split_batch(batch: Any, parts: int, size: int | None = None) -> list[Any]:
    """Split a batch (tensor, tuple/list, or mapping of them) into ``parts`` along dim 0.

    Only tensors whose leading dimension is the batch's (``size``, default
    :func:`batch_size`: the first tensor's) are split; any other tensor (e.g. class weights
    in a tuple) goes whole to every part, as non-tensor leaves do."""
    if parts == 1:
        return [batch]
    if size is None:
        size = batch_size(batch)
    if isinstance(batch, Tensor) and batch.dim() > 0 and batch.shape[0] != size:
        return [batch] * parts
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] < parts:
            raise ValueError(
                f"Cannot split a batch of {tuple(batch.shape)} into {parts} mask samples: the "
                f"batch needs at least {parts} examples. Use bigger batches or fewer mask "
                "samples (e.g. mask_samples=1)."
            )
        return list(torch.tensor_split(batch, parts, dim=0))
    if isinstance(batch, Mapping):
        pieces = {k: split_batch(v, parts, size) for k, v in batch.items()}
        return [_same_mapping(batch, {k: pieces[k][i] for k in batch}) for i in range(parts)]
    if isinstance(batch, (tuple, list)):
        pieces = [split_batch(v, parts, size) for v in batch]
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


__all__ = [
    "FiniteWatch",
    "NonFiniteLossError",
    "batch_size",
    "check_loss",
    "endless",
    "progress_bar",
    "report",
    "skip",
    "split_batch",
    "stacked",
    "step_skipping_on_device",
    "step_while_finite",
]
