"""nnsight 0.8 wrappers (``NNsight``, ``LanguageModel`` / ``TransformersModel``).

Masks attach to the wrapped module (``wrapper._module``), so they are in effect inside
``wrapper.trace(...)`` together with the user's own interventions and ``.save()`` calls, and
gradients reach soft masks through traced outputs. Canonical names are those of the wrapped
model's family (Hugging Face GPT-2 -> ``blocks.{L}.attn.W_Q``, a plain module -> its parameter
names). Detection reads the wrapper's class module; nothing here imports nnsight.
"""

from __future__ import annotations

from torch import nn

from .._types import LinearSite, Target
from . import Adapter, model_class, resolve


class NNsightAdapter(Adapter):
    """nnsight wrappers: everything is delegated to the adapter of the wrapped module."""

    family = "nnsight"

    def matches(self, model: object) -> bool:
        return model_class(model).__module__.startswith("nnsight") and isinstance(
            getattr(model, "_module", None), nn.Module
        )

    def root(self, model: object) -> nn.Module:
        return model._module  # type: ignore[attr-defined]

    def inner(self, model: object) -> nn.Module:
        """The wrapped module (``wrapper._module``)."""
        return self.root(model)

    def _wrapped(self, model: object) -> Adapter:
        """The adapter of the wrapped module's family."""
        return resolve(self.root(model))

    def all_targets(self, model: object) -> dict[str, Target]:
        module = self.root(model)
        return self._wrapped(model).all_targets(module)

    def linear_site(self, root: nn.Module, location: tuple[str, str]) -> LinearSite | None:
        """The wrapped module's family's linear site (``root`` is the wrapped module)."""
        return resolve(root).linear_site(root, location)

    def copyable(self, model: object) -> bool:
        """No: a deep-copied wrapper cannot be traced ("the model already ran past it")."""
        return False

    def check_attachable(self, model: object) -> None:
        self._wrapped(model).check_attachable(self.root(model))

    def on_attach(self, model: object) -> None:
        self._wrapped(model).on_attach(self.root(model))

    def on_detach(self, model: object) -> None:
        self._wrapped(model).on_detach(self.root(model))

    def blocks(self, model: object) -> list[nn.Module]:
        """The wrapped module's blocks, as its family's adapter finds them."""
        return self._wrapped(model).blocks(self.root(model))

    def block_output(self, model: object, block: nn.Module) -> nn.Module:
        return self._wrapped(model).block_output(self.root(model), block)

    def reinitialize(self, root: nn.Module) -> None:
        """The wrapped module's family's initialisation (``root`` is the wrapped module; a
        wrapper passed instead is unwrapped)."""
        module = self.root(root) if self.matches(root) else root
        resolve(module).reinitialize(module)
