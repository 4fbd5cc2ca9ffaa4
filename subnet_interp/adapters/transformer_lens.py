"""TransformerLens: the 4.x ``TransformerBridge`` and the legacy (< 4) ``HookedTransformer``.

**TransformerBridge** wraps a Hugging Face model and computes attention with split ``q/k/v/o``
components (on GPT-2 the fused ``c_attn`` is not used in its forward), and the MLP with
``in/out`` (and ``gate``) components. Of T5, mT5, BART and mBART, whose bridge keeps
``encoder_blocks`` and ``decoder_blocks``, and of BERT, RoBERTa and ViT (whose bridges compute
with the transformers layers, ViT's also with its ``ViTEmbeddings`` holding ``cls_token`` and
``position_embeddings``), the targets are the Hugging Face adapter's (names, order, layouts,
defaults: ``encoder.blocks.{L}.attn.W_Q``, ``token_type_embed.W_token_type``, ``mlm_head.W``,
``embed.W_patch``, ...; see ``hf_seq2seq``, ``hf_encoders``) on the same ``nn.Linear`` layers,
which the bridge's components wrap, so the fingerprint is the transformers model's. Masks go on those components' wrapped ``nn.Linear`` /
``Conv1D`` weights, so ``bridge(...)``, ``run_with_cache``, ``run_with_hooks`` and the user's own
hooks all see them; the opt-in bias and norm-weight targets are in :mod:`.transformer_lens_biases`.
``enable_compatibility_mode()`` replaces parameters when it processes
weights (``fold_ln`` etc.), so it must run before masks are attached: while a mask is attached
it is blocked with an explanation.

**HookedTransformer** (transformer-lens < 4) already stores ``W_Q`` etc. in the canonical layout,
so every target is an identity view of a parameter of ``blocks.{L}.attn`` / ``.mlp``, for every
architecture it builds (GPT-2; GPT-NeoX's rotary, parallel attention and MLP; Llama's RMS norms,
gated MLP and grouped-query attention, whose ``W_K`` / ``W_V`` are the ``_W_K`` / ``_W_V``
parameters ``[kv_head, d_model, d_head]``: the properties of those names repeat them per query
head). A ``load_in_4bit`` model, whose weights are packed, is refused.

Detection reads class names and modules only; nothing here imports transformer_lens.
"""

from __future__ import annotations

from torch import nn

from .._types import Layout, LinearSite, Target
from . import Adapter, is_conv1d, model_class, real_tensor
from ._hf_common import TRANSPOSE, embedding_table, init_weights, outermost_pretrained
from .hf_encoders import bert_targets, vit_targets
from .hf_moe import bridge_moe_targets
from .hf_seq2seq import bridge_seq2seq_targets
from .transformer_lens_biases import bridge_bias_targets, hooked_bias_targets

# the hook points on the residual stream after a block: HookedTransformer's, the bridge's
_RESID_POST_HOOKS = ("hook_resid_post", "hook_out")


# model_type -> the Hugging Face adapter's builder, run on the model a bridge wraps
_HF_BUILT = {"bert": bert_targets, "roberta": bert_targets, "vit": vit_targets}


def _blocks(root: nn.Module) -> list[nn.Module]:
    """``root.blocks`` of a HookedTransformer or a TransformerBridge."""
    blocks = getattr(root, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"This {model_class(root).__qualname__} has no nn.ModuleList `blocks` (found "
            f"{type(blocks).__name__}), where TransformerLens models keep their blocks. Pass "
            "the path of the module you mean where a function accepts one."
        )
    return list(blocks)


def _resid_post(block: nn.Module) -> nn.Module:
    """The hook point on the residual stream after ``block`` (the block if it has none)."""
    for name in _RESID_POST_HOOKS:
        hook = block._modules.get(name)
        if isinstance(hook, nn.Module):
            return hook
    return block


