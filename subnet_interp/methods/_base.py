"""The method interface: what every subnetwork-finding method provides, and what it is handed.

``si.find`` validates its arguments into a :class:`FindContext` and calls :meth:`Method.run`,
which returns a :class:`FindResult`. Methods that learn a mask by gradient descent subclass
:class:`MaskMethod` instead and implement only the gate maths; the shared loop
(``subnet_interp._train.train_masks``) runs them, passing a :class:`TrainState` to every hook.

Checkpoint contract (``si.find(..., checkpoint=path)``): the loop saves and restores the mask
parameters, the optimisers, the schedule fields of :class:`TrainState`, the history and the
state of the mask-sampling generator. State a method keeps of its own between steps (in
``TrainState.aux``, e.g. Lagrange multipliers and their optimiser) is saved only through
:meth:`MaskMethod.extra_state` and restored through :meth:`MaskMethod.load_extra_state`; a
method without such state needs neither.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._ablations import ZERO, Ablation
from .._distributed import is_dtensor
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
    sample_batching: str = "auto"  # several mask samples: side by side in one forward, or not
    extra_parameters: Sequence[Tensor] = ()  # trained alongside the masks (e.g. a probe)
    extra_lr: float = 1e-3
    checkpoint: Any = None  # path of the run's checkpoint (resumed if it exists)
    checkpoint_every: int = 100
    mesh: Any = None  # the device mesh of an FSDP2-sharded model; mask parameters shard on it
    # what a checkpoint must match to be resumed (method, hyper-parameters, steps, targets,
    # model fingerprint, ...): JSON values; a checkpoint with another identity is refused
    run_identity: Mapping[str, Any] = field(default_factory=dict)
    # what removed weights compute while the mask trains (si.Ablation; zero ablation by default)
    ablation: Ablation = ZERO
    # si.find's init_scores: per target, the keep probability each weight starts with (float,
    # the target's shape); None: the method's own initialisation
    init_probabilities: Mapping[str, Tensor] | None = None


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
        scores: the continuous score every weight ends with (float32, keyed and shaped like
            ``subnetwork.masks``, on the same device; per-gate scores of ``granularity="neuron"``
            or ``"head"`` expanded to every weight of the gate). Higher means more important;
            each method's docstring (``scores`` / ``_scores``) says what it is and whether its
            mask is the top ``subnetwork.kept()`` of them. ``si.find`` fills it for every
            registered method; cut masks of any size from it with :meth:`at_density`,
            :meth:`at_count` or ``si.Subnetwork.from_scores``.
    """

    subnetwork: Subnetwork
    history: Mapping[str, list[float]]
    weights: Mapping[str, Tensor] | None = None
    delta: Mapping[str, Tensor] | None = None
    state: Mapping[str, Tensor] | None = None
    scores: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.scores is not None:
            object.__setattr__(self, "scores", MappingProxyType(dict(self.scores)))

    def at_density(self, density: float, *, per_target: bool = False) -> Subnetwork:
        """The subnetwork of exactly ``round(density * N)`` top-scored weights (``N`` all the
        weights; with ``per_target``, ``round(density * n)`` of each target's ``n``), ties
        broken by position (``si.Subnetwork.from_scores``). Its meta is the found
        subnetwork's plus ``cut_from_scores=True``, ``density_requested``,
        ``count_requested`` (``None``) and ``per_target``."""
        return self._cut(density=density, per_target=per_target)

    def at_count(self, count: int) -> Subnetwork:
        """The subnetwork of exactly the ``count`` top-scored weights over all targets
        (ties broken by position); meta as :meth:`at_density`'s, with ``count_requested``."""
        return self._cut(count=count)

    def _cut(self, **size: Any) -> Subnetwork:
        if self.scores is None:
            raise ValueError(
                "This FindResult has no `scores` (it was built without them, e.g. by a method "
                "written before scores existed); cut a mask from scores with "
                "si.Subnetwork.from_scores(your_scores, density=...) instead."
            )
        return Subnetwork.from_scores(self.scores, meta=self.subnetwork.meta, **size)


