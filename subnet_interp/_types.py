"""Pure data types shared by every layer: maskable targets and their layouts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How a target's canonical tensor sits inside the real parameter tensor.

    A sequence of view operations that turns the real tensor into the canonical one:
    ``("narrow", dim, start, length)``, ``("select", dim, index)``,
    ``("unflatten", dim, sizes)`` and ``("permute", dims)``. Because each is a view, the same
    operations applied to a buffer of the real shape give a canonical-shaped window into it,
    which is how canonical masks are written back (exactly, and differentiably).
    The empty sequence is the identity.
    """

    ops: tuple[tuple, ...] = ()

    @property
    def is_identity(self) -> bool:
        return not self.ops

    def to_canonical(self, real: Tensor) -> Tensor:
        """The canonical-layout view of the region of ``real`` this target covers."""
        view = real
        for op in self.ops:
            kind = op[0]
            if kind == "narrow":
                view = view.narrow(op[1], op[2], op[3])
            elif kind == "select":
                view = view.select(op[1], op[2])
            elif kind == "unflatten":
                view = view.unflatten(op[1], op[2])
            elif kind == "permute":
                view = view.permute(*op[1])
            else:
                raise ValueError(f"Unknown layout operation {op!r}.")
        return view

    def write_real(self, canonical: Tensor, real_out: Tensor) -> Tensor:
        """Write ``canonical`` into its region of ``real_out`` (in place) and return ``real_out``.

        ``real_out`` must be a fresh buffer the caller owns; autograd tracks the write, so
        gradients flow back to ``canonical``. The identity layout returns ``canonical``.
        """
        if self.is_identity:
            return canonical
        self.to_canonical(real_out).copy_(canonical)
        return real_out


IDENTITY = Layout()

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_STACK_BLOCK_NAME = re.compile(r"^(?:(encoder|decoder)\.)?blocks\.(\d+)\.(.+)$")