def _bridge_attn_layout(module: nn.Module, which: str, heads: int, d_head: int) -> Layout:
    """View ops from a bridge component's weight to the canonical attention layout."""
    if which == "o":  # canonical [head, d_head, d_model]
        if is_conv1d(module):  # [heads * d_head, d_model]
            return Layout((("unflatten", 0, (heads, d_head)),))
        return Layout((("unflatten", 1, (heads, d_head)), ("permute", (1, 2, 0))))
    # q / k / v, canonical [head, d_model, d_head]
    if is_conv1d(module):  # [d_model, heads * d_head]
        return Layout((("unflatten", 1, (heads, d_head)), ("permute", (1, 0, 2))))
    return Layout((("unflatten", 0, (heads, d_head)), ("permute", (0, 2, 1))))


def _component(root: nn.Module, path: str) -> nn.Module | None:
    try:
        bridge = root.get_submodule(path)
    except AttributeError:
        return None
    return getattr(bridge, "_original_component", None)


class TransformerBridgeAdapter(Adapter):
    """transformer-lens 4.x ``TransformerBridge``."""

    family = "transformer_lens.TransformerBridge"

    def matches(self, model: object) -> bool:
        cls = model_class(model)
        return cls.__module__.startswith("transformer_lens.model_bridge") and any(
            c.__name__ == "TransformerBridge" for c in cls.__mro__
        )

    def all_targets(self, model: object) -> dict[str, Target]:
        root = self.root(model)
        # T5, BART, BERT, RoBERTa, ViT: the Hugging Face adapter's targets on the layers the
        # bridge computes with (its blocks of these keep the transformers modules' own names)
        wrapped = bridge_seq2seq_targets(root) or bridge_seq2seq_targets(root, _HF_BUILT)
        if wrapped:
            return {**wrapped, **bridge_bias_targets(root)}
        cfg = root.cfg
        heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model
        kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
        found: dict[str, Target] = {}
        embed = _component(root, "embed")
        if embed is not None:
            found["embed.W_E"] = embedding_table(
                "embed.W_E",
                "embed._original_component",
                tuple(embed.weight.shape),
                ("d_vocab", "d_model"),
            )
        pos = _component(root, "pos_embed")
        if pos is not None and hasattr(pos, "weight"):
            rows, width = pos.weight.shape
            offset = getattr(pos, "offset", 0)  # OPT reads row position + 2, as the HF adapter
            found["pos_embed.W_pos"] = embedding_table(
                "pos_embed.W_pos",
                "pos_embed._original_component",
                (rows - offset, width),
                ("n_ctx", "d_model"),
                Layout((("narrow", 0, offset, rows - offset),)) if offset else Layout(),
            )
        for layer in range(cfg.n_layers):
            for letter, which in (("Q", "q"), ("K", "k"), ("V", "v"), ("O", "o")):
                path = f"blocks.{layer}.attn.{which}"
                module = _component(root, path)
                if module is None:
                    continue
                count = kv_heads if which in "kv" else heads
                head_axis = "kv_head" if (which in "kv" and kv_heads != heads) else "head"
                if which == "o":
                    shape, axes, units = (
                        (count, d_head, d_model),
                        (head_axis, "d_head", "d_model"),
                        ("d_model",),
                    )
                else:
                    shape, axes, units = (
                        (count, d_model, d_head),
                        (head_axis, "d_model", "d_head"),
                        (head_axis, "d_head"),
                    )
                name = f"blocks.{layer}.attn.W_{letter}"
                found[name] = Target(
                    name,
                    f"{path}._original_component",
                    "weight",
                    shape,
                    axes,
                    _bridge_attn_layout(module, which, count, d_head),
                    kind="attn",
                    unit_axes=units,
                )
            mlp = _component(root, f"blocks.{layer}.mlp")
            if hasattr(mlp, "experts") or type(mlp).__name__.endswith("MoeMLP"):  # MoE models
                found.update(bridge_moe_targets(root, layer, f"blocks.{layer}.mlp"))
                continue  # (its `gate` is the router, not a gated MLP's W_gate)
            for canonical, which in (("W_gate", "gate"), ("W_in", "in"), ("W_out", "out")):
                path = f"blocks.{layer}.mlp.{which}"
                module = _component(root, path)
                if module is None or not hasattr(module, "weight"):
                    continue
                conv = is_conv1d(module)
                rows, cols = module.weight.shape
                if canonical == "W_out":
                    shape = (rows, cols) if conv else (cols, rows)
                    axes = ("neuron", "d_model")
                else:
                    shape = (rows, cols) if conv else (cols, rows)
                    axes = ("d_model", "neuron")
                name = f"blocks.{layer}.mlp.{canonical}"
                found[name] = Target(
                    name,
                    f"{path}._original_component",
                    "weight",
                    shape,
                    axes,
                    Layout(() if conv else (TRANSPOSE,)),
                    kind="mlp",
                    unit_axes=("neuron",),
                )
        unembed = _component(root, "unembed")
        if unembed is not None and hasattr(unembed, "weight"):
            vocab, width = unembed.weight.shape
            found["unembed.W_U"] = Target(
                "unembed.W_U",
                "unembed._original_component",
                "weight",
                (width, vocab),
                ("d_model", "d_vocab"),
                Layout((TRANSPOSE,)),
                default=False,
                kind="unembedding",
                unit_axes=("d_vocab",),
            )
        return {**found, **bridge_bias_targets(root)}

    def inner(self, model: object) -> nn.Module:
        """The model the bridge wraps (``original_model``: a transformers model, or
        TransformerLens's native model of a ``boot_native`` bridge); the bridge if it has none."""
        root = self.root(model)
        # read from __dict__: it is no registered sub-module
        wrapped = root.__dict__.get("original_model")
        return wrapped if isinstance(wrapped, nn.Module) else root

    def blocks(self, model: object) -> list[nn.Module]:
        """The bridge's ``blocks`` (their components wrap the transformers model's layers); of
        an encoder-decoder (T5, BART), its ``encoder_blocks`` then ``decoder_blocks``."""
        root = self.root(model)
        stacks = [root._modules.get(f"{s}_blocks") for s in ("encoder", "decoder")]
        if "blocks" not in root._modules and isinstance(stacks[0], nn.ModuleList):
            return [b for s in stacks if isinstance(s, nn.ModuleList) for b in s]
        return _blocks(root)

    def block_output(self, model: object, block: nn.Module) -> nn.Module:
        """The block's ``hook_out`` (``hook_resid_post`` in the cache)."""
        return _resid_post(block)

    def reinitialize(self, root: nn.Module) -> None:
        """The wrapped transformers model's own initialisation (as the Hugging Face adapter's);
        for a bridge without one (TransformerLens-native), the bridge's ``init_weights()``."""
        top = outermost_pretrained([self.inner(root), *root.modules()])
        if top is None:
            super().reinitialize(root)
        else:
            init_weights(top)

    def on_attach(self, model: object) -> None:
        root = self.root(model)

        def blocked(*args, **kwargs):
            raise RuntimeError(
                "enable_compatibility_mode() was called while subnet_interp masks are attached "
                "to this TransformerBridge. It processes the weights (fold_ln, centering) and "
                "replaces the parameters the masks are attached to. Leave the `si.masked(...)` "
                "block (or let `si.find` finish), call enable_compatibility_mode() first, then "
                "attach masks (a subnetwork found before processing has a different model "
                "fingerprint: find it again on the processed model, or pass "
                "enable_compatibility_mode(no_processing=True))."
            )

        depth = root.__dict__.get("_subnet_interp_attached", 0)
        if depth == 0:
            object.__setattr__(root, "enable_compatibility_mode", blocked)
        object.__setattr__(root, "_subnet_interp_attached", depth + 1)

    def on_detach(self, model: object) -> None:
        root = self.root(model)
        depth = root.__dict__.get("_subnet_interp_attached", 0) - 1
        if depth <= 0:
            root.__dict__.pop("enable_compatibility_mode", None)
            root.__dict__.pop("_subnet_interp_attached", None)
        else:
            object.__setattr__(root, "_subnet_interp_attached", depth)