class Method(abc.ABC):
    """Base of every registered method: a frozen dataclass of paper-default hyper-parameters."""

    name: ClassVar[str]
    # Declared properties: what the method does, read by si.find and si.testing.check_method.
    trains_weights: ClassVar[bool] = False  # trains weights (on a copy): returns ``weights``
    needs_steps: ClassVar[bool] = True  # takes ``steps``; False for one-shot methods
    learns_from_loss: ClassVar[bool] = True  # False for baselines that never read the loss
    returns_delta: ClassVar[bool] = False  # returns a sparse ``delta`` (sparse fine-tuning)
    # scores weights by the loss gradient at the given weights, without training (one-shot
    # attribution): tested on a task whose loss is off its minimum, where gradients are non-zero
    scores_from_gradient: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, context: FindContext) -> FindResult:
        """Find a subnetwork. Must leave the user's model bit-exactly unchanged."""

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters, as a dict of the dataclass's fields."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class TrainState:
    """Mutable per-run state of a learnable-mask method; the loop updates the schedule fields
    before every step and the method's hooks read (and may write) them.

    Attributes:
        step: the step about to run (0-based), of ``total_steps``.
        round, rounds, round_step, steps_per_round: for methods with ``rounds() > 1``, the
            current round, the step within it and each round's length.
        temperature: a method's sampling temperature (its ``on_step`` sets it); logged.
        batch_size: examples in the current batch (before splitting among mask samples);
            under torch.distributed, in the global batch if ``reads_batch_size()`` is true.
        aux: the method's own values kept between steps (methods are frozen configurations,
            so they cannot hold them). Checkpointed only through ``MaskMethod.extra_state``.
            Under FSDP2, a plain tensor here whose gradient came back sharded (it met sharded
            mask parameters in the regulariser) gets the whole gradient before ``after_step``.
    """

    step: int
    total_steps: int
    round: int = 0
    rounds: int = 1
    round_step: int = 0
    steps_per_round: int = 0
    temperature: float = 1.0
    batch_size: int = 1
    aux: dict[str, Any] = field(default_factory=dict)


