"""nnsight 0.8 wrappers (``NNsight``, ``LanguageModel`` / ``TransformersModel``).

Masks attach to the wrapped module (``wrapper._module``), so they are in effect inside
``wrapper.trace(...)`` together with the user's own interventions and ``.save()`` calls, and
gradients reach soft masks through traced outputs. Canonical names are those of the wrapped
model's family (Hugging Face GPT-2 -> ``blocks.{L}.attn.W_Q``, a plain module -> its parameter
names). Detection reads the wrapper's class module; nothing here imports nnsight.
"""

from __future__ import annotations

from torch import nn

from .._types import Target
from . import Adapter, model_class, resolve


class NNsightAdapter(Adapter):
    family = "nnsight"

    def matches(self, model: object) -> bool:
        return model_class(model).__module__.startswith("nnsight") and isinstance(
            getattr(model, "_module", None), nn.Module
        )

    def root(self, model: object) -> nn.Module:
        return model._module  # type: ignore[attr-defined]

    def inner(self, model: object) -> Adapter:
        return resolve(self.root(model))

    def all_targets(self, model: object) -> dict[str, Target]:
        module = self.root(model)
        return self.inner(model).all_targets(module)

    def check_attachable(self, model: object) -> None:
        self.inner(model).check_attachable(self.root(model))

    def on_attach(self, model: object) -> None:
        self.inner(model).on_attach(self.root(model))

    def on_detach(self, model: object) -> None:
        self.inner(model).on_detach(self.root(model))

    def describe(self, model: object) -> str:
        return f"nnsight wrapper of a {self.inner(model).family} model"