_ATTN_WEIGHTS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V", "W_O")


def _no_site(name: str, why: str) -> str:
    return (
        f"Mean, resample and patch ablation cannot run on {name}: {why}, so its masked-out term "
        "has no place in the forward pass. Zero ablation and ReinitAblation work on it; or "
        "exclude it from the targets."
    )


class HookedTransformerAdapter(Adapter):
    """Legacy ``HookedTransformer`` (transformer-lens < 4): weights are canonical already."""

    family = "transformer_lens.HookedTransformer"

    def matches(self, model: object) -> bool:
        cls = model_class(model)
        return cls.__module__.startswith("transformer_lens") and any(
            c.__name__ == "HookedTransformer" for c in cls.__mro__
        )

    def all_targets(self, model: object) -> dict[str, Target]:
        root = self.root(model)
        if getattr(root.cfg, "load_in_4bit", False):
            raise TypeError(
                f"This {model_class(root).__qualname__} was loaded with load_in_4bit=True: its "
                "attention and MLP weights are bitsandbytes Params4bit tensors (packed uint8 of "
                "shape [n / 2, 1]), which have no [head, d_model, d_head] layout to mask. Load "
                "the model without load_in_4bit (e.g. dtype=torch.bfloat16) to mask it."
            )
        found: dict[str, Target] = {}

        def add(name, module, attribute, axes, kind, units, default=True):
            tensor = real_tensor(root.get_submodule(module), attribute)
            if not isinstance(tensor, nn.Parameter):
                return
            found[name] = Target(
                name,
                module,
                attribute,
                tuple(tensor.shape),
                axes,
                default=default,
                kind=kind,
                unit_axes=units,
            )

        add("embed.W_E", "embed", "W_E", ("d_vocab", "d_model"), "embedding", ("d_vocab",), False)
        if hasattr(root, "pos_embed"):
            add(
                "pos_embed.W_pos",
                "pos_embed",
                "W_pos",
                ("n_ctx", "d_model"),
                "embedding",
                ("n_ctx",),
                False,
            )
        for layer in range(root.cfg.n_layers):
            attn = f"blocks.{layer}.attn"
            owner = root.get_submodule(attn)
            grouped = real_tensor(owner, "_W_K") is not None
            for letter in "QKVO":
                attribute = f"_W_{letter}" if grouped and letter in "KV" else f"W_{letter}"
                head_axis = "kv_head" if grouped and letter in "KV" else "head"
                if letter == "O":
                    axes, units = ("head", "d_head", "d_model"), ("d_model",)
                else:
                    axes, units = (head_axis, "d_model", "d_head"), (head_axis, "d_head")
                add(f"{attn}.W_{letter}", attn, attribute, axes, "attn", units)
            mlp = f"blocks.{layer}.mlp"
            if any(hasattr(root.get_submodule(f"blocks.{layer}"), a) for a in ("mlp",)):
                add(f"{mlp}.W_gate", mlp, "W_gate", ("d_model", "neuron"), "mlp", ("neuron",))
                add(f"{mlp}.W_in", mlp, "W_in", ("d_model", "neuron"), "mlp", ("neuron",))
                add(f"{mlp}.W_out", mlp, "W_out", ("neuron", "d_model"), "mlp", ("neuron",))
        add(
            "unembed.W_U",
            "unembed",
            "W_U",
            ("d_model", "d_vocab"),
            "unembedding",
            ("d_vocab",),
            False,
        )
        return {**found, **hooked_bias_targets(root)}

    def blocks(self, model: object) -> list[nn.Module]:
        return _blocks(self.root(model))

    def linear_site(self, root: nn.Module, location: tuple[str, str]) -> LinearSite | None:
        """Where a HookedTransformer computes each weight's map (its components' forwards):
        ``W_Q`` / ``W_K`` / ``W_V`` read the attention's ``query_input`` / ``key_input`` /
        ``value_input`` (``[b, p, h, d]`` with ``use_split_qkv_input`` or ``use_attn_in``) and
        make ``hook_q`` / ``hook_k`` / ``hook_v``; ``W_O`` reads ``hook_z`` and makes the
        attention's output (``hook_result``, per head, with ``use_attn_result``);
        ``mlp.W_in`` / ``mlp.W_gate`` read the MLP's input and make ``hook_pre`` (a gated MLP's
        ``W_in``: ``hook_pre_linear``); ``mlp.W_out`` reads ``hook_post`` and makes the MLP's
        output; ``unembed.W_U`` reads the unembedding's input and makes ``hook_out``.
        Embeddings have none."""
        path, attribute = location
        owner = root.get_submodule(path)
        cfg = root.cfg
        kind = model_class(owner).__name__
        name = f"{path}.{attribute}"
        is_attn = path.endswith(".attn") and attribute in _ATTN_WEIGHTS
        is_mlp = path.endswith(".mlp") and attribute in ("W_in", "W_gate", "W_out")
        if not (is_attn or is_mlp or (path == "unembed" and attribute == "W_U")):
            return None
        if path == "unembed":
            out = "unembed.hook_out" if hasattr(owner, "hook_out") else "unembed"
            return LinearSite(path, "input", out, "...d,dv->...v")
        if is_attn:
            letter = attribute[-1].lower()
            if attribute == "W_O":
                if getattr(cfg, "use_attn_result", False):
                    result = f"{path}.hook_result"  # per head, summed after the hook
                    return LinearSite(f"{path}.hook_z", "output", result, "...he,hed->...hd")
                return LinearSite(f"{path}.hook_z", "output", path, "...he,hed->...d")
            if attribute.startswith("_") and getattr(cfg, "ungroup_grouped_query_attention", 0):
                raise TypeError(
                    _no_site(
                        name,
                        "ungroup_grouped_query_attention repeats the key/value heads before "
                        f"hook_{letter}; build the model with it off",
                    )
                )
            if not hasattr(owner, f"hook_{letter}"):
                raise TypeError(_no_site(name, f"its {kind} has no hook_{letter}"))
            split = getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", 0)
            equation = "...hd,hde->...he" if split else "...d,hde->...he"
            inputs = {"q": "query_input", "k": "key_input", "v": "value_input"}[letter]
            return LinearSite(path, inputs, f"{path}.hook_{letter}", equation)
        if kind not in ("MLP", "GatedMLP"):
            raise TypeError(_no_site(name, f"its MLP is a {kind}, not an MLP or GatedMLP"))
        if attribute == "W_out":
            return LinearSite(f"{path}.hook_post", "output", path, "...n,nd->...d")
        if attribute == "W_in" and kind == "GatedMLP":
            if cfg.is_layer_norm_activation():
                raise TypeError(
                    _no_site(name, f"a GatedMLP with act_fn={cfg.act_fn!r} does not use W_in")
                )
            return LinearSite(path, "input", f"{path}.hook_pre_linear", "...d,dn->...n")
        return LinearSite(path, "input", f"{path}.hook_pre", "...d,dn->...n")

    def block_output(self, model: object, block: nn.Module) -> nn.Module:
        """The block's ``hook_resid_post``."""
        return _resid_post(block)

    def reinitialize(self, root: nn.Module) -> None:
        """``HookedTransformer.init_weights()`` (the scheme its config names)."""
        super().reinitialize(root)


__all__ = ["HookedTransformerAdapter", "TransformerBridgeAdapter"]
