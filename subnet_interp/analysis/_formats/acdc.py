"""ACDC (ArthurConmy/Automatic-Circuit-Discovery) edge dicts: ``from_acdc``, ``to_acdc``."""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..circuits import (
    EMBED,
    UNEMBED,
    Circuit,
    all_edges,
    head_node,
    mlp_node,
    need_shape,
    node_of,
    node_position,
)

_ACDC_HOOK = re.compile(
    r"^(?:(hook_embed|hook_pos_embed)|blocks\.(\d+)\.(hook_resid_pre|attn\.hook_result|"
    r"hook_([qkv])_input|hook_mlp_in|hook_mlp_out|hook_resid_post|attn\.hook_([qkv])))$"
)


def _index_tuple(index: Any) -> tuple:
    if index is None:
        return (None,)
    if hasattr(index, "hashable_tuple"):
        return tuple(index.hashable_tuple)
    if isinstance(index, (tuple, list)):
        return tuple(index)
    raise ValueError(
        f"ACDC index {index!r} is neither a TorchIndex nor a tuple such as (None, None, 3)."
    )


def _acdc_head(index: tuple, hook: str) -> int:
    if len(index) != 3 or index[:2] != (None, None) or not isinstance(index[2], int):
        raise ValueError(f"ACDC head hook {hook!r} needs an index (None, None, h), got {index}.")
    return index[2]


def _acdc_end(hook: str, index: Any, parent: bool) -> tuple[str, str | None]:
    """(endpoint, internal) for an ACDC hook; ``internal`` names the hook kind of internal nodes."""
    match = _ACDC_HOOK.match(hook)
    if match is None:
        raise ValueError(
            f"Unknown ACDC hook name {hook!r}; expected blocks.0.hook_resid_pre, hook_embed, "
            "blocks.L.attn.hook_result, blocks.L.hook_q/k/v_input, blocks.L.attn.hook_q/k/v, "
            "blocks.L.hook_mlp_in / hook_mlp_out or blocks.L.hook_resid_post."
        )
    index = _index_tuple(index)
    if match.group(1):
        return EMBED, None
    layer, kind = int(match.group(2)), match.group(3)
    if kind == "hook_resid_pre":
        if layer != 0:
            raise ValueError(f"ACDC residual input must be blocks.0.hook_resid_pre, got {hook!r}.")
        return EMBED, None
    if kind == "hook_resid_post":
        return UNEMBED, None
    if kind == "attn.hook_result":
        return head_node(layer, _acdc_head(index, hook)), None
    if match.group(4):
        return head_node(layer, _acdc_head(index, hook), match.group(4)), None
    if match.group(5):
        return head_node(layer, _acdc_head(index, hook), match.group(5)), "qkv"
    return mlp_node(layer), None


def _edge_value(value: Any) -> tuple[bool, float | None]:
    if isinstance(value, bool):
        return value, None
    if hasattr(value, "present"):
        size = getattr(value, "effect_size", None)
        return bool(value.present), None if size is None else float(size)
    if isinstance(value, (int, float)):
        return True, float(value)
    if value is None:
        return True, None
    raise ValueError(
        f"ACDC edge value {value!r} is none of: bool, Edge (present/effect_size), effect size."
    )


