"""Opt-in bias and norm-weight targets of TransformerLens models (``si.targets(model,
biases=True)``), with the Hugging Face adapter's names, shapes and axes
(:mod:`.hf_biases`: ``blocks.{L}.attn.b_Q`` ``[head, d_head]``, ``blocks.{L}.mlp.b_in``,
``blocks.{L}.ln1.w``, ``ln_final.b``, ...), so a bias mask found on one wrapper applies to the
others. Like every bias / norm target they are ``default=False`` and left out of the
fingerprint.

**TransformerBridge**: the names, order, shapes and axes are those the Hugging Face adapter
gives the transformers model the bridge wraps (read through its original module names); each
target then points at the tensor the bridge computes with, the ``bias`` / ``weight`` of the
bridge component of the same TransformerLens name (``blocks.{L}.attn.q`` for ``b_Q``,
``blocks.{L}.mlp.in`` for ``b_in``, ``blocks.{L}.ln1`` for ``ln1.w``, ``ln_final``, BERT's
``embed_ln`` for ``embed.ln.w``, ...). That
matters where the bridge splits a fused projection into copies (GPT-2's ``c_attn``, GPT-NeoX's
``query_key_value``): its forward reads the split ``q`` / ``k`` / ``v`` layers, not the fused one.
Of T5 and BART, whose bridges compute with the transformers layers themselves, the targets are
the Hugging Face adapter's on those layers (as their weights are, :mod:`.hf_seq2seq`). A bias the
bridge has no component for (none of the families tested) is left out, so a mask naming it is
refused by ``si.masked`` with the available names. A bridge of a TransformerLens-native model
(no transformers model inside) has none. After ``enable_compatibility_mode()`` (``fold_ln``)
the norm weights have been folded into the next weights: find masks on the processed model.

**HookedTransformer** (transformer-lens < 4) stores the biases in the canonical layout already:
``attn.b_Q|b_K|b_V`` ``[head, d_head]`` (grouped-query ``_b_K`` / ``_b_V`` ``[kv_head, d_head]``),
``attn.b_O``, ``mlp.b_in|b_out`` (a ``GatedMLP`` has no gate bias) and the norms' ``w`` / ``b``
(``ln1``, ``ln2``, Gemma-2's ``ln1_post`` / ``ln2_post``, ``ln_final``), each an identity view.
TransformerLens keeps zero biases for models without them (Llama), so there the names are a
superset of the Hugging Face model's. A folded norm (``LayerNormPre``, ``fold_ln=True``) has no
weight and gives no target; the unembedding bias ``b_U`` is a read-out bias, not a target (as in
the Hugging Face adapter).

Nothing here imports transformer_lens or transformers.
"""

from __future__ import annotations

import math

from torch import nn

from .._types import Layout, Target
from . import real_tensor
from .hf import BIAS_FAMILIES
from .hf_biases_stacks import bart_bias_targets, t5_bias_targets
from .hf_seq2seq import _Unwrapped, bridge_seq2seq_targets

_SEQ2SEQ = {"t5": t5_bias_targets, "bart": bart_bias_targets}
# the bridge component (under the target's owner) that holds a canonical bias
_COMPONENTS = {
    "b_Q": "q",
    "b_K": "k",
    "b_V": "v",
    "b_O": "o",
    "b_gate": "gate",
    "b_in": "in",
    "b_out": "out",
}
_NORM_COMPONENTS = {"embed.ln": "embed_ln"}


def _target(name, path, attribute, shape, axes, ops, kind) -> Target:
    return Target(
        name,
        path,
        attribute,
        tuple(shape),
        tuple(axes),
        Layout(ops),
        default=False,
        kind=kind,
        unit_axes=tuple(axes),
    )


