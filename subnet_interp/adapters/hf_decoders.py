"""Hugging Face ``transformers`` decoders beyond GPT-2 / GPT-NeoX / Llama: Phi-3 and OPT.

(Qwen2 / Qwen2.5, Gemma, Gemma-2 and Mistral keep Llama's module names, ``q_proj`` ...
``down_proj``, so :data:`.hf.FAMILIES` maps them to :func:`.hf.llama_targets`: their
embedding scale and soft-capping act outside the targets; their biases and norm weights are
opt-in targets, :mod:`.hf_biases`.)

Canonical names and layouts are TransformerLens's, each a view into the real tensor:

- **Phi-3** fuses Q, K and V in one ``nn.Linear`` ``qkv_proj`` whose rows are
  ``[q (heads * d_head); k (kv_heads * d_head); v (kv_heads * d_head)]`` (its forward slices
  the output in that order), and the MLP's gate and up projections in ``gate_up_proj``, rows
  ``[gate (d_mlp); up (d_mlp)]`` (its forward ``chunk(2)``-s the output, gate first).
  ``W_Q|K|V`` are row blocks of ``qkv_proj`` and ``W_gate`` / ``W_in`` row blocks of
  ``gate_up_proj``, both transposed to ``[d_model, ...]``.
- **OPT** has ``q/k/v_proj``, ``out_proj``, ``fc1`` / ``fc2`` (all with biases, which are
  opt-in targets: :mod:`.hf_biases`) under ``decoder.layers``. Its learned positional embedding adds an offset of 2 to
  the positions; ``pos_embed.W_pos`` ``[n_ctx, d_model]`` is the table from row 2 on, so that
  ``W_pos[p]`` is position ``p``'s embedding (row 1 embeds padding, row 0 is never read:
  neither is a target). ``project_in`` / ``project_out`` (models whose
  ``word_embed_proj_dim`` differs from ``hidden_size``) are the non-default targets
  ``embed.W_in_proj`` ``[d_embed, d_model]`` and ``unembed.W_out_proj`` ``[d_model, d_embed]``.

Embeddings and unembeddings are non-default targets, as for GPT-2. Nothing here imports
``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Target
from ._hf_common import (
    TRANSPOSE,
    attn_target,
    base_prefix,
    decoder_dims,
    embedding_targets,
    linear_mlp,
    linear_o,
    linear_qkv,
    linear_readout,
    mlp_target,
    unembed_target,
)


def phi3_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a Phi-3 model (``Phi3Model``, ``Phi3ForCausalLM``, ...)."""
    dims = decoder_dims(model.config)
    heads, kv_heads, d_model, d_head = dims.heads, dims.kv_heads, dims.d_model, dims.d_head
    d_mlp = dims.d_mlp
    base = base_prefix(model)
    found = embedding_targets(model, f"{base}embed_tokens", None)
    rows = {"Q": (0, heads), "K": (heads, kv_heads), "V": (heads + kv_heads, kv_heads)}
    for layer in range(dims.n_layers):
        block = f"{base}layers.{layer}"
        for letter, (first_head, count) in rows.items():
            head_axis = "head" if letter == "Q" or kv_heads == heads else "kv_head"
            name = f"blocks.{layer}.attn.W_{letter}"
            ops = (
                ("narrow", 0, first_head * d_head, count * d_head),  # qkv_proj is [q; k; v] rows
                ("unflatten", 0, (count, d_head)),
                ("permute", (0, 2, 1)),
            )
            found[name] = attn_target(
                name,
                f"{block}.self_attn.qkv_proj",
                (count, d_model, d_head),
                (head_axis, "d_model", "d_head"),
                ops,
                (head_axis, "d_head"),
            )
        found.update(linear_o(layer, f"{block}.self_attn.o_proj", heads, d_head, d_model))
        for canonical, first_row in (("W_gate", 0), ("W_in", d_mlp)):  # gate_up is [gate; up]
            name = f"blocks.{layer}.mlp.{canonical}"
            ops = (("narrow", 0, first_row, d_mlp), TRANSPOSE)
            found[name] = mlp_target(
                name, f"{block}.mlp.gate_up_proj", (d_model, d_mlp), ("d_model", "neuron"), ops
            )
        name = f"blocks.{layer}.mlp.W_out"
        found[name] = mlp_target(
            name, f"{block}.mlp.down_proj", (d_mlp, d_model), ("neuron", "d_model"), (TRANSPOSE,)
        )
    found.update(unembed_target(model))
    return found


def opt_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of an OPT model (``OPTModel``, ``OPTForCausalLM``, ...)."""
    cfg = model.config
    heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    d_head = d_model // heads
    base = f"{base_prefix(model)}decoder"
    offset = getattr(model.get_submodule(f"{base}.embed_positions"), "offset", 0)
    found = embedding_targets(  # forward reads row position + offset
        model, f"{base}.embed_tokens", f"{base}.embed_positions", offset
    )
    project_in = ("embed.W_in_proj", f"{base}.project_in", ("d_embed", "d_model"))
    found.update(linear_readout(model, *project_in, "embedding"))
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}.layers.{layer}"
        for letter in "QKV":
            path = f"{block}.self_attn.{letter.lower()}_proj"
            found.update(linear_qkv(layer, letter, path, heads, d_model, d_head, "head"))
        found.update(linear_o(layer, f"{block}.self_attn.out_proj", heads, d_head, d_model))
        inputs = {"W_in": f"{block}.fc1"}
        found.update(linear_mlp(layer, inputs, f"{block}.fc2", d_model, cfg.ffn_dim))
    project_out = ("unembed.W_out_proj", f"{base}.project_out", ("d_model", "d_embed"))
    found.update(linear_readout(model, *project_out, "unembedding"))
    found.update(unembed_target(model))
    return found


__all__ = ["opt_targets", "phi3_targets"]