def from_acdc(edges: Any, *, n_heads: int | None = None) -> Circuit:
    """Read ACDC edges (see the module docstring for the accepted shapes).

    What a circuit has no field for is kept in ``metadata`` so that ``to_acdc`` gives it back:
    which embedding hooks (``hook_embed`` / ``hook_pos_embed`` / ``blocks.0.hook_resid_pre``)
    each edge from ``embed`` came from, ACDC's internal edges as the input had them (present
    and absent), and whether the input was the complete graph of an attention-only model."""
    items = edges.items() if isinstance(edges, Mapping) else edges
    present_edges, scores, internal = set(), {}, {}
    embed_hooks, embed_parents, last_layer, max_head = [], {}, None, -1
    residual_keys, has_mlp = set(), False
    for item in items:
        try:
            key, value = item
            child, child_index, parent, parent_index = key
        except (TypeError, ValueError):
            raise ValueError(
                f"ACDC entry {item!r} is not ((child_hook, child_index, parent_hook, "
                "parent_index), value)."
            ) from None
        present, size = _edge_value(value)
        dst, dst_internal = _acdc_end(child, child_index, parent=False)
        src, src_internal = _acdc_end(parent, parent_index, parent=True)
        if parent in ("hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"):
            if parent not in embed_hooks:
                embed_hooks.append(parent)
        has_mlp = has_mlp or "hook_mlp" in child or "hook_mlp" in parent
        if child.endswith("hook_resid_post"):
            last_layer = int(child.split(".")[1])
        for end in (src, dst):
            position = node_position(end)
            if position is not None and position[1] is not None:
                max_head = max(max_head, position[1])
        if (
            src_internal
            or dst_internal
            or (child.endswith("hook_mlp_out") and parent.endswith("hook_mlp_in"))
        ):
            internal[_key_json(child, child_index, parent, parent_index)] = present
            continue
        if dst == EMBED or src == UNEMBED:
            raise ValueError(f"ACDC edge {key!r} runs against the forward direction.")
        edge = (src, dst)
        residual_keys.add(edge)
        if present:
            present_edges.add(edge)
            if src == EMBED:
                embed_parents.setdefault(edge, []).append(parent)
        if size is not None:
            scores[edge] = size
    n_layers = None if last_layer is None else last_layer + 1
    metadata: dict[str, Any] = {"acdc_embed_hooks": sorted(embed_hooks)}
    partial = {
        f"{s} -> {d}": sorted(hooks)
        for (s, d), hooks in embed_parents.items()
        if sorted(hooks) != sorted(embed_hooks)
    }
    if partial:
        metadata["acdc_embed_parents"] = partial
    if internal:
        metadata["acdc_internal"] = [
            [c, list(ci), p, list(pi), flag] for (c, ci, p, pi), flag in internal.items()
        ]
    if n_layers is not None and max_head >= 0:  # the complete graph tells the model's shape
        guess = max_head + 1 if n_heads is None else n_heads
        if residual_keys == set(all_edges(n_layers, guess, attn_only=not has_mlp)):
            n_heads = guess
            if not has_mlp:
                metadata["acdc_attn_only"] = True
    return Circuit(
        frozenset(),
        frozenset(present_edges),
        scores,
        n_layers=n_layers,
        n_heads=n_heads,
        metadata=metadata,
    )


def _key_json(child: str, child_index: Any, parent: str, parent_index: Any) -> tuple:
    """An ACDC key with its indices as lists (JSON-safe, for ``metadata``), hashable."""
    return (child, _freeze(child_index), parent, _freeze(parent_index))


def _freeze(index: Any) -> tuple:
    return tuple(_index_tuple(index))


def _acdc_hook(end: str, parent: bool, n_layers: int | None, embed_hook: str) -> tuple[str, tuple]:
    if end == EMBED:
        return embed_hook, (None,)
    if end == UNEMBED:
        if n_layers is None:
            raise ValueError("Writing edges into the unembedding in ACDC form needs n_layers.")
        return f"blocks.{n_layers - 1}.hook_resid_post", (None,)
    node = node_of(end)
    layer, head_index = node_position(node)
    if head_index is not None:
        head = (None, None, head_index)
        if parent:
            return f"blocks.{layer}.attn.hook_result", head
        if node == end:
            raise ValueError(
                f"ACDC edges into a head name its q, k or v input; {end!r} has none "
                "(use e.g. head_node(L, H, 'q'))."
            )
        return f"blocks.{layer}.hook_{end[-1]}_input", head
    return f"blocks.{layer}.hook_mlp_{'out' if parent else 'in'}", (None,)


