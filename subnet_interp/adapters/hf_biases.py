"""Opt-in bias and norm-weight targets of Hugging Face GPT-2 and Llama-family models, named as
TransformerLens names them: ``blocks.{L}.attn.b_Q|b_K|b_V`` ``[head, d_head]``,
``blocks.{L}.attn.b_O`` ``[d_model]``, ``blocks.{L}.mlp.b_in|b_gate`` ``[d_mlp]``,
``blocks.{L}.mlp.b_out`` ``[d_model]``, ``blocks.{L}.ln1.w|b``, ``blocks.{L}.ln2.w|b``,
``ln_final.w|b``. All are ``default=False`` (kinds ``"bias"`` and ``"norm"``) and views of the
real tensor (a slice of GPT-2's fused ``c_attn.bias``, a head split of a Llama projection's
bias); ``si.targets(model, biases=True)`` offers them. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Layout, Target
from . import real_tensor
from ._hf_common import base_prefix


def _add(found, root, name, path, attribute, shape, axes, ops=(), kind="bias") -> None:
    """Add the target if the model has that parameter (biases are optional in Llama)."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return
    if isinstance(real_tensor(module, attribute), nn.Parameter):
        found[name] = Target(
            name,
            path,
            attribute,
            shape,
            axes,
            Layout(ops),
            default=False,
            kind=kind,
            unit_axes=axes,
        )


def _norms(found, root, layer, pairs, d_model, attributes) -> None:
    for canonical, path in pairs:
        for attribute, letter in attributes:
            name = (
                f"{canonical}.{letter}" if layer is None else f"blocks.{layer}.{canonical}.{letter}"
            )
            _add(found, root, name, path, attribute, (d_model,), ("d_model",), kind="norm")


def gpt2_bias_targets(model: nn.Module) -> dict[str, Target]:
    """GPT-2's ``b_Q|b_K|b_V`` (slices of ``c_attn.bias``), ``b_O``, ``mlp.b_in|b_out`` and
    the LayerNorms' ``w`` / ``b``."""
    cfg = model.config
    heads, d_model = cfg.n_head, cfg.n_embd
    d_head, d_mlp = d_model // heads, cfg.n_inner or 4 * d_model
    base, found = base_prefix(model), {}
    both = (("weight", "w"), ("bias", "b"))
    for layer in range(cfg.n_layer):
        block = f"{base}h.{layer}"
        for index, letter in enumerate("QKV"):
            ops = (("narrow", 0, index * d_model, d_model), ("unflatten", 0, (heads, d_head)))
            name = f"blocks.{layer}.attn.b_{letter}"
            _add(
                found,
                model,
                name,
                f"{block}.attn.c_attn",
                "bias",
                (heads, d_head),
                ("head", "d_head"),
                ops,
            )
        attn_out = f"blocks.{layer}.attn.b_O"
        _add(found, model, attn_out, f"{block}.attn.c_proj", "bias", (d_model,), ("d_model",))
        _add(
            found,
            model,
            f"blocks.{layer}.mlp.b_in",
            f"{block}.mlp.c_fc",
            "bias",
            (d_mlp,),
            ("neuron",),
        )
        _add(
            found,
            model,
            f"blocks.{layer}.mlp.b_out",
            f"{block}.mlp.c_proj",
            "bias",
            (d_model,),
            ("d_model",),
        )
        pairs = (("ln1", f"{block}.ln_1"), ("ln2", f"{block}.ln_2"))
        _norms(found, model, layer, pairs, d_model, both)
    _norms(found, model, None, (("ln_final", f"{base}ln_f"),), d_model, both)
    return found


def llama_bias_targets(model: nn.Module) -> dict[str, Target]:
    """A Llama-family model's RMSNorm weights ``ln1.w`` / ``ln2.w`` / ``ln_final.w`` and, where
    the config turns them on (``attention_bias``, ``mlp_bias``), the projections' biases."""
    cfg = model.config
    heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d_head = getattr(cfg, "head_dim", None) or d_model // heads
    d_mlp = cfg.intermediate_size
    base, found = base_prefix(model), {}
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}layers.{layer}"
        for letter, proj, count, axis in (
            ("Q", "q_proj", heads, "head"),
            ("K", "k_proj", kv_heads, "kv_head"),
            ("V", "v_proj", kv_heads, "kv_head"),
        ):
            _add(
                found,
                model,
                f"blocks.{layer}.attn.b_{letter}",
                f"{block}.self_attn.{proj}",
                "bias",
                (count, d_head),
                (axis, "d_head"),
                (("unflatten", 0, (count, d_head)),),
            )
        _add(
            found,
            model,
            f"blocks.{layer}.attn.b_O",
            f"{block}.self_attn.o_proj",
            "bias",
            (d_model,),
            ("d_model",),
        )
        for canonical, proj, width, axis in (
            ("b_gate", "gate_proj", d_mlp, "neuron"),
            ("b_in", "up_proj", d_mlp, "neuron"),
            ("b_out", "down_proj", d_model, "d_model"),
        ):
            _add(
                found,
                model,
                f"blocks.{layer}.mlp.{canonical}",
                f"{block}.mlp.{proj}",
                "bias",
                (width,),
                (axis,),
            )
        pairs = (("ln1", f"{block}.input_layernorm"), ("ln2", f"{block}.post_attention_layernorm"))
        _norms(found, model, layer, pairs, d_model, (("weight", "w"),))
    _norms(found, model, None, (("ln_final", f"{base}norm"),), d_model, (("weight", "w"),))
    return found


BIAS_FAMILIES = {
    "gpt2": gpt2_bias_targets,
    "llama": llama_bias_targets,
    "qwen2": llama_bias_targets,  # Llama's module names, with Q/K/V biases
    "mistral": llama_bias_targets,
}


def bias_targets(model: nn.Module) -> dict[str, Target]:
    """The opt-in bias and norm targets of a transformers model of a family in
    :data:`BIAS_FAMILIES` (by ``config.model_type``); none for other families."""
    builder = BIAS_FAMILIES.get(getattr(model.config, "model_type", None))
    return {} if builder is None else builder(model)


__all__ = ["BIAS_FAMILIES", "bias_targets", "gpt2_bias_targets", "llama_bias_targets"]
