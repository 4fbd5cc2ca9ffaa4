"""Targets of torch's own composite layers and the opt-in bias / norm-weight targets of plain
modules, for the plain ``nn.Module`` adapter (:mod:`.plain`).

- ``nn.MultiheadAttention`` at path ``P``: ``P.W_Q|W_K|W_V`` ``[head, d_model, d_head]`` (views
  of the fused ``in_proj_weight``, rows ``[q; k; v]``, each head-major as
  ``F.multi_head_attention_forward`` splits them, or of ``q|k|v_proj_weight`` when the key /
  value dimensions differ) and ``P.W_O`` ``[head, d_head, d_model]`` (a view of
  ``out_proj.weight``); biases ``P.b_Q|b_K|b_V`` ``[head, d_head]`` and ``P.b_O``.
- ``nn.LSTM`` / ``nn.GRU`` at path ``P``: one target per gate of each ``weight_ih_l{k}`` /
  ``weight_hh_l{k}`` (and ``_reverse``), named ``P.weight_ih_l{k}.{gate}``, in torch's row order
  (LSTM ``i, f, g, o``; GRU ``r, z, n``); ``nn.RNN`` weights and an LSTM's ``weight_hr_l{k}``
  keep their parameter names. Biases ``P.bias_ih_l{k}.{gate}``.
- Opt-in (``default=False``, kinds ``"bias"`` / ``"norm"``): the ``bias`` of Linear / Conv
  layers, and the ``weight`` / ``bias`` of LayerNorm, RMSNorm, GroupNorm and BatchNorm layers,
  by parameter name. NeuroSurgeon (Lepori et al. 2023) masks biases the same way.

Every target is a view into the real tensor (``narrow`` / ``unflatten`` / ``permute``), so masks
are written back exactly.
"""

from __future__ import annotations

from torch import nn

from .._types import Layout, Target, model_class
from . import real_tensor

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
GATES = {"LSTM": "ifgo", "GRU": "rzn", "RNN": ""}  # torch's row order of the stacked gates


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def mha_targets(path: str, module: nn.MultiheadAttention) -> dict[str, Target]:
    """``W_Q|W_K|W_V|W_O`` (and the non-default ``b_Q|b_K|b_V|b_O``) of a torch
    ``nn.MultiheadAttention`` at ``path``."""
    heads, d_model = module.num_heads, module.embed_dim
    d_head = module.head_dim
    split = (("unflatten", 0, (heads, d_head)), ("permute", (0, 2, 1)))  # [h*e, d] -> [h, d, e]
    found: dict[str, Target] = {}
    for index, (letter, width) in enumerate(
        (("Q", d_model), ("K", module.kdim), ("V", module.vdim))
    ):
        name = _join(path, f"W_{letter}")
        axis = "d_model" if width == d_model else f"d_{letter.lower()}_in"
        if module._qkv_same_embed_dim:
            attribute, ops = "in_proj_weight", (("narrow", 0, index * d_model, d_model), *split)
        else:
            attribute, ops = f"{letter.lower()}_proj_weight", split
        found[name] = Target(
            name,
            path,
            attribute,
            (heads, width, d_head),
            ("head", axis, "d_head"),
            Layout(ops),
            kind="attn",
            unit_axes=("head", "d_head"),
        )
    name = _join(path, "W_O")
    found[name] = Target(
        name,
        _join(path, "out_proj"),
        "weight",
        (heads, d_head, d_model),
        ("head", "d_head", "d_model"),
        Layout((("unflatten", 1, (heads, d_head)), ("permute", (1, 2, 0)))),
        kind="attn",
        unit_axes=("d_model",),
    )
    if module.in_proj_bias is not None:
        for index, letter in enumerate("QKV"):
            name = _join(path, f"b_{letter}")
            ops = (("narrow", 0, index * d_model, d_model), ("unflatten", 0, (heads, d_head)))
            found[name] = _bias(
                name, path, "in_proj_bias", (heads, d_head), ("head", "d_head"), ops
            )
    if module.out_proj.bias is not None:
        name = _join(path, "b_O")
        found[name] = _bias(name, _join(path, "out_proj"), "bias", (d_model,), ("d_model",))
    return found