def _internal_keys(layer: int, heads: range, mlp: bool) -> list[tuple[tuple, str]]:
    """ACDC's internal edges of a layer as (key, node): per head q/k/v_input -> hook_q/k/v and
    hook_q/k/v -> hook_result; ``hook_mlp_in -> hook_mlp_out`` for its MLP."""
    out = []
    for h in heads:
        index = (None, None, h)
        for x in "qkv":
            q = f"blocks.{layer}.attn.hook_{x}"
            out.append(((q, index, f"blocks.{layer}.hook_{x}_input", index), head_node(layer, h)))
            out.append(((f"blocks.{layer}.attn.hook_result", index, q, index), head_node(layer, h)))
    if mlp:
        key = (f"blocks.{layer}.hook_mlp_out", (None,), f"blocks.{layer}.hook_mlp_in", (None,))
        out.append((key, mlp_node(layer)))
    return out


_RESID_PRE = "blocks.0.hook_resid_pre"
_CHILD_SLOT = {"q_input": 0, "k_input": 1, "v_input": 2, "mlp_out": 3, "mlp_in": 4}
_CHILD_SLOT |= {"attn.hook_result": 5, "attn.hook_q": 6, "attn.hook_k": 7, "attn.hook_v": 8}
_PARENT_SLOT = {"mlp_out": 0, "attn.hook_result": 1, "mlp_in": 2, "attn.hook_q": 3}
_PARENT_SLOT |= {"attn.hook_k": 4, "attn.hook_v": 5, "q_input": 6, "k_input": 7, "v_input": 8}
_EMBED_SLOT = {_RESID_PRE: 0, "hook_embed": 0, "hook_pos_embed": 1}


def _acdc_rank(key: tuple) -> tuple:
    """Where ``TLACDCCorrespondence.all_edges()`` puts a key: ``setup_from_model`` walks the
    layers from the last down (in each, the MLP, then the heads from the last, each wiring q, k,
    v), the embeddings last, and the nested dicts keep the order in which each child, child
    index, parent and parent index first appeared."""
    child, child_index, parent, parent_index = key

    def layer_and_kind(hook: str) -> tuple[int, str]:
        _, layer, kind = hook.split(".", 2)
        return int(layer), kind.removeprefix("hook_")

    if child.endswith("hook_resid_post"):
        child_rank: tuple = (-math.inf, 0)
    else:
        layer, kind = layer_and_kind(child)
        # a head's inputs first get an edge from the sources of the layer below
        child_rank = (-(layer - 1) if kind.endswith("_input") else -layer, _CHILD_SLOT[kind])
    if parent in _EMBED_SLOT:
        parent_rank: tuple = (math.inf, _EMBED_SLOT[parent])
    else:
        layer, kind = layer_and_kind(parent)
        parent_rank = (-layer, _PARENT_SLOT[kind])
    last = lambda index: -(index[-1] or 0)  # noqa: E731  heads from the last
    return child_rank, last(child_index), parent_rank, last(parent_index)