class MaskMethod(Method):
    """A method that learns a mask by gradient descent on per-gate parameters.

    Subclasses (frozen dataclasses) implement the gate maths; the shared loop
    (``subnet_interp._train.train_masks``) runs them. The ``granularity`` field of every
    subclass chooses one gate per weight (``"weight"``), per unit (``"neuron"``) or per
    attention head (``"head"``).
    """

    granularity: str
    # the mask optimiser of si.find(memory="lean"): "adafactor" where planted recovery survives
    # it (tests/test_methods_conformance.py), else the paper's
    lean_mask_optimizer: ClassVar[str] = "adafactor"

    def rounds(self) -> int:
        """Training rounds (``on_round_end`` runs between them); steps split evenly."""
        return 1

    def samples_per_batch(self) -> int:
        """Independent mask samples per batch; the batch is split evenly among them."""
        return 1

    def reads_batch_size(self) -> bool:
        """Whether the method reads ``TrainState.batch_size`` (under torch.distributed it is
        then summed over the ranks every step, one small all-reduce)."""
        return False

    @abc.abstractmethod
    def init_parameters(
        self,
        target: Target,
        gate_shape: tuple[int, ...],
        weight: Tensor,
        generator: torch.Generator,
    ) -> Tensor:
        """Initial mask parameters for one target (a float tensor of ``gate_shape``)."""

    def params_for_probability(self, probability: Tensor) -> Tensor:
        """Mask parameters whose gates start kept with ``probability`` (float, gate shape, in
        (0, 1)): how ``si.find(..., init_scores=)`` warm-starts the method from scores. The
        registered methods invert their own keep probability; a method without one refuses."""
        raise TypeError(
            f"{self.name} does not say how a keep probability maps to its mask parameters, so "
            "it cannot start from `init_scores`; override `params_for_probability`, or leave "
            "init_scores unset."
        )

    @abc.abstractmethod
    def sample(self, params: Tensor, state: TrainState, generator: torch.Generator) -> Tensor:
        """The (soft, differentiable) gate values used for one forward pass."""

    @abc.abstractmethod
    def penalty(
        self, params: Sequence[Tensor], weights: Sequence[int], state: TrainState
    ) -> Tensor:
        """The sparsity regulariser; ``weights[i]`` is how many weights gate tensor i covers each."""

    @abc.abstractmethod
    def final_mask(self, params: Tensor) -> Tensor:
        """The binary mask (bool, gate shape) the parameters stand for."""

    def scores(self, params: Tensor) -> Tensor:
        """The continuous score of each gate (float, gate shape; higher keeps sooner), filled
        into ``FindResult.scores``. Override with the method's own (a probability, an
        expected gate); ``final_mask`` should be ``scores(params) > threshold``. Default: the
        final mask as 0.0 / 1.0, which ranks kept gates first but orders nothing else."""
        return self.final_mask(params).to(torch.float32)

    @abc.abstractmethod
    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        """The optimiser of the mask parameters (the paper's)."""

    def weight_optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer | None:
        """For methods that train weights jointly with the mask (``trains_weights``)."""
        return None

    def rewind_step(self, steps_per_round: int) -> int | None:
        """Step (of the first round) whose weights the ticket keeps; ``None``: no rewinding."""
        return None

    def on_step(self, state: TrainState) -> None:
        """Update schedules (temperature, ...) before step ``state.step``."""

    def after_step(self, state: TrainState) -> None:
        """After the mask optimiser's step (e.g. a dual ascent step)."""

    def on_round_end(self, params: Sequence[Tensor], state: TrainState) -> None:
        """Between rounds (methods with ``rounds() > 1``): e.g. reset parameters."""

    def grad_clip(self) -> float | None:
        """Max norm the mask parameters' gradients are clipped to; ``None``: no clipping."""
        return None

    def penalty_separable(self) -> bool:
        """Whether ``penalty(params, weights, state)`` is the sum over targets of
        ``penalty([p], [w], state)``, so that one target's gradient of it can be taken alone.
        Then (with no gradient clipping) each mask's optimiser can step inside backward, as soon
        as its gradient is complete, and no full set of mask gradients is ever held."""
        return False

    def extra_state(self, state: TrainState) -> dict[str, Any]:
        """The method's own state to checkpoint after a step (what it keeps in ``state.aux``).

        Values may be tensors, JSON values (numbers, strings, bools, ``None``) and dicts,
        lists and tuples of them, e.g. an optimiser's ``state_dict()``; they come back with
        the same types (tensors on the CPU). Default: nothing.
        """
        return {}

    def load_extra_state(
        self, state: TrainState, saved: Mapping[str, Any], device: torch.device
    ) -> None:
        """Restore what :meth:`extra_state` returned into ``state.aux`` when a run resumes.

        Called only if ``saved`` is not empty, after ``state``'s schedule fields are restored.
        ``saved`` holds its tensors on the CPU; ``device`` is the run's.
        """

    def run(self, context: FindContext) -> FindResult:
        """Train the mask with the shared loop."""
        from .._train import train_masks  # the loop imports this module: imported on use

        return train_masks(self, context)


def adam_for_masks(params: Sequence[Tensor], lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr=lr)``, with the fused kernel (one pass per tensor instead
    of one per operation) where every parameter is an unsharded fp32 tensor on the CPU or a CUDA
    device, and the default implementation elsewhere (other dtypes, sharded parameters).

    On the CPU the fused kernel's fp32 arithmetic is the default's bit for bit (tested). On a
    GPU it also takes ``found_inf``, so a step after a non-finite loss is skipped on the device
    without a copy of the parameters (``_loop.step_skipping_on_device``)."""
    params = list(params)
    fused = bool(params) and all(
        not is_dtensor(p) and p.dtype == torch.float32 and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None)


__all__ = [
    "Callback",
    "FindContext",
    "FindResult",
    "LossFn",
    "MaskMethod",
    "Method",
    "TrainState",
]
