"""Shared pieces of the Hugging Face ``transformers`` adapters (:mod:`.hf` for the causal LMs,
:mod:`.hf_encoders` for BERT, RoBERTa and ViT): detection, the target builders for
``nn.Linear`` Q/K/V, O, MLP and embedding weights, where the blocks live, and transformers' own
re-initialisation.

Both adapters import from here and :mod:`.hf_encoders` imports nothing from :mod:`.hf`; the
plain and TransformerLens adapters use the block lists and the re-initialisation for
transformers models they hold. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._types import IDENTITY, Layout, Target
from . import model_class, real_tensor

TRANSPOSE = ("permute", (1, 0))  # [out, in] nn.Linear weight <-> canonical [in, out]

# Where the blocks of Hugging Face models live, relative to the base model: GPT-2 (``h``),
# GPT-NeoX / Llama / ViT in transformers 5 (``layers``), BERT / RoBERTa / earlier ViT
# (``encoder.layer``), encoder-decoders' decoders.
BLOCK_LISTS = ("h", "layers", "encoder.layer", "encoder.layers", "decoder.layers")


def is_hf(model: object) -> bool:
    """Whether ``model`` is a ``transformers`` module with a config (any architecture)."""
    return model_class(model).__module__.startswith("transformers.") and hasattr(model, "config")


def base_prefix(model: nn.Module) -> str:
    """``"<base_model_prefix>."`` when ``model`` is a head model holding its base model there
    (``GPT2LMHeadModel.transformer``), else ``""`` (the base model itself)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def block_list(root: nn.Module) -> nn.ModuleList | None:
    """The first ``nn.ModuleList`` at one of :data:`BLOCK_LISTS` under ``root``'s base model;
    ``None`` if there is none."""
    base = base_prefix(root)
    for candidate in BLOCK_LISTS:
        try:
            found = root.get_submodule(base + candidate)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    return None


