"""Hugging Face ``transformers`` encoder-decoders: T5 (also the gated v1.1 / Flan MLP) and mT5
(T5 v1.1's layout), BART and mBART (BART's module names, pre-LN with a final norm per stack).

The blocks get TransformerLens's names and layouts under an ``encoder.`` or ``decoder.``
prefix, and the decoder's attention over the encoder output is ``cross_attn``:

- ``encoder.blocks.{L}.attn.W_Q|W_K|W_V`` ``[head, d_model, d_head]``,
  ``encoder.blocks.{L}.attn.W_O`` ``[head, d_head, d_model]``;
- ``decoder.blocks.{L}.attn.W_*`` (causal self-attention) and
  ``decoder.blocks.{L}.cross_attn.W_*`` (queries from the decoder, keys and values from the
  encoder output), same layouts;
- ``{encoder,decoder}.blocks.{L}.mlp.W_in`` ``[d_model, neuron]`` and ``mlp.W_out``
  ``[neuron, d_model]``; T5's gated MLP (``wi_0``, ``wi_1``) has ``mlp.W_gate`` (``wi_0``, the
  input of the activation) and ``mlp.W_in`` (``wi_1``, the linear branch), as Llama's
  ``gate_proj`` and ``up_proj`` are named.

Each is a view of an ``nn.Linear`` weight (stored ``[out, in]``), so masks convert exactly both
ways; these are the default targets. Not default (select them with ``include``): the token
embeddings ``encoder.embed.W_E`` and ``decoder.embed.W_E`` ``[d_vocab, d_model]`` (each stack's
``embed_tokens``, which the forward reads; transformers ties both to ``shared`` and to the
unembedding, but each is masked separately, as GPT-2's tied ``unembed.W_U`` is), the unembedding
``unembed.W_U`` ``[d_model, d_vocab]`` (``lm_head``), BART's learned positions ``encoder.pos_embed.W_pos`` /
``decoder.pos_embed.W_pos`` ``[n_ctx, d_model]``, T5's relative-position bias tables
``encoder.pos_embed.W_rel_bias`` / ``decoder.pos_embed.W_rel_bias`` ``[bucket, head]`` (only
block 0 of each stack has one) and the sequence-classification head (``classifier.W_dense``,
``classifier.W``). Biases and norms are
opt-in targets (:mod:`.hf_biases_stacks`). Nothing here imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from torch import nn

from .._types import Target
from . import real_tensor
from ._hf_common import (
    base_prefix,
    embedding_table,
    linear_mlp,
    linear_o,
    linear_qkv,
    linear_readout,
    position_table,
)

_VOCAB = ("d_model", "d_vocab")
_CLASSIFIER_HEADS = (
    ("classifier.W_dense", "classification_head.dense", ("d_model", "classifier_hidden")),
    ("classifier.W", "classification_head.out_proj", ("classifier_hidden", "label")),
)


def _renamed(found: dict[str, Target], old: str, new: str) -> dict[str, Target]:
    """``found`` with the name prefix ``old`` replaced by ``new``."""
    return {
        new + name[len(old) :]: replace(target, name=new + name[len(old) :])
        for name, target in found.items()
    }


def _shape(model: nn.Module, path: str) -> tuple[int, int]:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        seen = model.__dict__.get("_model", model)  # a bridge's model, through `_Unwrapped`
        where = " (inside a TransformerLens bridge)" if seen is not model else ""
        raise ValueError(
            f"{type(seen).__qualname__}{where} (model_type {model.config.model_type!r}) has no "
            f"nn.Linear at {path!r}, where subnet_interp expects one; this transformers version "
            "may have renamed its modules. Use the plain adapter's parameter names instead "
            "(wrap the model in a plain nn.Module) or report the module names."
        )
    out_features, in_features = real_tensor(module, "weight").shape
    return out_features, in_features


class _Stack:
    """Builds one stack's targets (``encoder`` or ``decoder``) with the model at hand."""

    def __init__(self, model: nn.Module, stack: str, heads: int):
        self.model, self.stack, self.heads = model, stack, heads

    def attention(self, layer: int, kind: str, paths: tuple[str, ...]) -> dict[str, Target]:
        shapes = [_shape(self.model, path) for path in paths]  # [out, in] each
        d_model, d_head = shapes[3][0], shapes[3][1] // self.heads
        found: dict[str, Target] = {}
        for letter, path in zip("QKV", paths[:3], strict=True):
            found.update(linear_qkv(layer, letter, path, self.heads, d_model, d_head, "head"))
        found.update(linear_o(layer, paths[3], self.heads, d_head, d_model))
        return _renamed(found, f"blocks.{layer}.attn.", f"{self.stack}.blocks.{layer}.{kind}.")

    def mlp(self, layer: int, inputs: dict[str, str], output: str) -> dict[str, Target]:
        d_model, d_mlp = _shape(self.model, output)
        for path in inputs.values():
            _shape(self.model, path)
        found = linear_mlp(layer, inputs, output, d_model, d_mlp)
        return _renamed(found, f"blocks.{layer}.mlp.", f"{self.stack}.blocks.{layer}.mlp.")


