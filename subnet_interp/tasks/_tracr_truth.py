"""What a compiled tracr program needs on its data, found by ablating one piece at a time.

tracr compiles a categorical MLP as a lookup table over every combination of its inputs'
values, and a ``SelectorWidth`` with a BOS clean-up neuron, so a compiled model holds units
and weights that no input of the task ever uses: "non-zero in the compiled model" overstates
the circuit (on ``reverse``, half of the neurons of layers 1 and 2 can go with accuracy 1.0).
The truth used by :class:`~subnet_interp.tasks.tracr_library.TracrTask` is instead *needed*:
a head, neuron or weight is needed when zeroing it alone makes some scored position wrong
(by the task's own accuracy criterion), on the clean compiled model. Compiled pieces that are
not needed are neither used nor noise; the benchmark leaves them out of the ROC AUC.

Single ablation misses pieces that back each other up; tracr compiles no such redundancy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

_READS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "fc_in": "mlp.fc_in"}
_WRITES = {"o": "attn.o", "fc_out": "mlp.fc_out"}


def _modules(bridge: Any) -> dict[str, torch.nn.Linear]:
    """``layers.L.attn.q`` ... ``layers.L.mlp.fc_out``: the bridge's native Linear layers."""
    out = {}
    for layer, block in enumerate(bridge.original_model.layers):
        block = getattr(block, "_original_component", block)
        for part in (*_READS.values(), *_WRITES.values()):
            module = block
            for attr in part.split("."):
                module = getattr(module, attr)
                module = getattr(module, "_original_component", module)
            out[f"layers.{layer}.{part}"] = module
    return out


def _all_right(task: Any) -> bool:
    with torch.no_grad():
        return all(
            bool(task.accuracy(task.bridge, batch) >= 1.0 - 1e-9)
            for batch in task.batches
            if batch[2].any()
        )


def needed_truth(task: Any) -> dict[str, Any]:
    """``heads`` (node names), ``neurons`` (``[layers, d_mlp]`` bool) and ``weights``
    (canonical name -> bool mask) that ``task``'s bridge needs, as it is now (call it on the
    clean compiled model). Each non-zero weight of the native Linear layers is zeroed alone;
    the flags are then read back in the canonical layout through the adapter."""
    from ..analysis.circuits import head_node
    from .tracr_library import _canonical_weights

    bridge = task.bridge
    cfg = bridge.cfg
    if not _all_right(task):
        raise ValueError(
            f"tracr task {task.name!r}: the model does not compute the program on every scored "
            "position, so what it needs is undefined; compute the truth before planting "
            "disturbing noise."
        )
    modules = _modules(bridge)
    flags: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, module in modules.items():
            weight = module.weight
            needed = torch.zeros_like(weight, dtype=torch.bool)
            for index in weight.nonzero().tolist():
                index = tuple(index)
                saved = weight[index].clone()
                weight[index] = 0.0
                needed[index] = not _all_right(task)
                weight[index] = saved
            flags[name] = needed
        heads, neurons = [], torch.zeros(cfg.n_layers, cfg.d_mlp, dtype=torch.bool)
        for layer in range(cfg.n_layers):
            out = modules[f"layers.{layer}.attn.o"].weight
            for head in range(cfg.n_heads):
                cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
                if not out[:, cols].any():
                    continue
                saved = out[:, cols].clone()
                out[:, cols] = 0.0
                if not _all_right(task):
                    heads.append(head_node(layer, head))
                out[:, cols] = saved
            fc_out = modules[f"layers.{layer}.mlp.fc_out"].weight
            for neuron in fc_out.any(0).nonzero().flatten().tolist():
                saved = fc_out[:, neuron].clone()
                fc_out[:, neuron] = 0.0
                neurons[layer, neuron] = not _all_right(task)
                fc_out[:, neuron] = saved
    # the flags in the canonical layout: write them as weights into a copy, read canonically
    twin = copy.deepcopy(bridge)
    twin_modules = _modules(twin)
    with torch.no_grad():
        for name, needed in flags.items():
            twin_modules[name].weight.copy_(needed.float())
    weights = {name: w != 0 for name, w in _canonical_weights(twin).items()}
    return {"heads": frozenset(heads), "neurons": neurons, "weights": weights}


__all__ = ["needed_truth"]
