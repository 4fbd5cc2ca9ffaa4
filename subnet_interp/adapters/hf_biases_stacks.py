"""Opt-in bias and norm-weight targets of the Hugging Face encoders (BERT, RoBERTa, ViT) and
encoder-decoders (T5, BART), named as their weights are (:mod:`.hf_encoders`,
:mod:`.hf_seq2seq`) with TransformerLens's bias and norm names (see :mod:`.hf_biases`):

- BERT / RoBERTa / ViT: ``blocks.{L}.attn.b_Q|b_K|b_V`` ``[head, d_head]``,
  ``blocks.{L}.attn.b_O``, ``blocks.{L}.mlp.b_in|b_out``; ``blocks.{L}.ln1.w|b`` and
  ``blocks.{L}.ln2.w|b``, the norms of the attention and of the MLP sub-layer (after the
  residual sum in BERT / RoBERTa: ``attention.output.LayerNorm``, ``output.LayerNorm``;
  before the sub-layer in ViT: ``layernorm_before``, ``layernorm_after``); BERT / RoBERTa's
  embedding LayerNorm ``embed.ln.w|b``; ViT's final ``ln_final.w|b``.
- T5 (no biases; RMS norms with a weight only) and BART, under an ``encoder.`` or ``decoder.``
  prefix: ``{stack}.blocks.{L}.ln1.w`` (self-attention), ``decoder.blocks.{L}.ln_cross.w``
  (cross-attention), ``{stack}.blocks.{L}.ln2.w`` (MLP), T5's ``{stack}.ln_final.w``; BART's
  ``{stack}.blocks.{L}.attn.b_Q|b_K|b_V|b_O``, ``decoder.blocks.{L}.cross_attn.b_*``,
  ``{stack}.blocks.{L}.mlp.b_in|b_out``, the LayerNorms' ``.b`` too, and the embedding
  LayerNorm ``{stack}.embed.ln.w|b``; mT5 as T5; mBART as BART, and its final LayerNorms
  ``{stack}.ln_final.w|b``.

The read-outs' biases (pooler, masked-LM head, classifier) are not targets. All are
``default=False`` views of the real tensor (``si.targets(model, biases=True)``). Nothing here
imports ``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Target
from ._hf_common import base_prefix
from .hf_biases import add_heads, add_norm, add_vector
from .hf_encoders import _BERT_BLOCKS, _VIT_BLOCKS, _block_paths
from .hf_seq2seq import _stacks

# A block's attention and MLP norms, relative to the block (the same in both ViT layouts)
_BERT_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_VIT_NORMS = ("layernorm_before", "layernorm_after")


def _encoder_blocks(model: nn.Module, base: str, candidates, norms) -> dict[str, Target]:
    block, (q, k, v, o, mlp_in, mlp_out) = _block_paths(model, base, candidates)
    heads, found = model.config.num_attention_heads, {}
    for layer in range(model.config.num_hidden_layers):
        path, prefix = f"{base}{block.format(layer=layer)}", f"blocks.{layer}"
        for letter, linear in zip("QKV", (q, k, v), strict=True):
            add_heads(found, model, f"{prefix}.attn.b_{letter}", f"{path}.{linear}", heads)
        add_vector(found, model, f"{prefix}.attn.b_O", f"{path}.{o}")
        add_vector(found, model, f"{prefix}.mlp.b_in", f"{path}.{mlp_in}", "neuron")
        add_vector(found, model, f"{prefix}.mlp.b_out", f"{path}.{mlp_out}")
        for canonical, norm in zip(("ln1", "ln2"), norms, strict=True):
            add_norm(found, model, f"{prefix}.{canonical}", f"{path}.{norm}")
    return found


def bert_bias_targets(model: nn.Module) -> dict[str, Target]:
    """BERT's or RoBERTa's block biases, block LayerNorms and embedding LayerNorm."""
    base = base_prefix(model)
    found = _encoder_blocks(model, base, _BERT_BLOCKS, _BERT_NORMS)
    add_norm(found, model, "embed.ln", f"{base}embeddings.LayerNorm")
    return found


def vit_bias_targets(model: nn.Module) -> dict[str, Target]:
    """ViT's block biases, block LayerNorms and final LayerNorm."""
    base = base_prefix(model)
    found = _encoder_blocks(model, base, _VIT_BLOCKS, _VIT_NORMS)
    add_norm(found, model, "ln_final", f"{base}layernorm")
    return found


def t5_bias_targets(model: nn.Module) -> dict[str, Target]:
    """T5's RMS norm weights (T5 has no biases)."""
    base, found = base_prefix(model), {}
    for stack in _stacks(model, base):
        norms = ("ln1", "ln_cross", "ln2") if stack == "decoder" else ("ln1", "ln2")
        for layer in range(len(model.get_submodule(f"{base}{stack}.block"))):
            path = f"{base}{stack}.block.{layer}.layer"
            for index, canonical in enumerate(norms):
                name = f"{stack}.blocks.{layer}.{canonical}"
                add_norm(found, model, name, f"{path}.{index}.layer_norm")
        add_norm(found, model, f"{stack}.ln_final", f"{base}{stack}.final_layer_norm")
    return found


def bart_bias_targets(model: nn.Module) -> dict[str, Target]:
    """BART's attention and MLP biases and LayerNorms (``BartForCausalLM``, a decoder alone,
    has no ``cross_attn`` / ``ln_cross`` targets)."""
    cfg = model.config
    base, found = base_prefix(model), {}
    heads = {"encoder": cfg.encoder_attention_heads, "decoder": cfg.decoder_attention_heads}
    stacks = _stacks(model, base)
    for stack in stacks:
        for layer in range(len(model.get_submodule(f"{base}{stack}.layers"))):
            path, prefix = f"{base}{stack}.layers.{layer}", f"{stack}.blocks.{layer}"
            sublayers = [("attn", "self_attn", "ln1")]
            if stack == "decoder" and "encoder" in stacks:
                sublayers.append(("cross_attn", "encoder_attn", "ln_cross"))
            for kind, module, norm in sublayers:
                for letter in "QKV":
                    name = f"{prefix}.{kind}.b_{letter}"
                    linear = f"{path}.{module}.{letter.lower()}_proj"
                    add_heads(found, model, name, linear, heads[stack])
                add_vector(found, model, f"{prefix}.{kind}.b_O", f"{path}.{module}.out_proj")
                add_norm(found, model, f"{prefix}.{norm}", f"{path}.{module}_layer_norm")
            add_vector(found, model, f"{prefix}.mlp.b_in", f"{path}.fc1", "neuron")
            add_vector(found, model, f"{prefix}.mlp.b_out", f"{path}.fc2")
            add_norm(found, model, f"{prefix}.ln2", f"{path}.final_layer_norm")
        add_norm(found, model, f"{stack}.embed.ln", f"{base}{stack}.layernorm_embedding")
    return found


def mbart_bias_targets(model: nn.Module) -> dict[str, Target]:
    """mBART's: BART's, and the LayerNorm at the end of each stack ``{stack}.ln_final.w|b``."""
    found, base = bart_bias_targets(model), base_prefix(model)
    for stack in _stacks(model, base):
        add_norm(found, model, f"{stack}.ln_final", f"{base}{stack}.layer_norm")
    return found


__all__ = [
    "bart_bias_targets",
    "bert_bias_targets",
    "mbart_bias_targets",
    "t5_bias_targets",
    "vit_bias_targets",
]
