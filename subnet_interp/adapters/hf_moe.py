"""Hugging Face ``transformers`` mixture-of-experts causal LMs: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention is Llama's (``blocks.{L}.attn.W_Q`` ``[head, d_model, d_head]``, grouped K / V
``[kv_head, d_model, d_head]``, ``W_O`` ``[head, d_head, d_model]``). Each expert's gated MLP is
a target of its own, named as Llama's MLP under ``mlp.experts.{E}``:

- ``blocks.{L}.mlp.experts.{E}.W_gate`` and ``.W_in`` ``[d_model, neuron]``,
  ``blocks.{L}.mlp.experts.{E}.W_out`` ``[neuron, d_model]``;
- Qwen2-MoE's always-on shared expert: ``blocks.{L}.mlp.shared_expert.W_gate|W_in|W_out``;
- a dense layer among sparse ones (``mlp_only_layers``): ``blocks.{L}.mlp.W_gate|W_in|W_out``.

transformers 5 stores the experts of a layer fused: ``experts.gate_up_proj``
``[expert, 2 * neuron, d_model]`` (the gate rows, then the up rows) and ``experts.down_proj``
``[expert, d_model, neuron]``. Each expert target is a view (``select`` the expert,
``narrow`` the half, transpose) of them, so masks convert exactly both ways and the experts of a
layer are masked together through the one fused tensor. These are the default targets.

Not default (select them with ``include``): the router ``blocks.{L}.mlp.W_router``
``[d_model, expert]`` (masking it changes which experts run, not what they compute), Qwen2-MoE's
shared-expert gate ``blocks.{L}.mlp.W_shared_gate`` ``[d_model, 1]``, ``embed.W_E`` and
``unembed.W_U``. Granularity ``"head"`` gives an expert matrix one gate (an expert-level mask);
``"neuron"``, one per expert neuron. Attention biases and norm weights (also
Qwen3's ``q_norm`` / ``k_norm``) are opt-in targets (:mod:`.hf_biases`); the fused experts
have no biases. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .._types import Layout, Target
from . import real_tensor
from ._hf_common import (
    TRANSPOSE,
    base_prefix,
    decoder_dims,
    embedding_targets,
    linear_mlp,
    linear_readout,
    llama_attention,
    mlp_target,
)


def _expert_targets(model: nn.Module, layer: int, path: str) -> dict[str, Target]:
    """``blocks.{L}.mlp.experts.{E}.W_gate|W_in|W_out`` as views of the fused tensors of the
    experts module at ``path``."""
    experts = model.get_submodule(path)
    gate_up, down = real_tensor(experts, "gate_up_proj"), real_tensor(experts, "down_proj")
    layout_flags = {
        "is_transposed": getattr(experts, "is_transposed", False),
        "is_concatenated": getattr(experts, "is_concatenated", True),
        "has_gate": getattr(experts, "has_gate", True),
    }
    standard = {"is_transposed": False, "is_concatenated": True, "has_gate": True}
    if gate_up is None or down is None or gate_up.dim() != 3 or layout_flags != standard:
        raise ValueError(
            f"{type(model).__qualname__} (model_type {model.config.model_type!r}): the experts "
            f"at {path!r} ({type(experts).__name__}, {layout_flags}) are not stored as "
            "transformers 5 fuses Mixtral's: gate_up_proj [expert, 2 * neuron, d_model] (gate "
            "rows, then up rows) and down_proj [expert, d_model, neuron]. This transformers "
            "version stores them differently; report the layout, or use the plain adapter's "
            "parameter names (wrap the model in a plain nn.Module)."
        )
    count, rows, d_model = gate_up.shape
    d_expert = rows // 2
    if tuple(down.shape) != (count, d_model, d_expert):
        raise ValueError(
            f"{path}.down_proj has shape {tuple(down.shape)}; expected {(count, d_model, d_expert)} "
            f"to match {path}.gate_up_proj {tuple(gate_up.shape)}."
        )
    found = {}
    for expert in range(count):
        name = f"blocks.{layer}.mlp.experts.{expert}"
        for canonical, start in (("W_gate", 0), ("W_in", d_expert)):
            ops = (("select", 0, expert), ("narrow", 0, start, d_expert), TRANSPOSE)
            target = mlp_target(
                f"{name}.{canonical}", path, (d_model, d_expert), ("d_model", "neuron"), ops
            )
            found[target.name] = replace(target, attribute="gate_up_proj")
        ops = (("select", 0, expert), TRANSPOSE)
        target = mlp_target(f"{name}.W_out", path, (d_expert, d_model), ("neuron", "d_model"), ops)
        found[target.name] = replace(target, attribute="down_proj")
    return found


def _gate_target(model: nn.Module, name: str, path: str, unit: str) -> dict[str, Target]:
    """A non-default router-like ``[d_model, unit]`` target of the ``weight`` at ``path``."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return {}
    module = getattr(module, "_original_component", module)  # a bridge's router wrapper
    weight = real_tensor(module, "weight")
    if weight is None or weight.dim() != 2:
        return {}
    units, d_model = weight.shape
    target = Target(
        name,
        path,
        "weight",
        (d_model, units),
        ("d_model", unit),
        Layout((TRANSPOSE,)),
        default=False,
        kind="router",
        unit_axes=(unit,),
    )
    return {name: target}


