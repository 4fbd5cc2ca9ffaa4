"""Opt-in bias and norm-weight targets of the Hugging Face decoders (GPT-2, GPT-NeoX, the
Llama-named families, Phi-3, OPT and the mixtures of experts), named as TransformerLens names
them: ``blocks.{L}.attn.b_Q|b_K|b_V`` ``[head, d_head]`` (``[kv_head, d_head]`` for grouped
K / V), ``blocks.{L}.attn.b_O`` ``[d_model]``, ``blocks.{L}.mlp.b_in|b_gate`` ``[d_mlp]``,
``blocks.{L}.mlp.b_out`` ``[d_model]``, ``blocks.{L}.ln1.w|b`` (the norm in front of
attention), ``blocks.{L}.ln2.w|b`` (the norm in front of the MLP), ``ln_final.w|b``.
The encoders and encoder-decoders are in :mod:`.hf_biases_stacks`; :data:`.hf.BIAS_FAMILIES`
registers both.

All are ``default=False`` (kinds ``"bias"`` and ``"norm"``) views of the real tensor: a slice
of GPT-2's fused ``c_attn.bias``, a per-head interleaved slice of GPT-NeoX's
``query_key_value.bias`` (stored ``[head, q|k|v, d_head]``, as its weight's rows), a head split
of a Llama projection's bias. ``si.targets(model, biases=True)`` offers them. A target exists
only where the model has the parameter: Llama, Mistral, Phi-3 and Mixtral have no biases (norm
weights only), Qwen2 and Qwen2-MoE have Q / K / V biases, and the fused experts of the
mixtures of experts have none.

Family notes:

- **Gemma, Gemma-2**: the RMSNorms scale by ``(1 + w)``, so a zeroed norm weight ``w`` gives
  scale 1 (the plain RMS normalisation), not 0. Gemma-2 has four norms per block, named as
  TransformerLens names them: ``ln1`` (``input_layernorm``), ``ln1_post``
  (``post_attention_layernorm``, on the attention output), ``ln2``
  (``pre_feedforward_layernorm``) and ``ln2_post`` (``post_feedforward_layernorm``).
- **Qwen3-MoE**: the per-head RMSNorms on queries and keys are ``blocks.{L}.attn.q_norm.w`` and
  ``blocks.{L}.attn.k_norm.w`` ``[d_head]``.
- **GPT-NeoX**: ``ln1`` is ``input_layernorm``, ``ln2`` ``post_attention_layernorm`` (with the
  parallel residual both read the block input).
- **OPT**: ``ln1`` is ``self_attn_layer_norm``, ``ln2`` the block's ``final_layer_norm`` and
  ``ln_final`` the decoder's ``final_layer_norm``.

Nothing here imports ``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Layout, Target
from . import real_tensor
from ._hf_common import base_prefix, decoder_dims


def _parameter(root: nn.Module, path: str, attribute: str) -> nn.Parameter | None:
    """The parameter ``attribute`` of the module at ``path``; ``None`` where either is missing
    (biases are optional in most families)."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    real = real_tensor(module, attribute)
    return real if isinstance(real, nn.Parameter) else None


def _put(found, name, path, attribute, shape, axes, ops, kind) -> None:
    found[name] = Target(
        name,
        path,
        attribute,
        tuple(shape),
        axes,
        Layout(ops),
        default=False,
        kind=kind,
        unit_axes=axes,
    )


def add_vector(found, root, name, path, axis="d_model", attribute="bias", kind="bias") -> None:
    """Add the 1-D parameter ``attribute`` at ``path`` (if the model has it) as ``name``."""
    real = _parameter(root, path, attribute)
    if real is not None:
        _put(found, name, path, attribute, real.shape, (axis,), (), kind)


