"""Two-digit addition / multiplication modulo 100 (Csordás, van Steenkiste & Schmidhuber 2021).

As in their ``double_op`` data set: two numbers in ``[0, 10**digits)`` and an operation
(``0`` add, ``1`` multiply). The input is each digit one-hot (least significant first) for both
numbers followed by a one-hot operation code (``2 * digits * 10 + 2`` features); the target is
the result modulo ``10**digits`` as ``digits`` classes of 10, trained with a cross-entropy per
digit. An example counts as correct when every digit is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

OPS = {"add": 0, "mul": 1}


def encode(a: Tensor, b: Tensor, op: Tensor, digits: int = 2) -> Tensor:
    """Digit one-hots of ``a`` and ``b`` and the op one-hot, ``[n, 2 * digits * 10 + 2]``."""
    parts = []
    for number in (a, b):
        for position in range(digits):
            parts.append(nn.functional.one_hot((number // 10**position) % 10, 10))
    parts.append(nn.functional.one_hot(op, 2))
    return torch.cat(parts, dim=1).float()


def add_mul_batches(
    n_batches: int,
    batch_size: int = 128,
    *,
    ops: tuple[str, ...] = ("add", "mul"),
    digits: int = 2,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Batches of ``(inputs, target digits)``; ``ops`` restricts the operations (e.g. ``("add",)``)."""
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise ValueError(f"ops must be a non-empty subset of {list(OPS)}, got {ops!r}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    codes = torch.tensor([OPS[o] for o in ops])
    out = []
    for _ in range(n_batches):
        a = torch.randint(0, 10**digits, (batch_size,), generator=gen)
        b = torch.randint(0, 10**digits, (batch_size,), generator=gen)
        op = codes[torch.randint(0, len(codes), (batch_size,), generator=gen)]
        result = torch.where(op == 0, a + b, a * b) % 10**digits
        target = torch.stack([(result // 10**p) % 10 for p in range(digits)], dim=1)
        out.append((encode(a, b, op, digits), target))
    return out


def digit_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy over the result digits."""
    inputs, target = batch
    logits = model(inputs).view(len(inputs), target.shape[1], 10)
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def exact_accuracy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Fraction of examples with every result digit right."""
    inputs, target = batch
    logits = model(inputs).view(len(inputs), target.shape[1], 10)
    return (logits.argmax(-1) == target).all(dim=1).float().mean()


def add_mul_network(
    hidden: tuple[int, ...] = (256, 256, 256), digits: int = 2, seed: int = 0
) -> nn.Sequential:
    """The FNN of the task: ReLU layers (the paper uses 4 x 2000; smaller here for CPUs)."""
    torch.manual_seed(seed)
    sizes = [2 * digits * 10 + 2, *hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], digits * 10))
    return nn.Sequential(*layers)