def block_position(name: str) -> tuple[int, str] | None:
    """``(layer, component)`` of a canonical ``blocks.{L}.{component}`` name
    (``blocks.3.attn.W_Q`` -> ``(3, "attn.W_Q")``), ``None`` for any other name.

    The one parser of canonical block names; everything else asks a :class:`Target` or this.
    """
    match = _BLOCK_NAME.match(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def stack_position(name: str) -> tuple[str, int, str] | None:
    """``(stack, layer, component)`` of a canonical block name, also of an encoder-decoder's
    ``{encoder,decoder}.blocks.{L}.{component}`` (``decoder.blocks.1.cross_attn.W_Q`` ->
    ``("decoder", 1, "cross_attn.W_Q")``); ``stack`` is ``""`` for ``blocks.{L}....``, ``None``
    for any other name. :func:`block_position` is this for names without a stack."""
    match = _STACK_BLOCK_NAME.match(name)
    if match is None:
        return None
    return match.group(1) or "", int(match.group(2)), match.group(3)


@dataclass(frozen=True)
class Target:
    """One maskable weight, named canonically.

    Attributes:
        name: canonical name, independent of the wrapper (``blocks.0.attn.W_Q``, or the
            parameter name for a plain ``nn.Module``).
        module: dotted path of the module that owns the real tensor, relative to the model
            root the adapter works on.
        attribute: the attribute of ``module`` holding the tensor (usually ``"weight"``).
        shape: canonical shape of the mask.
        axes: one label per canonical axis (``"head"``, ``"d_model"``, ``"neuron"``, ...).
        layout: the view operations from the real tensor to the canonical one.
        default: whether ``si.targets`` selects it when no ``include`` is given (embeddings,
            unembeddings, biases and norms are not default targets).
        kind: a short tag of what the weight is (``"linear"``, ``"conv"``, ``"embedding"``,
            ``"attn"``, ``"mlp"``, ...).
        unit_axes: the axes indexing the target's units for ``granularity="neuron"`` (one gate
            per index along them). Default: the first axis (a Linear layer's outputs).
    """

    name: str
    module: str
    attribute: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    layout: Layout = field(default=IDENTITY)
    default: bool = True
    kind: str = "linear"
    unit_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.unit_axes and self.axes:
            object.__setattr__(self, "unit_axes", (self.axes[0],))
        unknown = [a for a in self.unit_axes if a not in self.axes]
        if unknown:
            raise ValueError(
                f"Target {self.name!r}: unit axes {unknown} are not among its axes {self.axes}."
            )
        if len(self.shape) != len(self.axes):
            raise ValueError(
                f"Target {self.name!r}: shape {self.shape} has {len(self.shape)} axes but "
                f"{len(self.axes)} axis labels were given ({self.axes})."
            )

    @property
    def numel(self) -> int:
        """Number of weights in the target (the product of ``shape``)."""
        n = 1
        for size in self.shape:
            n *= size
        return n

    def gate_shape(self, granularity: str) -> tuple[int, ...]:
        """Shape of one gate tensor at ``granularity``, broadcastable to :attr:`shape`.

        ``"weight"``: one gate per weight. ``"neuron"``: one per index of :attr:`unit_axes`.
        ``"head"``: one per attention head (the ``head`` axis); a target with no head axis
        (an MLP matrix, a plain layer) gets a single gate for the whole matrix.
        """
        if granularity == "weight":
            return self.shape
        if granularity == "neuron":
            keep = set(self.unit_axes)
        elif granularity == "head":
            keep = {"head", "kv_head"} & set(self.axes)
        else:
            raise ValueError(
                f"Unknown granularity {granularity!r}; expected 'weight', 'neuron' or 'head'."
            )
        return tuple(s if a in keep else 1 for s, a in zip(self.shape, self.axes, strict=True))

    @property
    def layer(self) -> int | None:
        """The block index of a canonical ``blocks.{L}....`` target, ``None`` otherwise."""
        position = block_position(self.name)
        return None if position is None else position[0]

    @property
    def component(self) -> str | None:
        """What the target is within its block (``"attn.W_Q"``, ``"mlp.W_in"``), or ``None``."""
        position = block_position(self.name)
        return None if position is None else position[1]

    @property
    def location(self) -> tuple[str, str]:
        """The (module path, attribute) pair of the real tensor."""
        return (self.module, self.attribute)


@dataclass(frozen=True)
class LinearSite:
    """Where the model computes one weight's linear map ``y = W x``: where it reads ``x`` and
    which output is ``y``. The input-based ablations (mean, resample, patching) record ``x``
    there and add the masked-out term ``((1 - m) * W) x'`` to ``y``.

    Attributes:
        input_module: dotted path (under the adapter's root) of the module where ``x`` is read.
        input_from: ``"input"`` (the module's first argument), ``"output"`` (what the module
            returns, e.g. a hook point's value) or the name of a keyword argument of the
            module's ``forward`` (``"query_input"``).
        output_module: dotted path of the module whose output is ``y``; the masked-out term
            is added to what it returns.
        equation: the map as a ``torch.einsum`` equation ``"x, W -> y"`` over the real tensor
            ``W``; ``...`` stands for the leading (batch, position) dimensions of ``x`` and
            ``y``, and the letters after it in ``x`` are its feature dimensions
            (``"...d,hde->...he"`` for a ``HookedTransformer``'s ``W_Q``).
    """

    input_module: str
    input_from: str
    output_module: str
    equation: str

    def __post_init__(self) -> None:
        operands, _, result = self.equation.replace(" ", "").partition("->")
        parts = operands.split(",")
        if (
            len(parts) != 2
            or not parts[0].startswith("...")
            or not result.startswith("...")
            or "..." in parts[1]
        ):
            raise ValueError(
                f"LinearSite equation {self.equation!r} must read 'x, W -> y' with '...' "
                "leading x and y (the batch and position dimensions) and not in W, e.g. "
                "'...d,hde->...he'."
            )

    @property
    def feature_dims(self) -> int:
        """How many trailing dimensions of ``x`` the weight contracts or keeps per feature
        (a mean over the inputs keeps these)."""
        return len(self.equation.replace(" ", "").split(",")[0]) - 3


def describe_tensor(tensor: Tensor) -> str:
    """Short description used in error messages: shape, dtype, device."""
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


_WRAPPER_MODULES = ("torch.distributed.fsdp", "torch.nn.utils.parametrize")


def model_class(obj: object) -> type:
    """The class of ``obj`` as its library defined it: FSDP2's ``fully_shard`` and
    ``torch.nn.utils.parametrize`` swap a module's class for a generated subclass
    (``FSDPGPT2LMHeadModel``, ``ParametrizedLinear``); adapters recognise families by the
    class underneath."""
    for cls in type(obj).__mro__:
        if not cls.__module__.startswith(_WRAPPER_MODULES):
            return cls
    return type(obj)


__all__ = [
    "IDENTITY",
    "Layout",
    "LinearSite",
    "NotFoundError",
    "Target",
    "block_position",
    "stack_position",
    "describe_tensor",
    "model_class",
]


class NotFoundError(KeyError):
    """A name (target, method, ...) that does not exist; the message lists what does.

    A ``KeyError`` whose message prints as written (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