def add_heads(found, root, name, path, count, axis="head", d_head=None, ops=None) -> None:
    """Add the bias at ``path`` (if the model has it) as ``name`` ``[count, d_head]``; by
    default a split of the ``[count * d_head]`` vector, else viewed through ``ops``."""
    real = _parameter(root, path, "bias")
    if real is None:
        return
    d_head = d_head or real.shape[0] // count
    ops = ops or (("unflatten", 0, (count, d_head)),)
    _put(found, name, path, "bias", (count, d_head), (axis, "d_head"), ops, "bias")


def add_norm(found, root, name, path, axis="d_model") -> None:
    """Add a norm's ``weight`` and ``bias`` (those it has) as ``name.w`` and ``name.b``."""
    for attribute, letter in (("weight", "w"), ("bias", "b")):
        add_vector(found, root, f"{name}.{letter}", path, axis, attribute, kind="norm")


def gpt2_bias_targets(model: nn.Module) -> dict[str, Target]:
    """GPT-2's ``b_Q|b_K|b_V`` (slices of ``c_attn.bias``), ``b_O``, ``mlp.b_in|b_out`` and
    the LayerNorms' ``w`` / ``b``."""
    cfg = model.config
    heads, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // heads
    base, found = base_prefix(model), {}
    for layer in range(cfg.n_layer):
        block, prefix = f"{base}h.{layer}", f"blocks.{layer}"
        for index, letter in enumerate("QKV"):
            ops = (("narrow", 0, index * d_model, d_model), ("unflatten", 0, (heads, d_head)))
            name, path = f"{prefix}.attn.b_{letter}", f"{block}.attn.c_attn"
            add_heads(found, model, name, path, heads, "head", d_head, ops)
        add_vector(found, model, f"{prefix}.attn.b_O", f"{block}.attn.c_proj")
        add_vector(found, model, f"{prefix}.mlp.b_in", f"{block}.mlp.c_fc", "neuron")
        add_vector(found, model, f"{prefix}.mlp.b_out", f"{block}.mlp.c_proj")
        add_norm(found, model, f"{prefix}.ln1", f"{block}.ln_1")
        add_norm(found, model, f"{prefix}.ln2", f"{block}.ln_2")
    add_norm(found, model, "ln_final", f"{base}ln_f")
    return found


def neox_bias_targets(model: nn.Module) -> dict[str, Target]:
    """GPT-NeoX's ``b_Q|b_K|b_V`` (per-head interleaved slices of ``query_key_value.bias``),
    ``b_O``, ``mlp.b_in|b_out`` and the LayerNorms' ``w`` / ``b``."""
    cfg = model.config
    heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // heads
    base, found = base_prefix(model), {}
    for layer in range(cfg.num_hidden_layers):
        block, prefix = f"{base}layers.{layer}", f"blocks.{layer}"
        for index, letter in enumerate("QKV"):
            # stored [head, q|k|v, d_head], as the rows of query_key_value.weight
            ops = (("unflatten", 0, (heads, 3, d_head)), ("select", 1, index))
            name, path = f"{prefix}.attn.b_{letter}", f"{block}.attention.query_key_value"
            add_heads(found, model, name, path, heads, "head", d_head, ops)
        add_vector(found, model, f"{prefix}.attn.b_O", f"{block}.attention.dense")
        add_vector(found, model, f"{prefix}.mlp.b_in", f"{block}.mlp.dense_h_to_4h", "neuron")
        add_vector(found, model, f"{prefix}.mlp.b_out", f"{block}.mlp.dense_4h_to_h")
        add_norm(found, model, f"{prefix}.ln1", f"{block}.input_layernorm")
        add_norm(found, model, f"{prefix}.ln2", f"{block}.post_attention_layernorm")
    add_norm(found, model, "ln_final", f"{base}final_layer_norm")
    return found


