"""Plain ``nn.Module`` adapter: targets are the weights of the usual layers, by parameter name;
torch's ``nn.MultiheadAttention`` and recurrent layers as canonical heads and gates, and opt-in
biases and norm weights (:mod:`.torch_layers`)."""

from __future__ import annotations

from torch import nn

from .._types import LinearSite, Target
from . import Adapter, is_conv1d, model_class, real_tensor
from ._hf_common import BLOCK_LISTS, block_list, init_weights, outermost_pretrained
from .torch_layers import (
    bias_norm_targets,
    functional_site_error,
    mha_targets,
    refresh_rnns,
    rnn_targets,
)

_CONV_AXES = {1: ("kernel",), 2: ("kernel_h", "kernel_w"), 3: ("kernel_d", "kernel_h", "kernel_w")}


def module_targets(root: nn.Module) -> dict[str, Target]:
    """Targets of every Linear, Conv1d/2d/3d, HF Conv1D and Embedding weight under ``root``,
    of torch's MultiheadAttention, LSTM, GRU and RNN layers, and the opt-in (non-default)
    biases and norm weights."""
    found: dict[str, Target] = {}
    claimed: set[str] = set()  # modules whose weights a composite layer already named
    for path, module in root.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            found.update(mha_targets(path, module))
            claimed.add(f"{path}.out_proj" if path else "out_proj")
        elif isinstance(module, nn.RNNBase):
            found.update(rnn_targets(path, module))
        elif path not in claimed:
            target = _weight_target(path, module)
            if target is not None:
                found[target.name] = target
            found.update(bias_norm_targets(path, module))
    return found


def _weight_target(path: str, module: nn.Module) -> Target | None:
    weight = real_tensor(module, "weight")
    if not isinstance(weight, nn.Parameter):
        return None
    shape = tuple(weight.shape)
    name = f"{path}.weight" if path else "weight"
    if isinstance(module, nn.Linear):
        return Target(name, path, "weight", shape, ("out", "in"), kind="linear")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        axes = ("out_channels", "in_channels", *_CONV_AXES[weight.dim() - 2])
        return Target(name, path, "weight", shape, axes, kind="conv")
    if isinstance(module, nn.Embedding):
        return Target(name, path, "weight", shape, ("vocab", "d"), default=False, kind="embedding")
    if is_conv1d(module) and weight.dim() == 2:
        return Target(name, path, "weight", shape, ("in", "out"), kind="linear", unit_axes=("out",))
    return None


class PlainAdapter(Adapter):
    """Any other ``nn.Module``: its parameter names are the canonical names (tried last)."""

    family = "torch"

    def matches(self, model: object) -> bool:
        return isinstance(model, nn.Module)

    def all_targets(self, model: object) -> dict[str, Target]:
        return module_targets(self.root(model))

    def linear_site(self, root: nn.Module, location: tuple[str, str]) -> LinearSite | None:
        """None; an ``nn.MultiheadAttention``'s weights raise (it never calls ``out_proj``)."""
        error = functional_site_error(root, location)
        if error is not None:
            raise error
        return None

    def on_detach(self, model: object) -> None:
        """Torch RNNs read their parameters again (they keep the last tensors they read)."""
        refresh_rnns(self.root(model))

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
