"""Plain ``nn.Module`` adapter: targets are the weights of the usual layers, by parameter name."""

from __future__ import annotations

from torch import nn

from .._types import Target
from . import Adapter, is_conv1d, real_tensor

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
    family = "torch"

    def matches(self, model: object) -> bool:
        return isinstance(model, nn.Module)

    def all_targets(self, model: object) -> dict[str, Target]:
        return module_targets(self.root(model))