_LLAMA_NORMS = (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm"))
_GEMMA2_NORMS = (
    ("ln1", "input_layernorm"),
    ("ln1_post", "post_attention_layernorm"),
    ("ln2", "pre_feedforward_layernorm"),
    ("ln2_post", "post_feedforward_layernorm"),
)


def llama_bias_targets(model: nn.Module) -> dict[str, Target]:
    """The norm weights ``ln1.w`` / ``ln2.w`` / ``ln_final.w`` (and Gemma-2's ``ln1_post.w`` /
    ``ln2_post.w``, Qwen3-MoE's ``attn.q_norm.w`` / ``attn.k_norm.w``) of a model with Llama's
    module names (Llama, Qwen2, Mistral, Gemma, Gemma-2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE)
    and, where the model has them (``attention_bias``, ``mlp_bias``, Qwen2's Q / K / V), the
    projections' biases. Gemma's norms scale by ``(1 + w)``: a zeroed ``w`` gives scale 1."""
    dims = decoder_dims(model.config)
    heads, kv_heads = dims.heads, dims.kv_heads
    base, found = base_prefix(model), {}
    for layer in range(dims.n_layers):
        block, prefix = f"{base}layers.{layer}", f"blocks.{layer}"
        for letter, proj, count, axis in (
            ("Q", "q_proj", heads, "head"),
            ("K", "k_proj", kv_heads, "kv_head"),
            ("V", "v_proj", kv_heads, "kv_head"),
        ):
            name, path = f"{prefix}.attn.b_{letter}", f"{block}.self_attn.{proj}"
            add_heads(found, model, name, path, count, axis)
        add_vector(found, model, f"{prefix}.attn.b_O", f"{block}.self_attn.o_proj")
        for canonical, proj, axis in (
            ("b_gate", "gate_proj", "neuron"),
            ("b_in", "up_proj", "neuron"),
            ("b_out", "down_proj", "d_model"),
        ):
            add_vector(found, model, f"{prefix}.mlp.{canonical}", f"{block}.mlp.{proj}", axis)
        for norm in ("q_norm", "k_norm"):  # Qwen3's per-head query / key norms
            add_norm(found, model, f"{prefix}.attn.{norm}", f"{block}.self_attn.{norm}", "d_head")
        gemma2 = _parameter(model, f"{block}.pre_feedforward_layernorm", "weight") is not None
        for canonical, module in _GEMMA2_NORMS if gemma2 else _LLAMA_NORMS:
            add_norm(found, model, f"{prefix}.{canonical}", f"{block}.{module}")
    add_norm(found, model, "ln_final", f"{base}norm")
    return found


def opt_bias_targets(model: nn.Module) -> dict[str, Target]:
    """OPT's ``b_Q|b_K|b_V|b_O``, ``mlp.b_in|b_out`` (``fc1`` / ``fc2``) and LayerNorms."""
    cfg = model.config
    heads = cfg.num_attention_heads
    base, found = f"{base_prefix(model)}decoder", {}
    for layer in range(cfg.num_hidden_layers):
        block, prefix = f"{base}.layers.{layer}", f"blocks.{layer}"
        for letter in "QKV":
            name, path = f"{prefix}.attn.b_{letter}", f"{block}.self_attn.{letter.lower()}_proj"
            add_heads(found, model, name, path, heads)
        add_vector(found, model, f"{prefix}.attn.b_O", f"{block}.self_attn.out_proj")
        add_vector(found, model, f"{prefix}.mlp.b_in", f"{block}.fc1", "neuron")
        add_vector(found, model, f"{prefix}.mlp.b_out", f"{block}.fc2")
        add_norm(found, model, f"{prefix}.ln1", f"{block}.self_attn_layer_norm")
        add_norm(found, model, f"{prefix}.ln2", f"{block}.final_layer_norm")
    add_norm(found, model, "ln_final", f"{base}.final_layer_norm")
    return found


__all__ = [
    "add_heads",
    "add_norm",
    "add_vector",
    "gpt2_bias_targets",
    "llama_bias_targets",
    "neox_bias_targets",
    "opt_bias_targets",
]
