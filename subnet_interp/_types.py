"""Pure data types shared by every layer: maskable targets and their layouts."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


class Layout:
    """How a target's canonical tensor sits inside the real parameter tensor.

    The identity layout covers the whole real tensor unchanged. Adapters for fused or
    transposed storage (e.g. GPT-2's ``c_attn``) subclass this.
    """

    covers_whole: bool = True

    def to_canonical(self, real: Tensor) -> Tensor:
        """The canonical-layout view (or copy) of the region of ``real`` this target covers."""
        return real

    def write_real(self, canonical: Tensor, real_out: Tensor) -> Tensor:
        """Return ``real_out`` with this target's region replaced by ``canonical``.

        Must be differentiable in ``canonical``. The identity layout returns ``canonical``.
        """
        return canonical

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


IDENTITY = Layout()


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
        layout: converts between the canonical tensor and the real tensor.
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
            keep = {"head"} & set(self.axes)
        else:
            raise ValueError(
                f"Unknown granularity {granularity!r}; expected 'weight', 'neuron' or 'head'."
            )
        return tuple(s if a in keep else 1 for s, a in zip(self.shape, self.axes, strict=True))

    @property
    def location(self) -> tuple[str, str]:
        """The (module path, attribute) pair of the real tensor."""
        return (self.module, self.attribute)


def describe_tensor(tensor: Tensor) -> str:
    """Short description used in error messages: shape, dtype, device."""
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


__all__ = ["IDENTITY", "Layout", "NotFoundError", "Target", "describe_tensor"]


class NotFoundError(KeyError):
    """A name (target, method, ...) that does not exist; the message lists what does.

    A ``KeyError`` whose message prints as written (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
