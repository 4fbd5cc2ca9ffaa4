"""The probe of subnetwork probing and what it reads: :class:`Probe`, the features it takes at
token or sequence level, its loss and its accuracy through a subnetwork.

Data is an iterable of ``(inputs, labels)`` batches (see :mod:`subnet_interp.probing`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from . import adapters
from ._find import to_device
from ._hidden import device_of, evaluating, read_hidden
from ._masked import masked
from ._subnetwork import Subnetwork

LEVELS = ("token", "sequence")
IGNORE_INDEX = -100


class Probe(nn.Module):
    """A probe from a hidden state to class logits: linear (Cao et al. 2021's choice), or one
    hidden ReLU layer of width ``hidden``.

    Weights are drawn like ``nn.Linear``'s (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) from
    ``generator`` (default: seed 0), so a probe is reproducible.
    """

    def __init__(
        self,
        d_model: int,
        n_classes: int,
        hidden: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_classes", n_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if n_classes < 2:
            raise ValueError(f"A probe needs at least 2 classes, got n_classes={n_classes}.")
        if hidden is not None and (
            not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1
        ):
            raise ValueError(
                f"`hidden` must be None (a linear probe) or a positive int, got {hidden!r}."
            )
        self.d_model, self.n_classes, self.hidden = d_model, n_classes, hidden
        if hidden is None:
            self.net = nn.Sequential(nn.Linear(d_model, n_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
            )
        source = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for tensor in (layer.weight, layer.bias):
                        tensor.copy_((torch.rand(tensor.shape, generator=source) * 2 - 1) * bound)

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch n_classes"]:
        return self.net(x)


def split_probe_batch(batch: Any) -> tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], Tensor):
        raise TypeError(
            "Probing data must yield (inputs, labels) pairs, with labels a tensor of class "
            f"indices; got a {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    return batch[0], batch[1]


def check_level(level: str, position: int | None) -> None:
    if level not in LEVELS:
        raise ValueError(f"`level` must be 'token' or 'sequence', got {level!r}.")
    if position is not None and level != "sequence":
        raise ValueError(
            "`position` chooses the token read at sequence level; use level='sequence'."
        )


def probe_features(hidden: Tensor, inputs: Any, level: str, position: int | None) -> Tensor:
    """What the probe reads: every token, one token, or the mean over (unpadded) tokens."""
    if level == "token" or hidden.dim() == 2:
        return hidden
    if position is not None:
        return hidden[:, position]
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(attention, Tensor) and tuple(attention.shape) == tuple(hidden.shape[:2]):
        weights = attention.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return hidden.mean(1)


def logits_and_labels(
    hidden: Tensor, inputs: Any, labels: Tensor, probe: Probe, level: str, position: int | None
) -> tuple[Tensor, Tensor]:
    features = probe_features(hidden, inputs, level, position)
    expected = tuple(features.shape[:-1])
    if tuple(labels.shape) != expected:
        want = "[batch, seq]" if level == "token" else "[batch]"
        raise ValueError(
            f"At {level} level the labels must be {want} = {expected} to match the hidden "
            f"state {tuple(hidden.shape)}, got {tuple(labels.shape)}."
            + (" For one label per sequence use level='sequence'." if level == "token" else "")
        )
    weight = probe.net[0].weight
    logits = probe(features.to(weight.dtype))
    return logits.reshape(-1, probe.n_classes), labels.reshape(-1).to(logits.device)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    # sum / count rather than the mean, so a batch whose labels are all ignored gives 0, not NaN
    total = nn.functional.cross_entropy(
        logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def probe_loss(
    model: Any,
    probe: Probe,
    layer: int | str,
    batch: Any,
    *,
    level: str = "token",
    position: int | None = None,
) -> Tensor:
    """Cross-entropy of ``probe`` on the hidden state after block ``layer`` for one
    ``(inputs, labels)`` batch; labels ``-100`` are ignored."""
    inputs, labels = split_probe_batch(batch)
    hidden = read_hidden(model, layer, inputs)
    return cross_entropy(*logits_and_labels(hidden, inputs, labels, probe, level, position))


def probe_accuracy(
    model: Any,
    subnetwork: Subnetwork | None,
    probe: Probe,
    layer: int | str,
    data: Iterable[Any],
    level: str = "token",
    *,
    position: int | None = None,
) -> float:
    """Accuracy of ``probe`` on ``data`` (``(inputs, labels)`` batches), reading the hidden
    state after block ``layer`` while the model computes with ``subnetwork`` (``None``: the
    full model). Labels ``-100`` are not counted; the model is in eval mode meanwhile."""
    check_level(level, position)
    root = adapters.resolve(model).root(model)
    device = device_of(root)
    correct = torch.zeros((), dtype=torch.long)
    counted = 0
    context = masked(model, subnetwork) if subnetwork is not None else contextlib.nullcontext()
    with torch.no_grad(), evaluating(root), context:
        for batch in data:
            inputs, labels = split_probe_batch(to_device(batch, device))
            hidden = read_hidden(model, layer, inputs)
            logits, flat = logits_and_labels(hidden, inputs, labels, probe, level, position)
            keep = flat != IGNORE_INDEX
            correct += (logits.argmax(-1)[keep] == flat[keep]).sum().cpu()
            counted += int(keep.sum())
    if counted == 0:
        raise ValueError("`data` has no labelled examples (every label is -100, or it is empty).")
    return float(correct) / counted


def probe_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def _first_batch(data: Iterable[Any]) -> Any:
    for batch in data:
        return batch
    raise ValueError("`data` yielded no batches; pass a list of (inputs, labels) batches.")


def make_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    hidden: int | None,
    seed: int,
) -> Probe:
    root = adapters.resolve(model).root(model)
    inputs, _ = split_probe_batch(to_device(_first_batch(data), device_of(root)))
    with torch.no_grad(), evaluating(root):
        width = read_hidden(model, layer, inputs).shape[-1]
    probe = Probe(int(width), n_classes, hidden, generator=torch.Generator().manual_seed(seed))
    return probe.to(device_of(root))


__all__ = ["IGNORE_INDEX", "LEVELS", "Probe", "probe_accuracy", "probe_loss"]
