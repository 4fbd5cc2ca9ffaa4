"""``si.targets``: the maskable weights of a model, selected by glob patterns."""

from __future__ import annotations

from collections.abc import Iterable

from . import adapters
from ._types import Target


def targets(
    model: object,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    biases: bool = False,
) -> dict[str, Target]:
    """The maskable weights of ``model`` as an ordered mapping canonical name -> ``Target``.

    Args:
        model: a plain ``nn.Module`` or a supported wrapper.
        include: glob pattern(s) over canonical names (``"blocks.*.attn.W_[QKVO]"``). Default:
            every weight matrix except embeddings and unembeddings (biases and norms only with
            ``biases=True``), as in Csordás et al. 2021.
        exclude: glob pattern(s) removed from the selection.
        biases: also offer the bias and norm-weight targets (kinds ``"bias"`` / ``"norm"``,
            e.g. ``blocks.0.attn.b_Q``, ``blocks.0.ln1.w``, a plain layer's ``fc.bias``;
            NeuroSurgeon's ``mask_bias``): with no ``include`` all of them join the default
            targets, otherwise patterns may name them. Off by default.

    Raises:
        KeyError: a pattern matches no target; the message lists the available names.
    """
    adapter = adapters.resolve(model)
    return adapters.select(
        adapter.all_targets(model), include, exclude, family=adapter.family, biases=biases
    )


__all__ = ["targets"]
