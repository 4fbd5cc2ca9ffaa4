"""Hugging Face ``transformers`` encoders: BERT, RoBERTa and ViT.

The blocks get the decoder families' canonical names and layouts (TransformerLens's):
``blocks.{L}.attn.W_Q|W_K|W_V`` ``[head, d_model, d_head]``, ``blocks.{L}.attn.W_O``
``[head, d_head, d_model]``, ``blocks.{L}.mlp.W_in`` ``[d_model, neuron]`` and
``blocks.{L}.mlp.W_out`` ``[neuron, d_model]``, each a view of an ``nn.Linear`` weight (stored
``[out, in]``), so masks convert exactly both ways. These are the default targets.

Not default (select them with ``include``):

- embeddings: ``embed.W_E`` ``[d_vocab, d_model]``, ``pos_embed.W_pos`` ``[n_ctx, d_model]``,
  ``token_type_embed.W_token_type`` ``[token_type, d_model]`` (BERT / RoBERTa);
  ``embed.W_patch`` ``[channel, patch_h, patch_w, d_model]`` (the patch ``Conv2d``),
  ``embed.W_cls`` ``[d_model]`` (the class token) and ``pos_embed.W_pos`` (ViT);
- read-outs, which belong to a task rather than to the encoder (as the unembedding of a
  language model): ``pooler.W`` ``[d_model, pooled]``, ``mlm_head.W`` ``[d_model, mlm_hidden]``
  (the masked-LM transform), ``unembed.W_U`` ``[d_model, d_vocab]`` (the masked-LM decoder,
  masked separately from the tied ``embed.W_E``), ``nsp_head.W`` ``[d_model, label]``,
  ``classifier.W`` ``[d_model, label]`` and, for RoBERTa's two-layer classification head,
  ``classifier.W_dense`` ``[d_model, classifier_hidden]`` in front of it.

Cross-attention of BERT used as a decoder and ViT's ``mask_token`` are not targets; biases and
norms are opt-in targets (:mod:`.hf_biases_stacks`). Nothing here imports ``transformers``.
"""

from __future__ import annotations

from torch import nn

from .._types import Layout, Target
from . import real_tensor
from ._hf_common import (
    base_prefix,
    embedding_table,
    embedding_targets,
    has_linear,
    linear_mlp,
    linear_o,
    linear_qkv,
    linear_readout,
)

