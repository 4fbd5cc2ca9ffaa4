"""What every subnetwork-finding method provides, and the context ``si.find`` hands it."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._subnetwork import Subnetwork
from .._types import Target

LossFn = Callable[[Any, Any], Tensor]
Callback = Callable[[int, Mapping[str, float]], None]


@dataclass
class FindContext:
    """Everything a method needs for one run; built and validated by ``si.find``."""

    model: Any  # the object the user passed (a wrapper or an nn.Module)
    root: nn.Module  # the module holding the targeted tensors
    targets: Mapping[str, Target]
    loss_fn: LossFn
    batches: Iterator[Any]  # endless, already on ``device``
    steps: int
    device: torch.device
    generator: torch.Generator  # on ``device``
    adapter: Any = None  # the model family's adapter (subnet_interp.adapters.Adapter)
    callbacks: Sequence[Callback] = ()
    progress: bool = True
    log_every: int = 10
    mask_dtype: torch.dtype = torch.float32  # learnable methods' gate parameters
    mask_optimizer: str = "paper"  # or "adafactor"
    recompute_masks: bool = False  # sample masks when weights are read, recompute in backward
    extra_parameters: Sequence[Tensor] = ()  # trained alongside the masks (e.g. a probe)
    extra_lr: float = 1e-3
    checkpoint: Any = None  # path of the run's checkpoint (resumed if it exists)
    checkpoint_every: int = 100
    mesh: Any = None  # the device mesh of an FSDP2-sharded model; mask parameters shard on it
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FindResult:
    """What ``si.find`` returns.

    Attributes:
        subnetwork: the binary mask found.
        history: per logged step, the values the method tracked (``step``, ``loss``,
            ``penalty``, ``density``, ...), each a list of floats of equal length.
        weights: for methods that train weights, the weights the subnetwork needs, keyed by
            canonical target name: the rewound weights of a ticket (``lottery_ticket``,
            ``continuous_sparsification``) to retrain it, the fine-tuned weights
            ``theta_0 + delta`` for ``lt_sft``; ``None`` otherwise.
        delta: for ``lt_sft``, the sparse difference ``theta - theta_0`` (zero outside the
            subnetwork), to apply with ``si.delta_applied`` or compose with other deltas.
        state: for methods that train weights, the full ``state_dict`` matching ``weights``
            (biases and norms included), to load into a copy of the model.
    """

    subnetwork: Subnetwork
    history: Mapping[str, list[float]]
    weights: Mapping[str, Tensor] | None = None
    delta: Mapping[str, Tensor] | None = None
    state: Mapping[str, Tensor] | None = None


class Method(abc.ABC):
    """Base of every registered method: a frozen dataclass of paper-default hyper-parameters."""

    name: ClassVar[str]
    # Declared properties: what the method does, read by si.find and si.testing.check_method.
    trains_weights: ClassVar[bool] = False  # trains weights (on a copy): returns ``weights``
    needs_steps: ClassVar[bool] = True  # takes ``steps``; False for one-shot methods
    learns_from_loss: ClassVar[bool] = True  # False for baselines that never read the loss
    returns_delta: ClassVar[bool] = False  # returns a sparse ``delta`` (sparse fine-tuning)

    @abc.abstractmethod
    def run(self, context: FindContext) -> FindResult:
        """Find a subnetwork. Must leave the user's model bit-exactly unchanged."""

    def hparams(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


__all__ = ["Callback", "FindContext", "FindResult", "LossFn", "Method"]