def moe_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a Mixtral, Qwen2-MoE or Qwen3-MoE model (``*Model``, ``*ForCausalLM``)."""
    cfg = model.config
    dims = decoder_dims(cfg)
    base = base_prefix(model)
    found = embedding_targets(model, f"{base}embed_tokens", None)
    for layer in range(len(model.get_submodule(f"{base}layers"))):
        block = f"{base}layers.{layer}"
        found.update(llama_attention(layer, f"{block}.self_attn", dims))
        try:
            mlp = model.get_submodule(f"{block}.mlp")
        except AttributeError:
            raise ValueError(
                f"{type(model).__qualname__} (model_type {cfg.model_type!r}) has no module "
                f"{block}.mlp, where transformers 5 keeps a block's experts (transformers 4 "
                "named it block_sparse_moe); use transformers 5, or the plain adapter's "
                "parameter names (wrap the model in a plain nn.Module)."
            ) from None
        if not hasattr(mlp, "experts"):  # a dense layer (mlp_only_layers, decoder_sparse_step)
            found.update(_dense(model, layer, f"{block}.mlp", f"blocks.{layer}.mlp"))
            continue
        found.update(_expert_targets(model, layer, f"{block}.mlp.experts"))
        if hasattr(mlp, "shared_expert"):
            shared = _dense(
                model, layer, f"{block}.mlp.shared_expert", f"blocks.{layer}.mlp.shared_expert"
            )
            found.update(shared)
        found.update(
            _gate_target(model, f"blocks.{layer}.mlp.W_router", f"{block}.mlp.gate", "expert")
        )
        found.update(
            _gate_target(
                model,
                f"blocks.{layer}.mlp.W_shared_gate",
                f"{block}.mlp.shared_expert_gate",
                "shared_gate",
            )
        )
    found.update(
        linear_readout(model, "unembed.W_U", "lm_head", ("d_model", "d_vocab"), "unembedding")
    )
    return found


def _dense(model: nn.Module, layer: int, path: str, name: str) -> dict[str, Target]:
    """A Llama-style gated MLP (``gate_proj``, ``up_proj``, ``down_proj``) named ``name.W_*``."""
    d_mlp, d_model = real_tensor(model.get_submodule(f"{path}.up_proj"), "weight").shape
    inputs = {"W_gate": f"{path}.gate_proj", "W_in": f"{path}.up_proj"}
    found = linear_mlp(layer, inputs, f"{path}.down_proj", d_model, d_mlp)
    old = f"blocks.{layer}.mlp."
    return {
        f"{name}.{key[len(old) :]}": replace(target, name=f"{name}.{key[len(old) :]}")
        for key, target in found.items()
    }


def bridge_moe_targets(root: nn.Module, layer: int, mlp_path: str) -> dict[str, Target]:
    """The same targets for a TransformerLens bridge's MoE block at ``mlp_path``, which wraps
    the Hugging Face sparse-MoE (or dense) block as ``_original_component``; where the bridge
    wrapped one of its linear layers again (the router, a dense layer's projections), the
    target points at the ``nn.Linear`` inside."""
    block = f"{mlp_path}._original_component"
    original = root.get_submodule(block)
    if not hasattr(original, "experts"):  # a dense layer of an MoE model
        found = _dense(root, layer, block, f"blocks.{layer}.mlp")
    else:
        found = _expert_targets(root, layer, f"{block}.experts")
        if hasattr(original, "shared_expert"):
            shared = _dense(
                root, layer, f"{block}.shared_expert", f"blocks.{layer}.mlp.shared_expert"
            )
            found.update(shared)
        for name, attribute, unit in (
            ("W_router", "gate", "expert"),
            ("W_shared_gate", "shared_expert_gate", "shared_gate"),
        ):
            found.update(
                _gate_target(root, f"blocks.{layer}.mlp.{name}", f"{block}.{attribute}", unit)
            )
    return {name: _inner_linear(root, target) for name, target in found.items()}


def _inner_linear(root: nn.Module, target: Target) -> Target:
    module = root.get_submodule(target.module)
    if target.attribute in module._parameters or not hasattr(module, "_original_component"):
        return target
    return replace(target, module=f"{target.module}._original_component")


__all__ = ["bridge_moe_targets", "moe_targets"]