def is_pretrained(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``PreTrainedModel`` (it has ``init_weights`` and
    ``_init_weights``), checked without importing transformers."""
    return (
        type(module).__module__.startswith("transformers.")
        and hasattr(module, "config")
        and callable(getattr(module, "init_weights", None))
        and callable(getattr(module, "_init_weights", None))
    )


def outermost_pretrained(candidates: Iterable[nn.Module]) -> nn.Module | None:
    """The first ``transformers`` model among ``candidates`` (from ``root.modules()``: the
    outermost one), or ``None``."""
    return next((m for m in candidates if is_pretrained(m)), None)


def init_weights(model: nn.Module) -> None:
    """Re-initialise a ``transformers`` model its own way (``init_weights()``: ``_init_weights``
    per module, then re-tying), also the modules it already marked as initialised."""
    # transformers marks initialised modules and tensors and skips them in init_weights()
    for sub in model.modules():
        sub.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if "_is_hf_initialized" in getattr(tensor, "__dict__", {}):
                del tensor._is_hf_initialized
    model.init_weights()


@dataclass(frozen=True)
class DecoderDims:
    """The sizes a Llama-style decoder's config gives (``transformers`` names in brackets)."""

    n_layers: int  # num_hidden_layers
    d_model: int  # hidden_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (grouped-query attention); default: heads
    d_head: int  # head_dim; default: d_model // heads
    d_mlp: int | None  # intermediate_size; None where the config has none


def decoder_dims(config: Any) -> DecoderDims:
    """The :class:`DecoderDims` of a Llama-style ``transformers`` config (Llama, Qwen2,
    Mistral, Gemma, Phi-3, mixture-of-experts decoders)."""
    heads, d_model = config.num_attention_heads, config.hidden_size
    return DecoderDims(
        n_layers=config.num_hidden_layers,
        d_model=d_model,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        d_head=getattr(config, "head_dim", None) or d_model // heads,
        d_mlp=getattr(config, "intermediate_size", None),
    )


def attn_target(name, module, shape, axes, ops, units) -> Target:
    """An attention weight target (``kind="attn"``) viewed through ``ops``."""
    return Target(name, module, "weight", shape, axes, Layout(ops), kind="attn", unit_axes=units)


def mlp_target(name, module, shape, axes, ops=()) -> Target:
    """An MLP weight target (``kind="mlp"``, one unit per neuron) viewed through ``ops``."""
    return Target(
        name, module, "weight", shape, axes, Layout(ops), kind="mlp", unit_axes=("neuron",)
    )


def linear_qkv(
    layer: int, letter: str, path: str, count: int, d_model: int, d_head: int, head_axis: str
) -> dict[str, Target]:
    """``W_Q|K|V`` of an ``nn.Linear`` stored ``[count * d_head, d_model]``."""
    name = f"blocks.{layer}.attn.W_{letter}"
    ops = (("unflatten", 0, (count, d_head)), ("permute", (0, 2, 1)))
    shape, axes = (count, d_model, d_head), (head_axis, "d_model", "d_head")
    return {name: attn_target(name, path, shape, axes, ops, (head_axis, "d_head"))}


def linear_o(layer: int, path: str, heads: int, d_head: int, d_model: int) -> dict[str, Target]:
    """``W_O`` of an ``nn.Linear`` stored ``[d_model, heads * d_head]``."""
    name = f"blocks.{layer}.attn.W_O"
    ops = (("unflatten", 1, (heads, d_head)), ("permute", (1, 2, 0)))
    shape, axes = (heads, d_head, d_model), ("head", "d_head", "d_model")
    return {name: attn_target(name, path, shape, axes, ops, ("d_model",))}


def llama_attention(layer: int, path: str, dims: DecoderDims) -> dict[str, Target]:
    """``blocks.{L}.attn.W_Q|K|V|O`` of a Llama-style attention module at ``path``
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``); with grouped-query attention K and V have
    ``kv_head`` axes of ``dims.kv_heads``."""
    found: dict[str, Target] = {}
    for letter, proj, count, head_axis in (
        ("Q", "q_proj", dims.heads, "head"),
        ("K", "k_proj", dims.kv_heads, "kv_head"),
        ("V", "v_proj", dims.kv_heads, "kv_head"),
    ):
        found.update(
            linear_qkv(layer, letter, f"{path}.{proj}", count, dims.d_model, dims.d_head, head_axis)
        )
    found.update(linear_o(layer, f"{path}.o_proj", dims.heads, dims.d_head, dims.d_model))
    return found


def linear_mlp(
    layer: int, inputs: dict[str, str], output: str, d_model: int, d_mlp: int
) -> dict[str, Target]:
    """An MLP of ``nn.Linear`` layers: ``inputs`` maps ``W_in`` (and ``W_gate``) to paths of
    weights stored ``[d_mlp, d_model]``; ``output`` is the path of ``W_out``."""
    found = {}
    for canonical, path in inputs.items():
        name = f"blocks.{layer}.mlp.{canonical}"
        found[name] = mlp_target(name, path, (d_model, d_mlp), ("d_model", "neuron"), (TRANSPOSE,))
    name = f"blocks.{layer}.mlp.W_out"
    found[name] = mlp_target(name, output, (d_mlp, d_model), ("neuron", "d_model"), (TRANSPOSE,))
    return found


def embedding_table(
    name: str, path: str, shape: tuple[int, ...], axes: tuple[str, ...], layout: Layout = IDENTITY
) -> Target:
    """A non-default embedding target: the ``weight`` table at ``path``, one unit per row
    (``axes[0]``: a token, a position, a token type)."""
    return Target(
        name,
        path,
        "weight",
        shape,
        axes,
        layout,
        default=False,
        kind="embedding",
        unit_axes=(axes[0],),
    )


def position_table(name: str, path: str, shape: tuple[int, int], offset: int = 0) -> Target:
    """A learned position table whose row ``offset + p`` is position ``p`` (OPT's and BART's
    ``offset`` of 2; RoBERTa's ``padding_idx + 1``): ``W_pos[p]`` is the row position ``p``
    reads, as TransformerLens numbers positions; the rows before (padding) are no target's."""
    rows, width = shape
    n_ctx = rows - offset
    layout = Layout((("narrow", 0, offset, n_ctx),)) if offset else IDENTITY
    return embedding_table(name, path, (n_ctx, width), ("n_ctx", "d_model"), layout)


def embedding_targets(
    model: nn.Module, embed: str, pos: str | None, offset: int = 0
) -> dict[str, Target]:
    """``embed.W_E`` of the ``nn.Embedding`` at ``embed`` and, if ``pos`` is given,
    ``pos_embed.W_pos`` of the one at ``pos`` (:func:`position_table`; not default targets)."""
    table = model.get_submodule(embed).weight
    found = {
        "embed.W_E": embedding_table("embed.W_E", embed, tuple(table.shape), ("d_vocab", "d_model"))
    }
    if pos is not None:
        positions = model.get_submodule(pos).weight
        found["pos_embed.W_pos"] = position_table(
            "pos_embed.W_pos", pos, tuple(positions.shape), offset
        )
    return found


def has_linear(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has an ``nn.Linear`` at ``path``."""
    try:
        return isinstance(model.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


def linear_readout(
    model: nn.Module, name: str, path: str, axes: tuple[str, str], kind: str
) -> dict[str, Target]:
    """The ``nn.Linear`` at ``path`` (if the model has one) as a non-default ``[in, out]``
    target, one unit per output (``{}`` when there is none): task read-outs, projections."""
    if not has_linear(model, path):
        return {}
    out_features, in_features = real_tensor(model.get_submodule(path), "weight").shape
    target = Target(
        name,
        path,
        "weight",
        (in_features, out_features),
        axes,
        Layout((TRANSPOSE,)),
        default=False,
        kind=kind,
        unit_axes=(axes[1],),
    )
    return {name: target}


def unembed_target(model: nn.Module, path: str = "lm_head") -> dict[str, Target]:
    """``unembed.W_U`` ``[d_model, d_vocab]`` of the ``nn.Linear`` at ``path`` (not a default
    target; masked separately from a tied embedding); ``{}`` if there is none."""
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


__all__ = [
    "BLOCK_LISTS",
    "DecoderDims",
    "TRANSPOSE",
    "attn_target",
    "base_prefix",
    "block_list",
    "decoder_dims",
    "embedding_table",
    "embedding_targets",
    "has_linear",
    "init_weights",
    "is_hf",
    "is_pretrained",
    "linear_mlp",
    "linear_o",
    "linear_qkv",
    "linear_readout",
    "llama_attention",
    "mlp_target",
    "outermost_pretrained",
    "unembed_target",
]
