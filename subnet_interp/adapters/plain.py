"""Plain ``nn.Module`` adapter: targets are the weights of the usual layers, by parameter name."""

from __future__ import annotations

from torch import nn

from .._types import Target
from . import Adapter, is_conv1d, model_class, real_tensor
from ._hf_common import BLOCK_LISTS, block_list, init_weights, outermost_pretrained

_CONV_AXES = {1: ("kernel",), 2: ("kernel_h", "kernel_w"), 3: ("kernel_d", "kernel_h", "kernel_w")}


def module_targets(root: nn.Module) -> dict[str, Target]:
    """Targets of every Linear, Conv1d/2d/3d, HF Conv1D and Embedding weight under ``root``."""
    found: dict[str, Target] = {}
    for path, module in root.named_modules():
        weight = real_tensor(module, "weight")
        if not isinstance(weight, nn.Parameter):
            continue
        shape = tuple(weight.shape)
        name = f"{path}.weight" if path else "weight"
        if isinstance(module, nn.Linear):
            target = Target(name, path, "weight", shape, ("out", "in"), kind="linear")
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = weight.dim() - 2
            axes = ("out_channels", "in_channels", *_CONV_AXES[dims])
            target = Target(name, path, "weight", shape, axes, kind="conv")
        elif isinstance(module, nn.Embedding):
            target = Target(
                name, path, "weight", shape, ("vocab", "d"), default=False, kind="embedding"
            )
        elif is_conv1d(module) and weight.dim() == 2:
            target = Target(
                name, path, "weight", shape, ("in", "out"), kind="linear", unit_axes=("out",)
            )
        else:
            continue
        found[name] = target
    return found


class PlainAdapter(Adapter):
    """Any other ``nn.Module``: its parameter names are the canonical names (tried last)."""

    family = "torch"

    def matches(self, model: object) -> bool:
        return isinstance(model, nn.Module)

    def all_targets(self, model: object) -> dict[str, Target]:
        return module_targets(self.root(model))

    def blocks(self, model: object) -> list[nn.Module]:
        """The ``nn.ModuleList`` at a usual place (``h``, ``layers``, ``encoder.layer``, ...
        under the base model, as in transformers models of other architectures); otherwise a
        plain module's blocks are unknown and this raises."""
        root = self.root(model)
        found = block_list(root)
        if found is None:
            raise TypeError(
                f"This {model_class(root).__qualname__} is a plain nn.Module to subnet_interp, "
                f"and it has no nn.ModuleList of blocks where subnet_interp looks "
                f"({list(BLOCK_LISTS)}), so its transformer blocks are unknown. Expected a "
                "Hugging Face (GPT-2, GPT-NeoX, Llama, BERT, RoBERTa, ViT), TransformerLens or "
                "nnsight model. Pass the path of the module you mean where a function accepts "
                "one, or register an adapter for this family (adapters.register_adapter)."
            )
        return list(found)

    def reinitialize(self, root: nn.Module) -> None:
        """A transformers model inside ``root`` gets its own initialisation (the outermost one,
        which re-initialises its sub-models too); otherwise ``init_weights()`` or every
        ``reset_parameters()``."""
        top = outermost_pretrained(root.modules())
        if top is None:
            super().reinitialize(root)
        else:
            init_weights(top)
