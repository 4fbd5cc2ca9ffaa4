"""``si.targets``: the maskable weights of a model, selected by glob patterns."""

from __future__ import annotations

from collections.abc import Iterable

from . import adapters
from ._types import Target


def targets(
    model: object,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, Target]:
    """The maskable weights of ``model`` as an ordered mapping canonical name -> ``Target``.

    Args:
        model: a plain ``nn.Module`` or a supported wrapper.
        include: glob pattern(s) over canonical names (``"blocks.*.attn.W_[QKVO]"``). Default:
            every weight matrix except embeddings and unembeddings (biases and norms are never
            targets), as in Csordás et al. 2021.
        exclude: glob pattern(s) removed from the selection.

    Raises:
        KeyError: a pattern matches no target; the message lists the available names.
    """
    adapter = adapters.resolve(model)
    return adapters.select(adapter.all_targets(model), include, exclude, family=adapter.family)


__all__ = ["targets"]