# Paths of one block's Q, K, V, O, MLP-in and MLP-out linears, relative to the base model.
_BERT_BLOCKS = (
    (
        "encoder.layer.{layer}",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
)
_VIT_BLOCKS = (
    (  # transformers 5 (ViTAttention with q/k/v/o_proj, ViTMLP)
        "layers.{layer}",
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
    ),
    (  # earlier releases: BERT-style blocks
        "encoder.layer.{layer}",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
)


def _block_paths(model: nn.Module, base: str, candidates: tuple[tuple[str, ...], ...]):
    for block, *linears in candidates:
        first = f"{base}{block.format(layer=0)}"
        if all(has_linear(model, f"{first}.{path}") for path in linears):
            return block, linears
    expected = [f"{base}{c[0].format(layer=0)}.{c[1]}" for c in candidates]
    raise ValueError(
        f"{type(model).__qualname__} (model_type {model.config.model_type!r}) does not have "
        f"the encoder blocks subnet_interp knows (looked for {expected}); this transformers "
        "version may have renamed them. Use the plain adapter's parameter names instead "
        "(wrap the model in a plain nn.Module) or report the module names."
    )


def _blocks(
    model: nn.Module,
    base: str,
    candidates: tuple[tuple[str, ...], ...],
    n_layers: int,
    heads: int,
    d_head: int,
) -> dict[str, Target]:
    block, (q, k, v, o, mlp_in, mlp_out) = _block_paths(model, base, candidates)
    found = {}
    for layer in range(n_layers):
        prefix = f"{base}{block.format(layer=layer)}"
        d_model = real_tensor(model.get_submodule(f"{prefix}.{q}"), "weight").shape[1]
        for letter, path in (("Q", q), ("K", k), ("V", v)):
            found.update(
                linear_qkv(layer, letter, f"{prefix}.{path}", heads, d_model, d_head, "head")
            )
        found.update(linear_o(layer, f"{prefix}.{o}", heads, d_head, d_model))
        d_mlp = real_tensor(model.get_submodule(f"{prefix}.{mlp_in}"), "weight").shape[0]
        inputs = {"W_in": f"{prefix}.{mlp_in}"}
        found.update(linear_mlp(layer, inputs, f"{prefix}.{mlp_out}", d_model, d_mlp))
    return found


def _readouts(model: nn.Module, base: str, heads: tuple[tuple[str, str, tuple, str], ...]):
    found: dict[str, Target] = {}
    found.update(
        linear_readout(model, "pooler.W", f"{base}pooler.dense", ("d_model", "pooled"), "pooler")
    )
    for name, path, axes, kind in heads:
        if name not in found:  # the first path a model has wins
            found.update(linear_readout(model, name, path, axes, kind))
    return found


_MLM = ("d_model", "mlm_hidden")
_VOCAB = ("d_model", "d_vocab")
_LABEL = ("d_model", "label")
_BERT_READOUTS = (
    ("mlm_head.W", "cls.predictions.transform.dense", _MLM, "mlm_head"),  # BERT
    ("mlm_head.W", "lm_head.dense", _MLM, "mlm_head"),  # RoBERTa
    ("unembed.W_U", "cls.predictions.decoder", _VOCAB, "unembedding"),
    ("unembed.W_U", "lm_head.decoder", _VOCAB, "unembedding"),
    ("nsp_head.W", "cls.seq_relationship", _LABEL, "classifier"),
    ("classifier.W_dense", "classifier.dense", ("d_model", "classifier_hidden"), "classifier"),
    ("classifier.W", "classifier.out_proj", ("classifier_hidden", "label"), "classifier"),
    ("classifier.W", "classifier", _LABEL, "classifier"),
)


def bert_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a BERT or RoBERTa model (``BertModel``, ``BertFor*``, ``Roberta*``)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    d_head = cfg.hidden_size // heads
    base = base_prefix(model)
    embeddings = f"{base}embeddings"
    # RoBERTa numbers positions from padding_idx + 1 (its padding tokens read row padding_idx)
    padding = getattr(model.get_submodule(embeddings), "padding_idx", None)
    found = embedding_targets(
        model,
        f"{embeddings}.word_embeddings",
        f"{embeddings}.position_embeddings",
        0 if padding is None else padding + 1,
    )
    token_types = model.get_submodule(embeddings).token_type_embeddings
    found["token_type_embed.W_token_type"] = embedding_table(
        "token_type_embed.W_token_type",
        f"{embeddings}.token_type_embeddings",
        tuple(real_tensor(token_types, "weight").shape),
        ("token_type", "d_model"),
    )
    found.update(_blocks(model, base, _BERT_BLOCKS, cfg.num_hidden_layers, heads, d_head))
    found.update(_readouts(model, base, _BERT_READOUTS))
    return found


def vit_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a ViT model (``ViTModel``, ``ViTForImageClassification``, ...)."""
    cfg = model.config
    heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    base = base_prefix(model)
    embeddings = f"{base}embeddings"
    owner = model.get_submodule(embeddings)
    patch = f"{embeddings}.patch_embeddings.projection"
    d_model, channels, patch_h, patch_w = real_tensor(model.get_submodule(patch), "weight").shape
    n_ctx = real_tensor(owner, "position_embeddings").shape[1]
    found = {
        "embed.W_patch": Target(
            "embed.W_patch",
            patch,
            "weight",
            (channels, patch_h, patch_w, d_model),
            ("channel", "patch_h", "patch_w", "d_model"),
            Layout((("permute", (1, 2, 3, 0)),)),  # Conv2d stores [d_model, channel, h, w]
            default=False,
            kind="embedding",
            unit_axes=("d_model",),
        ),
        "embed.W_cls": Target(
            "embed.W_cls",
            embeddings,
            "cls_token",
            (d_model,),
            ("d_model",),
            Layout((("select", 0, 0), ("select", 0, 0))),  # stored [1, 1, d_model]
            default=False,
            kind="embedding",
        ),
        "pos_embed.W_pos": Target(
            "pos_embed.W_pos",
            embeddings,
            "position_embeddings",
            (n_ctx, d_model),
            ("n_ctx", "d_model"),
            Layout((("select", 0, 0),)),  # stored [1, n_ctx, d_model]
            default=False,
            kind="embedding",
            unit_axes=("n_ctx",),
        ),
    }
    found.update(_blocks(model, base, _VIT_BLOCKS, cfg.num_hidden_layers, heads, d_head))
    found.update(_readouts(model, base, (("classifier.W", "classifier", _LABEL, "classifier"),)))
    return found


__all__ = ["bert_targets", "vit_targets"]