def rnn_targets(path: str, module: nn.RNNBase) -> dict[str, Target]:
    """One target per gate of each input-hidden / hidden-hidden weight of an ``nn.LSTM``,
    ``nn.GRU`` or ``nn.RNN`` at ``path`` (and the non-default per-gate biases)."""
    gates = GATES.get(model_class(module).__name__, "")
    hidden = module.hidden_size
    found: dict[str, Target] = {}
    for parameter in module._flat_weights_names:
        real = real_tensor(module, parameter)
        if real is None:
            continue
        kind = parameter.split("_")[0]  # weight / bias
        source = parameter.split("_")[1]  # ih / hh / hr
        if kind == "weight":
            axes = {"ih": ("hidden", "input"), "hh": ("hidden", "recurrent")}.get(
                source, ("proj", "hidden")
            )
        else:
            axes = ("hidden",)
        if source == "hr" or not gates:
            name = _join(path, parameter)
            shape = tuple(real.shape)
            if kind == "weight":
                found[name] = Target(name, path, parameter, shape, axes, kind="rnn")
            else:
                found[name] = _bias(name, path, parameter, shape, axes)
            continue
        for index, gate in enumerate(gates):
            name = _join(path, f"{parameter}.{gate}")
            shape = (hidden, *real.shape[1:])
            ops = (("narrow", 0, index * hidden, hidden),)
            if kind == "weight":
                found[name] = Target(name, path, parameter, shape, axes, Layout(ops), kind="rnn")
            else:
                found[name] = _bias(name, path, parameter, shape, axes, ops)
    return found


def bias_norm_targets(path: str, module: nn.Module) -> dict[str, Target]:
    """The non-default ``bias`` of a Linear / Conv layer and ``weight`` / ``bias`` of a norm
    layer at ``path``, by parameter name."""
    found: dict[str, Target] = {}
    is_norm = isinstance(module, _NORMS)
    if not (is_norm or isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
        return found
    for attribute in ("weight", "bias") if is_norm else ("bias",):
        real = real_tensor(module, attribute)
        if not isinstance(real, nn.Parameter):
            continue
        name = _join(path, attribute)
        if is_norm:
            dims = real.dim()
            axes = ("features",) if dims == 1 else tuple(f"features_{i}" for i in range(dims))
        else:
            axes = ("out",) if isinstance(module, nn.Linear) else ("out_channels",)
        kind = "norm" if is_norm else "bias"
        found[name] = Target(
            name, path, attribute, tuple(real.shape), axes, default=False, kind=kind, unit_axes=axes
        )
    return found


def _bias(name, module, attribute, shape, axes, ops=()) -> Target:
    # every entry is one unit's bias: one gate each at granularity="neuron"
    return Target(name, module, attribute, shape, axes, Layout(ops), False, "bias", unit_axes=axes)


def refresh_rnns(root: nn.Module) -> None:
    """Point every torch RNN under ``root`` back at its parameters: an RNN keeps the tensors its
    last forward read (``_flat_weights``), which after masks are removed are masked copies
    until its next forward. RNNs whose weights did not change are left alone."""
    for module in root.modules():
        if isinstance(module, nn.RNNBase):
            module._update_flat_weights()


def functional_site_error(root: nn.Module, location: tuple[str, str]) -> TypeError | None:
    """Why the input-based ablations cannot use the weight at ``location``: an
    ``nn.MultiheadAttention`` computes with ``in_proj_weight`` and ``out_proj.weight``
    functionally (``F.multi_head_attention_forward`` or the fused inference kernel), never
    calling ``out_proj``'s forward, so no hook sees their inputs. ``None`` for other weights."""
    path, attribute = location
    owner = root.get_submodule(path)
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if child == "out_proj" else None
    if isinstance(owner, nn.MultiheadAttention):
        name = _join(path, attribute)
    elif child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
        name = path
    else:
        return None
    return TypeError(
        f"{name} belongs to a torch nn.MultiheadAttention, which computes its projections "
        "functionally (F.multi_head_attention_forward, or the fused kernel in inference) and never "
        "calls out_proj's forward, so mean, resample and patch ablation cannot see their inputs. "
        "Use zero ablation or ReinitAblation for its W_Q / W_K / W_V / W_O targets, or exclude "
        "them (`exclude=`)."
    )


__all__ = [
    "GATES",
    "bias_norm_targets",
    "functional_site_error",
    "mha_targets",
    "refresh_rnns",
    "rnn_targets",
]
