"""Hugging Face ``transformers`` causal LMs: GPT-2, GPT-NeoX / Pythia, Llama-family (encoders:
BERT, RoBERTa and ViT are in :mod:`.hf_encoders`, registered in :data:`FAMILIES` below).

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

from .._types import Layout, Target
from . import Adapter, model_class

_Q, _K, _V = 0, 1, 2


def _is_hf(model: object) -> bool:
    return model_class(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def _attn_target(name, module, shape, axes, ops, units):
    return Target(name, module, "weight", shape, axes, Layout(ops), kind="attn", unit_axes=units)


def _mlp_target(name, module, shape, axes, ops=()):
    return Target(
        name, module, "weight", shape, axes, Layout(ops), kind="mlp", unit_axes=("neuron",)
    )


_TRANSPOSE = ("permute", (1, 0))


def _linear_qkv(
    layer: int, letter: str, path: str, count: int, d_model: int, d_head: int, head_axis: str
) -> dict[str, Target]:
    """``W_Q|K|V`` of an ``nn.Linear`` stored ``[count * d_head, d_model]``."""
    name = f"blocks.{layer}.attn.W_{letter}"
    ops = (("unflatten", 0, (count, d_head)), ("permute", (0, 2, 1)))
    shape, axes = (count, d_model, d_head), (head_axis, "d_model", "d_head")
    return {name: _attn_target(name, path, shape, axes, ops, (head_axis, "d_head"))}


def _linear_o(layer: int, path: str, heads: int, d_head: int, d_model: int) -> dict[str, Target]:
    """``W_O`` of an ``nn.Linear`` stored ``[d_model, heads * d_head]``."""
    name = f"blocks.{layer}.attn.W_O"
    ops = (("unflatten", 1, (heads, d_head)), ("permute", (1, 2, 0)))
    shape, axes = (heads, d_head, d_model), ("head", "d_head", "d_model")
    return {name: _attn_target(name, path, shape, axes, ops, ("d_model",))}


def _linear_mlp(
    layer: int, inputs: dict[str, str], output: str, d_model: int, d_mlp: int
) -> dict[str, Target]:
    """An MLP of ``nn.Linear`` layers: ``inputs`` maps ``W_in`` (and ``W_gate``) to paths of
    weights stored ``[d_mlp, d_model]``; ``output`` is the path of ``W_out``."""
    found = {}
    for canonical, path in inputs.items():
        name = f"blocks.{layer}.mlp.{canonical}"
        found[name] = _mlp_target(
            name, path, (d_model, d_mlp), ("d_model", "neuron"), (_TRANSPOSE,)
        )
    name = f"blocks.{layer}.mlp.W_out"
    found[name] = _mlp_target(name, output, (d_mlp, d_model), ("neuron", "d_model"), (_TRANSPOSE,))
    return found


def _embedding_targets(model: nn.Module, embed: str, pos: str | None) -> dict[str, Target]:
    found = {}
    table = model.get_submodule(embed).weight
    found["embed.W_E"] = Target(
        "embed.W_E",
        embed,
        "weight",
        tuple(table.shape),
        ("d_vocab", "d_model"),
        default=False,
        kind="embedding",
        unit_axes=("d_vocab",),
    )
    if pos is not None:
        positions = model.get_submodule(pos).weight
        found["pos_embed.W_pos"] = Target(
            "pos_embed.W_pos",
            pos,
            "weight",
            tuple(positions.shape),
            ("n_ctx", "d_model"),
            default=False,
            kind="embedding",
            unit_axes=("n_ctx",),
        )
    return found


def _unembed_target(model: nn.Module, path: str = "lm_head") -> dict[str, Target]:
    head = getattr(model, path, None)
    if not isinstance(head, nn.Linear):
        return {}
    vocab, d_model = head.weight.shape
    return {
        "unembed.W_U": Target(
            "unembed.W_U",
            path,
            "weight",
            (d_model, vocab),
            ("d_model", "d_vocab"),
            Layout((("permute", (1, 0)),)),
            default=False,
            kind="unembedding",
            unit_axes=("d_vocab",),
        )
    }


def gpt2_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.config
    heads, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // heads
    d_mlp = cfg.n_inner or 4 * d_model
    base = _base_prefix(model)
    found = _embedding_targets(model, f"{base}wte", f"{base}wpe")
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
            found[name] = _attn_target(
                name,
                f"{block}.attn.c_attn",
                (heads, d_model, d_head),
                qkv_axes,
                ops,
                ("head", "d_head"),
            )
        name = f"blocks.{layer}.attn.W_O"
        found[name] = _attn_target(
            name,
            f"{block}.attn.c_proj",
            (heads, d_head, d_model),
            ("head", "d_head", "d_model"),
            (("unflatten", 0, (heads, d_head)),),
            ("d_model",),
        )
        found[f"blocks.{layer}.mlp.W_in"] = _mlp_target(
            f"blocks.{layer}.mlp.W_in", f"{block}.mlp.c_fc", (d_model, d_mlp), ("d_model", "neuron")
        )
        found[f"blocks.{layer}.mlp.W_out"] = _mlp_target(
            f"blocks.{layer}.mlp.W_out",
            f"{block}.mlp.c_proj",
            (d_mlp, d_model),
            ("neuron", "d_model"),
        )
    found.update(_unembed_target(model))
    return found


def neox_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.config
    heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    d_head = d_model // heads
    d_mlp = cfg.intermediate_size
    base = _base_prefix(model)
    found = _embedding_targets(model, f"{base}embed_in", None)
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}layers.{layer}"
        for letter, index in (("Q", _Q), ("K", _K), ("V", _V)):
            ops = (
                ("unflatten", 0, (heads, 3, d_head)),  # rows interleaved per head: [h, q|k|v, d]
                ("select", 1, index),
                ("permute", (0, 2, 1)),
            )
            name = f"blocks.{layer}.attn.W_{letter}"
            found[name] = _attn_target(
                name,
                f"{block}.attention.query_key_value",
                (heads, d_model, d_head),
                ("head", "d_model", "d_head"),
                ops,
                ("head", "d_head"),
            )
        found.update(_linear_o(layer, f"{block}.attention.dense", heads, d_head, d_model))
        found.update(
            _linear_mlp(
                layer,
                {"W_in": f"{block}.mlp.dense_h_to_4h"},
                f"{block}.mlp.dense_4h_to_h",
                d_model,
                d_mlp,
            )
        )
    found.update(_unembed_target(model, "lm_head" if hasattr(model, "lm_head") else "embed_out"))
    return found


def llama_targets(model: nn.Module) -> dict[str, Target]:
    cfg = model.config
    heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    d_head = getattr(cfg, "head_dim", None) or d_model // heads
    d_mlp = cfg.intermediate_size
    base = _base_prefix(model)
    found = _embedding_targets(model, f"{base}embed_tokens", None)
    for layer in range(cfg.num_hidden_layers):
        block = f"{base}layers.{layer}"
        for letter, proj, count, head_axis in (
            ("Q", "q_proj", heads, "head"),
            ("K", "k_proj", kv_heads, "kv_head"),
            ("V", "v_proj", kv_heads, "kv_head"),
        ):
            path = f"{block}.self_attn.{proj}"
            found.update(_linear_qkv(layer, letter, path, count, d_model, d_head, head_axis))
        found.update(_linear_o(layer, f"{block}.self_attn.o_proj", heads, d_head, d_model))
        inputs = {"W_gate": f"{block}.mlp.gate_proj", "W_in": f"{block}.mlp.up_proj"}
        found.update(_linear_mlp(layer, inputs, f"{block}.mlp.down_proj", d_model, d_mlp))
    found.update(_unembed_target(model))
    return found


from .hf_encoders import bert_targets, vit_targets  # noqa: E402  (it reuses the helpers above)

FAMILIES = {
    "gpt2": gpt2_targets,
    "gpt_neox": neox_targets,
    "llama": llama_targets,
    "bert": bert_targets,
    "roberta": bert_targets,
    "vit": vit_targets,
}


class HuggingFaceAdapter(Adapter):
    """``transformers`` models of the architectures in :data:`FAMILIES`."""

    family = "huggingface"

    def matches(self, model: object) -> bool:
        return _is_hf(model) and getattr(model.config, "model_type", None) in FAMILIES

    def all_targets(self, model: object) -> dict[str, Target]:
        root = self.root(model)
        return FAMILIES[root.config.model_type](root)


__all__ = ["FAMILIES", "HuggingFaceAdapter", "gpt2_targets", "llama_targets", "neox_targets"]
