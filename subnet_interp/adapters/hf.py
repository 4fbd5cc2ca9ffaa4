"""Hugging Face ``transformers`` causal LMs: GPT-2, GPT-NeoX / Pythia, Llama and the families
with Llama's module names (Qwen2 / Qwen2.5, Mistral, Gemma, Gemma-2). Phi-3 and OPT are in
:mod:`.hf_decoders`, the encoders BERT, RoBERTa and ViT in :mod:`.hf_encoders`; all are
registered in :data:`FAMILIES` below, and the builders they share are in :mod:`._hf_common`.

Canonical names and layouts are TransformerLens's (``blocks.{L}.attn.W_Q`` is
``[head, d_model, d_head]``, ...). Each canonical target is a view into the real tensor:
a slice of the fused ``c_attn`` (GPT-2 ``Conv1D``, stored ``[in, out]``), a per-head interleaved
slice of GPT-NeoX's ``query_key_value``, or a transpose of a Llama ``nn.Linear``. Masks are
written back through the same views, so the conversion is exact in both directions.

Detection reads ``type(model).__module__`` and ``model.config.model_type``; nothing here
imports ``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Target
from . import Adapter
from ._hf_common import (
    BLOCK_LISTS,
    attn_target,
    base_prefix,
    block_list,
    decoder_dims,
    embedding_targets,
    init_weights,
    is_hf,
    linear_mlp,
    linear_o,
    llama_attention,
    mlp_target,
    outermost_pretrained,
    unembed_target,
)
from .hf_biases import (
    gpt2_bias_targets,
    llama_bias_targets,
    neox_bias_targets,
    opt_bias_targets,
)
from .hf_biases_stacks import (
    bart_bias_targets,
    bert_bias_targets,
    mbart_bias_targets,
    t5_bias_targets,
    vit_bias_targets,
)
from .hf_decoders import opt_targets, phi3_targets
from .hf_encoders import bert_targets, vit_targets
from .hf_moe import moe_targets
from .hf_seq2seq import bart_targets, seq2seq_blocks, t5_targets

_Q, _K, _V = 0, 1, 2


def gpt2_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.config
    heads, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // heads
    d_mlp = cfg.n_inner or 4 * d_model
    base = base_prefix(model)
    found = embedding_targets(model, f"{base}wte", f"{base}wpe")
    qkv_axes = ("head", "d_model", "d_head")
    for layer in range(cfg.n_layer):
        block = f"{base}h.{layer}"
        for letter, index in (("Q", _Q), ("K", _K), ("V", _V)):
            ops = (
                ("narrow", 1, index * d_model, d_model),  # c_attn is [d_model, 3 * d_model]
                ("unflatten", 1, (heads, d_head)),
                ("permute", (1, 0, 2)),
            )
            name = f"blocks.{layer}.attn.W_{letter}"
            found[name] = attn_target(
                name,
                f"{block}.attn.c_attn",
                (heads, d_model, d_head),
                qkv_axes,
                ops,
                ("head", "d_head"),
            )
        name = f"blocks.{layer}.attn.W_O"
        found[name] = attn_target(
            name,
            f"{block}.attn.c_proj",
            (heads, d_head, d_model),
            ("head", "d_head", "d_model"),
            (("unflatten", 0, (heads, d_head)),),
            ("d_model",),
        )
        found[f"blocks.{layer}.mlp.W_in"] = mlp_target(
            f"blocks.{layer}.mlp.W_in", f"{block}.mlp.c_fc", (d_model, d_mlp), ("d_model", "neuron")
        )
        found[f"blocks.{layer}.mlp.W_out"] = mlp_target(
            f"blocks.{layer}.mlp.W_out",
            f"{block}.mlp.c_proj",
            (d_mlp, d_model),
            ("neuron", "d_model"),
        )
    found.update(unembed_target(model))
    return found


def neox_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.config
    heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    d_head = d_model // heads
    d_mlp = cfg.intermediate_size
    base = base_prefix(model)
    found = embedding_targets(model, f"{base}embed_in", None)
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}layers.{layer}"
        for letter, index in (("Q", _Q), ("K", _K), ("V", _V)):
            ops = (
                ("unflatten", 0, (heads, 3, d_head)),  # rows interleaved per head: [h, q|k|v, d]
                ("select", 1, index),
                ("permute", (0, 2, 1)),
            )
            name = f"blocks.{layer}.attn.W_{letter}"
            found[name] = attn_target(
                name,
                f"{block}.attention.query_key_value",
                (heads, d_model, d_head),
                ("head", "d_model", "d_head"),
                ops,
                ("head", "d_head"),
            )
        found.update(linear_o(layer, f"{block}.attention.dense", heads, d_head, d_model))
        found.update(
            linear_mlp(
                layer,
                {"W_in": f"{block}.mlp.dense_h_to_4h"},
                f"{block}.mlp.dense_4h_to_h",
                d_model,
                d_mlp,
            )
        )
    found.update(unembed_target(model, "lm_head" if hasattr(model, "lm_head") else "embed_out"))
    return found


def llama_targets(model: nn.Module) -> dict[str, Target]:
    dims = decoder_dims(model.config)
    base = base_prefix(model)
    found = embedding_targets(model, f"{base}embed_tokens", None)
    for layer in range(dims.n_layers):
        block = f"{base}layers.{layer}"
        found.update(llama_attention(layer, f"{block}.self_attn", dims))
        inputs = {"W_gate": f"{block}.mlp.gate_proj", "W_in": f"{block}.mlp.up_proj"}
        found.update(linear_mlp(layer, inputs, f"{block}.mlp.down_proj", dims.d_model, dims.d_mlp))
    found.update(unembed_target(model))
    return found


FAMILIES = {
    "gpt2": gpt2_targets,
    "gpt_neox": neox_targets,
    "llama": llama_targets,
    # Llama's module names; q/k/v biases (Qwen2) and the (1 + w) RMS norms and post-norms
    # (Gemma, Gemma-2) are opt-in targets (BIAS_FAMILIES); the embedding scale and
    # soft-capping act outside every target
    "qwen2": llama_targets,
    "mistral": llama_targets,
    "gemma": llama_targets,
    "gemma2": llama_targets,
    "phi3": phi3_targets,
    "opt": opt_targets,
    "bert": bert_targets,
    "roberta": bert_targets,
    "vit": vit_targets,
    "t5": t5_targets,
    "mt5": t5_targets,  # T5 v1.1's layout (gated MLP, untied read-out)
    "bart": bart_targets,
    "mbart": bart_targets,  # BART's module names; pre-LN, with a final norm per stack
    "mixtral": moe_targets,
    "qwen2_moe": moe_targets,
    "qwen3_moe": moe_targets,
}

# The opt-in bias and norm-weight targets of each family (si.targets(..., biases=True));
# families with Llama's module names share llama_bias_targets, which adds what a model has
BIAS_FAMILIES = {
    "gpt2": gpt2_bias_targets,
    "gpt_neox": neox_bias_targets,
    "llama": llama_bias_targets,
    "qwen2": llama_bias_targets,
    "mistral": llama_bias_targets,
    "gemma": llama_bias_targets,
    "gemma2": llama_bias_targets,
    "phi3": llama_bias_targets,  # qkv_proj and gate_up_proj have no biases: norms only
    "opt": opt_bias_targets,
    "bert": bert_bias_targets,
    "roberta": bert_bias_targets,
    "vit": vit_bias_targets,
    "t5": t5_bias_targets,
    "mt5": t5_bias_targets,
    "bart": bart_bias_targets,
    "mbart": mbart_bias_targets,
    "mixtral": llama_bias_targets,
    "qwen2_moe": llama_bias_targets,
    "qwen3_moe": llama_bias_targets,
}


def _refuse_bridged(root: nn.Module) -> None:
    """A transformers model a TransformerLens bridge was built from has its layers replaced
    in place by the bridge's components: its weights are the bridge's now."""
    for name, module in root.named_modules():
        if type(module).__module__.startswith("transformer_lens.model_bridge"):
            raise TypeError(
                f"This {type(root).__qualname__} was wrapped by a TransformerLens bridge: "
                f"building one (build_bridge_from_module, boot_transformers) replaces the "
                f"model's layers in place (e.g. {name!r} is now a "
                f"{type(module).__qualname__}). Mask the bridge, which computes with the same "
                "weights under the same names, or build the bridge from a copy "
                "(copy.deepcopy(model)) to keep this model usable on its own."
            )


class HuggingFaceAdapter(Adapter):
    """``transformers`` models of the architectures in :data:`FAMILIES`."""

    family = "huggingface"

    def matches(self, model: object) -> bool:
        return is_hf(model) and getattr(model.config, "model_type", None) in FAMILIES

    def all_targets(self, model: object) -> dict[str, Target]:
        root = self.root(model)
        _refuse_bridged(root)
        family = root.config.model_type
        return {**FAMILIES[family](root), **BIAS_FAMILIES[family](root)}

    def blocks(self, model: object) -> list[nn.Module]:
        """``h`` (GPT-2), ``layers`` (GPT-NeoX, Llama, ViT in transformers 5) or
        ``encoder.layer`` (BERT, RoBERTa, earlier ViT) of the base model; of an
        encoder-decoder (T5, mT5, BART, mBART), the encoder's blocks then the decoder's, as a
        TransformerLens bridge of it lists them."""
        root = self.root(model)
        stacked = seq2seq_blocks(root)
        if stacked is not None:
            return stacked
        found = block_list(root)
        if found is None:
            raise TypeError(
                f"{type(root).__qualname__} (model_type {root.config.model_type!r}) has no "
                f"nn.ModuleList of blocks where subnet_interp looks ({list(BLOCK_LISTS)} under "
                f"{base_prefix(root) or 'the model'!r}); this transformers version may have "
                "renamed them. Pass the module path of a block where a function accepts one, "
                "and report the model's module names."
            )
        return list(found)

    def reinitialize(self, root: nn.Module) -> None:
        """transformers' own initialisation (``init_weights()``: ``_init_weights`` per module,
        e.g. ``N(0, initializer_range)``, then re-tying) of the outermost transformers model."""
        top = outermost_pretrained(root.modules())
        if top is None:  # no module kept its transformers class (FSDP swaps it)
            super().reinitialize(root)
        else:
            init_weights(top)


__all__ = [
    "BIAS_FAMILIES",
    "FAMILIES",
    "HuggingFaceAdapter",
    "gpt2_targets",
    "llama_targets",
    "neox_targets",
]