def _token_embedding(model: nn.Module, base: str, stack: str) -> dict[str, Target]:
    path, name = f"{base}{stack}.embed_tokens", f"{stack}.embed.W_E"
    shape = tuple(real_tensor(model.get_submodule(path), "weight").shape)
    return {name: embedding_table(name, path, shape, ("d_vocab", "d_model"))}


def _readouts(model: nn.Module) -> dict[str, Target]:
    found = linear_readout(model, "unembed.W_U", "lm_head", _VOCAB, "unembedding")
    for name, path, axes in _CLASSIFIER_HEADS:
        found.update(linear_readout(model, name, path, axes, "classifier"))
    return found


def _stacks(model: nn.Module, base: str) -> list[str]:
    """``encoder`` and, unless the model is an encoder alone, ``decoder``."""
    return [s for s in ("encoder", "decoder") if hasattr(model.get_submodule(base[:-1] or ""), s)]


def t5_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a T5 model (``T5Model``, ``T5ForConditionalGeneration``, ``T5EncoderModel``,
    ``T5ForSequenceClassification``) or an mT5 model (the same classes' ``MT5`` twins, T5
    v1.1's layout), with the plain (``wi``) or gated (``wi_0``, ``wi_1``) MLP."""
    base = base_prefix(model)
    found: dict[str, Target] = {}
    for stack in _stacks(model, base):
        found.update(_token_embedding(model, base, stack))
        blocks = model.get_submodule(f"{base}{stack}.block")
        builder = _Stack(model, stack, model.config.num_heads)
        for layer in range(len(blocks)):
            prefix = f"{base}{stack}.block.{layer}.layer"
            sublayers = [(0, "attn", "SelfAttention")]
            if stack == "decoder":
                sublayers.append((1, "cross_attn", "EncDecAttention"))
            for index, kind, module in sublayers:
                paths = tuple(f"{prefix}.{index}.{module}.{x}" for x in "qkvo")
                found.update(builder.attention(layer, kind, paths))
            dense = f"{prefix}.{len(sublayers)}.DenseReluDense"
            gated = hasattr(model.get_submodule(dense), "wi_0")
            inputs = (
                {"W_gate": f"{dense}.wi_0", "W_in": f"{dense}.wi_1"}
                if gated
                else {"W_in": f"{dense}.wi"}
            )
            found.update(builder.mlp(layer, inputs, f"{dense}.wo"))
        bias = f"{base}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        try:
            table = model.get_submodule(bias)
        except AttributeError:
            continue
        name = f"{stack}.pos_embed.W_rel_bias"
        found[name] = embedding_table(
            name, bias, tuple(real_tensor(table, "weight").shape), ("bucket", "head")
        )
    found.update(_readouts(model))
    return found


def bart_targets(model: nn.Module) -> dict[str, Target]:
    """Targets of a BART model (``BartModel``, ``BartForConditionalGeneration``,
    ``BartForSequenceClassification``; ``BartForCausalLM``, a decoder alone, has no
    ``cross_attn`` targets) or an mBART model (the ``MBart`` twins: the same modules, its norms
    before each sub-layer and at each stack's end, which hold no weight matrix)."""
    cfg = model.config
    base = base_prefix(model)
    found: dict[str, Target] = {}
    heads = {"encoder": cfg.encoder_attention_heads, "decoder": cfg.decoder_attention_heads}
    stacks = _stacks(model, base)
    for stack in stacks:
        found.update(_token_embedding(model, base, stack))
        builder = _Stack(model, stack, heads[stack])
        layers = model.get_submodule(f"{base}{stack}.layers")
        for layer in range(len(layers)):
            prefix = f"{base}{stack}.layers.{layer}"
            sublayers = [("attn", "self_attn")]
            if stack == "decoder" and "encoder" in stacks:  # BartForCausalLM never runs it
                sublayers.append(("cross_attn", "encoder_attn"))
            for kind, module in sublayers:
                paths = tuple(f"{prefix}.{module}.{x}_proj" for x in ("q", "k", "v", "out"))
                found.update(builder.attention(layer, kind, paths))
            found.update(builder.mlp(layer, {"W_in": f"{prefix}.fc1"}, f"{prefix}.fc2"))
        positions = f"{base}{stack}.embed_positions"
        name = f"{stack}.pos_embed.W_pos"
        table = model.get_submodule(positions)
        shape = tuple(real_tensor(table, "weight").shape)
        # BART's forward reads row position + offset (2)
        found[name] = position_table(name, positions, shape, getattr(table, "offset", 0))
    found.update(_readouts(model))
    return found


class _Unwrapped(nn.Module):
    """The transformers model a TransformerLens bridge wraps, seen through its original module
    names (a read-only view for the target builders, never run): ``get_submodule`` steps into
    each bridge component's ``_original_component`` and walks on by the transformers module's
    own names, ending at the ``nn.Linear`` / ``nn.Embedding`` itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # unregistered: a view, not a parent

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def get_submodule(self, path: str) -> nn.Module:
        module = _innermost(self._model)
        for part in path.split(".") if path else ():
            child = module._modules.get(part)
            if child is None:
                raise AttributeError(f"no module {part!r} on the way to {path!r}")
            module = _innermost(child)
        return module


def _innermost(module: nn.Module) -> nn.Module:
    """The transformers module a bridge component wraps (``module`` if it is none): its
    children are what the model's own forward calls (the bridge routes assignments there)."""
    while isinstance(module._modules.get("_original_component"), nn.Module):
        module = module._modules["_original_component"]
    return module


_BRIDGE_BUILDERS = {
    "t5": t5_targets,
    "mt5": t5_targets,
    "bart": bart_targets,
    "mbart": bart_targets,
}

# model_type -> the name of the stack's block list (under ``{base}{stack}.``)
_BLOCK_LISTS = {"t5": "block", "mt5": "block", "bart": "layers", "mbart": "layers"}


def seq2seq_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The encoder's blocks then the decoder's (either alone for a one-stack model, e.g.
    ``T5EncoderModel``, ``BartForCausalLM``), in the order a TransformerLens bridge lists its
    ``encoder_blocks`` and ``decoder_blocks``; ``None`` if ``model`` is no encoder-decoder
    family here."""
    blocks = _BLOCK_LISTS.get(getattr(model.config, "model_type", None))
    if blocks is None:
        return None
    base = base_prefix(model)
    return [b for s in _stacks(model, base) for b in model.get_submodule(f"{base}{s}.{blocks}")]


def bridge_seq2seq_targets(
    root: nn.Module, builders: Mapping[str, Callable[[nn.Module], dict[str, Target]]] | None = None
) -> dict[str, Target]:
    """The Hugging Face adapter's targets of the T5 or BART model a TransformerLens bridge
    ``root`` wraps (its ``original_model``), same names, shapes, layouts and defaults, each
    pointing at the ``nn.Linear`` / ``nn.Embedding`` inside the bridge component that wraps it
    (by its shortest path under ``root``). A module the bridge does not register is reached
    through ``original_model`` (the bridge keeps the model there, unregistered): T5's
    ``encoder.embed_tokens`` / ``decoder.embed_tokens``, which the forward reads, are modules of
    their own tied to ``shared``, and the bridge's ``embed`` wraps ``shared``, which T5's forward
    never calls. Empty for a bridge of another family. ``builders`` (model type -> target
    builder; default the weight targets') may name other builders of the same models, e.g.
    the bias and norm targets of :mod:`.hf_biases_stacks`."""
    wrapped = root.__dict__.get("original_model")
    builder = (builders or _BRIDGE_BUILDERS).get(
        getattr(getattr(wrapped, "config", None), "model_type", None)
    )
    if builder is None:
        return {}
    paths: dict[int, str] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        known = paths.get(id(module))
        if known is None or len(path) < len(known):
            paths[id(module)] = path
    view = _Unwrapped(wrapped)
    found: dict[str, Target] = {}
    for name, target in builder(view).items():
        module = view.get_submodule(target.module)
        path = paths.get(id(module))
        if path is None:  # a module the bridge does not register, reached through the model
            path = f"original_model.{target.module}"
            try:
                if root.get_submodule(path) is not module:
                    continue
            except AttributeError:
                continue
        found[name] = replace(target, module=path)
    return found


__all__ = ["bart_targets", "bridge_seq2seq_targets", "seq2seq_blocks", "t5_targets"]
