"""ACDC (ArthurConmy/Automatic-Circuit-Discovery) edge dicts: ``from_acdc``, ``to_acdc``."""

from __future__ import annotations

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
    """Read ACDC edges (see the module docstring for the accepted shapes)."""
    items = edges.items() if isinstance(edges, Mapping) else edges
    present_edges, scores, absent_internal = set(), {}, []
    embed_hooks, last_layer, max_head = set(), None, -1
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
            embed_hooks.add(parent)
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
            if not present:
                absent_internal.append(
                    [
                        child,
                        list(_index_tuple(child_index)),
                        parent,
                        list(_index_tuple(parent_index)),
                    ]
                )
            continue
        if dst == EMBED or src == UNEMBED:
            raise ValueError(f"ACDC edge {key!r} runs against the forward direction.")
        edge = (src, dst)
        if present:
            present_edges.add(edge)
        if size is not None:
            scores[edge] = size
    metadata: dict[str, Any] = {"acdc_embed_hooks": sorted(embed_hooks)}
    if absent_internal:
        metadata["acdc_absent_internal"] = absent_internal
    return Circuit(
        frozenset(),
        frozenset(present_edges),
        scores,
        n_layers=None if last_layer is None else last_layer + 1,
        n_heads=n_heads,
        metadata=metadata,
    )


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


def to_acdc(circuit: Circuit, *, complete: bool = False) -> dict[tuple, bool]:
    """ACDC's subgraph dict, keys ``(child_hook, child_index, parent_hook, parent_index)`` with
    indices as ``hashable_tuple``\\ s. ``complete=True`` lists every edge of the graph (what
    ``TLACDCExperiment.load_subgraph`` expects), including ACDC's internal edges; otherwise only
    the present edges (the form of ACDC's ``get_*_true_edges``)."""
    embed_hooks = circuit.metadata.get("acdc_embed_hooks") or ["blocks.0.hook_resid_pre"]
    out: dict[tuple, bool] = OrderedDict()

    def add(edge: tuple[str, str], present: bool) -> None:
        src, dst = edge
        child, child_index = _acdc_hook(dst, False, circuit.n_layers, embed_hooks[0])
        for hook in embed_hooks if src == EMBED else [None]:
            parent, parent_index = _acdc_hook(src, True, circuit.n_layers, hook or embed_hooks[0])
            out[(child, child_index, parent, parent_index)] = present

    if not complete:
        for edge in sorted(circuit.edges):
            add(edge, True)
        return out
    n_layers, n_heads = need_shape(circuit, "A complete ACDC graph")
    for edge in all_edges(n_layers, n_heads):
        add(edge, edge in circuit.edges)
    absent = {
        (c, tuple(ci), p, tuple(pi))
        for c, ci, p, pi in circuit.metadata.get("acdc_absent_internal", [])
    }
    for layer in range(n_layers):
        for h in range(n_heads):
            index = (None, None, h)
            for x in "qkv":
                for key in (
                    (
                        f"blocks.{layer}.attn.hook_{x}",
                        index,
                        f"blocks.{layer}.hook_{x}_input",
                        index,
                    ),
                    (
                        f"blocks.{layer}.attn.hook_result",
                        index,
                        f"blocks.{layer}.attn.hook_{x}",
                        index,
                    ),
                ):
                    out[key] = head_node(layer, h) in circuit.nodes and key not in absent
        key = (f"blocks.{layer}.hook_mlp_out", (None,), f"blocks.{layer}.hook_mlp_in", (None,))
        out[key] = mlp_node(layer) in circuit.nodes and key not in absent
    return out


__all__ = ["from_acdc", "to_acdc"]