def to_acdc(
    circuit: Circuit,
    *,
    complete: bool = False,
    internal: bool | None = None,
    attn_only: bool | None = None,
    use_pos_embed: bool | None = None,
) -> dict[tuple, bool]:
    """ACDC's subgraph dict, keys ``(child_hook, child_index, parent_hook, parent_index)`` with
    indices as ``hashable_tuple``\\ s, in the order ACDC's ``all_edges()`` gives them (that of
    its ``save_subgraph`` and ``get_*_true_edges`` ``OrderedDict``\\ s, which compare in order).

    ``complete=True`` lists every edge of the graph, present or not (what
    ``TLACDCExperiment.load_subgraph`` expects), including ACDC's internal edges;
    ``attn_only=True`` leaves out MLPs (``load_subgraph`` of an attention-only model rejects MLP
    keys; default: what the import was). Otherwise only the present edges, the form of ACDC's
    ``get_*_true_edges``: the residual edges, plus with ``internal=True`` the internal edges of
    each head and MLP of the circuit (``hook_q/k/v_input -> hook_q/k/v``,
    ``hook_q/k/v -> attn.hook_result``, ``hook_mlp_in -> hook_mlp_out``), as
    ``get_ioi_true_edges`` writes them (its 1,131 keys for the IOI circuit). The tasks'
    ``get_*_true_edges`` differ here (greater-than has no ``mlp_in -> mlp_out``, docstring only
    the ``*_input -> hook_q/k/v`` edges), so internal edges read from a file are written back as
    they were: ``internal=None`` (default) writes them when the import had any.

    An edge from ``embed`` is written from each embedding hook the import had
    (``hook_embed`` / ``hook_pos_embed``), unless the import had it from only some of them; a
    circuit not read from ACDC uses ``blocks.0.hook_resid_pre``, or with ``use_pos_embed=True``
    both ``hook_embed`` and ``hook_pos_embed`` (ACDC's ``use_pos_embed``)."""
    embed_hooks = circuit.metadata.get("acdc_embed_hooks") or [_RESID_PRE]
    parents = circuit.metadata.get("acdc_embed_parents", {})
    if use_pos_embed is not None and use_pos_embed != ("hook_pos_embed" in embed_hooks):
        embed_hooks = ["hook_embed", "hook_pos_embed"] if use_pos_embed else [_RESID_PRE]
        parents = {}  # which hook fed an edge means nothing for the other embedding
    recorded = {
        (c, tuple(ci), p, tuple(pi)): bool(flag)
        for c, ci, p, pi, flag in circuit.metadata.get("acdc_internal", [])
    }
    for c, ci, p, pi in circuit.metadata.get("acdc_absent_internal", []):  # older files
        recorded[(c, tuple(ci), p, tuple(pi))] = False
    out: dict[tuple, bool] = OrderedDict()

    def add(edge: tuple[str, str], present: bool) -> None:
        src, dst = edge
        child, child_index = _acdc_hook(dst, False, circuit.n_layers, embed_hooks[0])
        hooks = embed_hooks if src == EMBED else [embed_hooks[0]]
        chosen = parents.get(f"{src} -> {dst}", hooks)
        for hook in hooks:
            parent, parent_index = _acdc_hook(src, True, circuit.n_layers, hook)
            flag = present and hook in chosen
            if flag or complete:
                out[(child, child_index, parent, parent_index)] = flag

    if not complete:
        for edge in sorted(circuit.edges):
            add(edge, True)
        if internal is None:
            for key, flag in recorded.items():
                if flag:
                    out[key] = True
        elif internal:
            positions = [p for n in circuit.nodes if (p := node_position(n))]
            for layer, head in sorted(positions, key=lambda p: (p[0], p[1] is None, p[1] or 0)):
                heads = range(head, head + 1) if head is not None else range(0)
                for key, _node in _internal_keys(layer, heads, head is None):
                    if recorded.get(key, True):
                        out[key] = True
        return _in_acdc_order(out)
    n_layers, n_heads = need_shape(circuit, "A complete ACDC graph")
    if attn_only is None:
        attn_only = bool(circuit.metadata.get("acdc_attn_only", False))
    if attn_only and circuit.mlps():
        raise ValueError(f"attn_only=True, but the circuit has MLPs {circuit.mlps()}.")
    for edge in all_edges(n_layers, n_heads, attn_only=attn_only):
        add(edge, edge in circuit.edges)
    for layer in range(n_layers):
        for key, node in _internal_keys(layer, range(n_heads), not attn_only):
            out[key] = recorded.get(key, node in circuit.nodes)
    return _in_acdc_order(out)


def _in_acdc_order(edges: dict[tuple, bool]) -> dict[tuple, bool]:
    return OrderedDict(sorted(edges.items(), key=lambda item: _acdc_rank(item[0])))


__all__ = ["from_acdc", "to_acdc"]