def _wrapped_path(root: nn.Module, path: str) -> str | None:
    """The path of the module a bridge component at ``path`` wraps (following
    ``_original_component`` down to the torch layer); ``None`` if there is no such component."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    while isinstance(module._modules.get("_original_component"), nn.Module):
        module, path = module._modules["_original_component"], f"{path}._original_component"
    return path


def _bridge_location(name: str) -> tuple[str, str]:
    """(bridge component path, attribute) of a canonical bias or norm name."""
    owner, _, last = name.rpartition(".")
    if last in ("w", "b"):  # a norm: blocks.L.ln1.w, ln_final.b, blocks.L.attn.q_norm.w
        # BERT's embedding LayerNorm (canonical embed.ln) is the bridge's embed_ln
        return _NORM_COMPONENTS.get(owner, owner), "weight" if last == "w" else "bias"
    return f"{owner}.{_COMPONENTS.get(last, last)}", "bias"


def bridge_bias_targets(root: nn.Module) -> dict[str, Target]:
    """The bias and norm-weight targets of a TransformerBridge ``root``: the Hugging Face
    adapter's names, shapes and axes for the transformers model it wraps, on the tensors the
    bridge's components compute with (see the module docstring)."""
    wrapped = root.__dict__.get("original_model")
    family = getattr(getattr(wrapped, "config", None), "model_type", None)
    if family in _SEQ2SEQ:
        return bridge_seq2seq_targets(root, _SEQ2SEQ)
    if family not in BIAS_FAMILIES:
        return {}
    found: dict[str, Target] = {}
    for name, spec in BIAS_FAMILIES[family](_Unwrapped(wrapped)).items():
        component, attribute = _bridge_location(name)
        path = _wrapped_path(root, component)
        if path is None:
            continue
        real = real_tensor(root.get_submodule(path), attribute)
        if not isinstance(real, nn.Parameter) or real.numel() != math.prod(spec.shape):
            continue
        ops = (("unflatten", 0, spec.shape),) if len(spec.shape) > 1 else ()
        found[name] = _target(name, path, attribute, spec.shape, spec.axes, ops, spec.kind)
    return found


def hooked_bias_targets(root: nn.Module) -> dict[str, Target]:
    """The bias and norm-weight targets of a legacy HookedTransformer ``root``, identity views
    of its ``b_*`` and norm ``w`` / ``b`` parameters (see the module docstring)."""
    found: dict[str, Target] = {}

    def add(name, path, attribute, axes, kind="bias"):
        try:
            real = real_tensor(root.get_submodule(path), attribute)
        except AttributeError:  # no such module (e.g. ln1_post outside Gemma-2)
            return
        if isinstance(real, nn.Parameter):
            found[name] = _target(name, path, attribute, real.shape, axes, (), kind)

    def norm(name, path, axis="d_model"):
        for attribute, letter in (("w", "w"), ("b", "b")):
            add(f"{name}.{letter}", path, attribute, (axis,), "norm")

    for layer in range(root.cfg.n_layers):
        prefix = f"blocks.{layer}"
        attn = f"{prefix}.attn"
        grouped = real_tensor(root.get_submodule(attn), "_b_K") is not None
        for letter in "QKV":
            kv = grouped and letter in "KV"
            attribute = f"_b_{letter}" if kv else f"b_{letter}"
            add(f"{attn}.b_{letter}", attn, attribute, ("kv_head" if kv else "head", "d_head"))
        add(f"{attn}.b_O", attn, "b_O", ("d_model",))
        add(f"{prefix}.mlp.b_in", f"{prefix}.mlp", "b_in", ("neuron",))
        add(f"{prefix}.mlp.b_out", f"{prefix}.mlp", "b_out", ("d_model",))
        for which in ("q_norm", "k_norm"):
            norm(f"{attn}.{which}", f"{attn}.{which}", "d_head")
        for which in ("ln1", "ln1_post", "ln2", "ln2_post"):
            norm(f"{prefix}.{which}", f"{prefix}.{which}")
    norm("ln_final", "ln_final")
    return found


__all__ = ["bridge_bias_targets", "hooked_bias_targets"]
