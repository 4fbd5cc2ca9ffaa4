"""auto-circuit (UFO-101/auto-circuit) ``PruneScores``: ``from_auto_circuit`` and
``to_auto_circuit``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..circuits import (
    EMBED,
    UNEMBED,
    Circuit,
    head_node,
    mlp_node,
    need_shape,
    node_of,
    node_position,
    sources,
)

_AC_DEST = re.compile(r"^blocks\.(\d+)\.hook_(q_input|k_input|v_input|attn_in|mlp_in|resid_post)$")
_AC_NODE = re.compile(r"^(?:(Resid Start)|(Resid End)|A(\d+)\.(\d+)(?:\.([QKV]))?|MLP (\d+))$")


def _from_ac_node(name: str) -> str:
    match = _AC_NODE.match(name.strip())
    if match is None:
        raise ValueError(
            f"Unknown auto-circuit node {name!r}; expected 'Resid Start', 'A<L>.<H>[.Q|K|V]', "
            "'MLP <L>' or 'Resid End'."
        )
    if match.group(1):
        return EMBED
    if match.group(2):
        return UNEMBED
    if match.group(3) is not None:
        port = match.group(5)
        return head_node(int(match.group(3)), int(match.group(4)), port.lower() if port else None)
    return mlp_node(int(match.group(6)))


def from_auto_circuit(
    prune_scores: Mapping[str, Any],
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> Circuit:
    """Read auto-circuit prune scores (tensor per destination module) or an edge-name dict.

    The circuit holds the edges with a non-zero score, or ``|score| > threshold``, or the
    ``top_k`` largest ``|score|``; every score is kept in ``edge_scores``. Prune scores give the
    model's shape; for an edge-name dict ``n_layers`` / ``n_heads`` default to one more than the
    largest layer / head named (pass them when the model is larger).
    """
    if not prune_scores:
        raise ValueError("Empty prune scores: nothing to read.")
    if all(isinstance(k, str) and "->" in k for k in prune_scores):
        scores = {}
        for name, value in prune_scores.items():
            src, dst = name.split("->", 1)
            score = 1.0 if isinstance(value, (list, tuple)) or value is True else float(value)
            scores[(_from_ac_node(src), _from_ac_node(dst))] = score
        positions = [node_position(x) for e in scores for x in e]
        positions = [p for p in positions if p is not None]
        if n_layers is None and positions:
            n_layers = max(layer for layer, _ in positions) + 1
        if n_heads is None:
            heads = [h for _, h in positions if h is not None]
            n_heads = max(heads) + 1 if heads else None
        return _select(scores, threshold, top_k, n_layers, n_heads, {})
    given_layers, given_heads = n_layers, n_heads
    bad = [k for k in prune_scores if not _AC_DEST.match(str(k))]
    if bad:
        raise ValueError(
            f"Unknown auto-circuit destination module(s) {bad[:3]}; PruneScores are keyed by "
            "'blocks.L.hook_q_input' / k / v / 'hook_attn_in' / 'hook_mlp_in' / "
            "'blocks.N-1.hook_resid_post' (or pass a dict of edge names like 'A0.1->A1.2.Q')."
        )
    tensors = {k: torch.as_tensor(v).detach().cpu() for k, v in prune_scores.items()}
    end = [k for k in tensors if k.endswith("hook_resid_post")]
    if len(end) != 1:
        raise ValueError(
            f"Expected exactly one '...hook_resid_post' entry (the Resid End), got {end}."
        )
    n_layers = int(_AC_DEST.match(end[0]).group(1)) + 1
    attn = [t for k, t in tensors.items() if "_in" in k and "mlp" not in k]
    if not attn or attn[0].dim() < 2:
        raise ValueError(
            "No attention destinations (tensors [n_heads, n_sources]) in the prune scores: "
            "cannot tell n_heads."
        )
    n_heads = attn[0].shape[-2]  # per-position scores have a leading position axis
    n_src = tensors[end[0]].shape[-1]
    given = (
        n_layers if given_layers is None else given_layers,
        n_heads if given_heads is None else given_heads,
    )
    if given != (n_layers, n_heads):
        raise ValueError(
            f"The prune scores are of a model with {n_layers} layers x {n_heads} heads, not "
            f"{given[0]} x {given[1]} as passed."
        )
    if n_src == 1 + n_layers * (n_heads + 1):
        attn_only = False
    elif n_src == 1 + n_layers * n_heads:
        attn_only = True
    else:
        raise ValueError(
            f"Resid End scores have {n_src} sources; with {n_layers} layers and {n_heads} heads "
            f"expected {1 + n_layers * (n_heads + 1)} (or {1 + n_layers * n_heads} attention-only)."
        )
    srcs = sources(n_layers, n_heads, attn_only=attn_only)
    # parallel attention / MLP (GPT-NeoX, Pythia): an MLP reads only the sources before its block
    parallel = any(
        k.endswith("hook_mlp_in") and t.shape[-1:] == (1 + int(k.split(".")[1]) * (n_heads + 1),)
        for k, t in tensors.items()
    )
    scores: dict[tuple[str, str], float] = {}
    for key, tensor in tensors.items():
        match = _AC_DEST.match(key)
        layer, kind = int(match.group(1)), match.group(2)
        per_src = 1 + layer * (n_heads + (0 if attn_only else 1))
        if kind == "mlp_in":
            expected: tuple[int, ...] = (per_src + (0 if parallel else n_heads),)
        elif kind == "resid_post":
            expected = (len(srcs),)
        else:
            expected = (n_heads, per_src)
        if tuple(tensor.shape) != expected:
            shape = tuple(tensor.shape)
            hint = (
                f"; these are per-position scores ({shape[0]} positions): pass one position "
                "(scores[key][p]) or their sum (.sum(0))"
                if shape[1:] == expected
                else ""
            )
            raise ValueError(
                f"Prune scores for {key!r} have shape {shape}, expected {expected} "
                f"for {n_layers} layers x {n_heads} heads{hint}."
            )
        values = tensor.double().tolist()
        if kind in ("mlp_in", "resid_post"):
            dst = mlp_node(layer) if kind == "mlp_in" else UNEMBED
            for i, v in enumerate(values):
                scores[(srcs[i], dst)] = v
        else:
            port = None if kind == "attn_in" else kind[0]
            for h, row in enumerate(values):
                for i, v in enumerate(row):
                    scores[(srcs[i], head_node(layer, h, port))] = v
    metadata = {"auto_circuit_attn_only": attn_only}
    if parallel:
        metadata["auto_circuit_parallel_attn_mlp"] = True
    return _select(scores, threshold, top_k, n_layers, n_heads, metadata)


def _select(scores, threshold, top_k, n_layers, n_heads, metadata) -> Circuit:
    if threshold is not None and top_k is not None:
        raise ValueError("Give threshold or top_k, not both.")
    if top_k is not None:
        ranked = sorted(scores, key=lambda e: -abs(scores[e]))
        chosen = set(ranked[:top_k])
    else:
        limit = 0.0 if threshold is None else threshold
        chosen = {e for e, v in scores.items() if abs(v) > limit and not math.isnan(v)}
    return Circuit(
        frozenset(),
        frozenset(chosen),
        scores,
        n_layers=n_layers,
        n_heads=n_heads,
        metadata=metadata,
    )


def to_auto_circuit(
    circuit: Circuit,
    *,
    scores: bool = True,
    parallel_attn_mlp: bool | None = None,
    attn_only: bool | None = None,
) -> dict[str, Tensor]:
    """auto-circuit ``PruneScores`` for the complete graph: each edge's score from
    ``edge_scores`` (``scores=True``; edges without a score get 1 in the circuit, 0 outside;
    an edge of the circuit scored 0 or NaN is refused, since auto-circuit would read it as
    outside) or circuit membership as 1 / 0 (``scores=False``). ``parallel_attn_mlp=True`` (GPT-NeoX /
    Pythia; default: what the circuit was read as, from auto-circuit or EAP-IG's ``cfg``)
    gives each MLP only the sources before its block; ``attn_only=True`` (default: what the
    circuit was read as) writes no MLP sources or destinations, as for an attention-only
    model."""
    n_layers, n_heads = need_shape(circuit, "auto-circuit prune scores")
    if parallel_attn_mlp is None:
        parallel_attn_mlp = bool(
            circuit.metadata.get("auto_circuit_parallel_attn_mlp")
            or circuit.metadata.get("eap_cfg", {}).get("parallel_attn_mlp")
        )
    if attn_only is None:
        attn_only = bool(circuit.metadata.get("auto_circuit_attn_only", False))
    if attn_only and circuit.mlps():
        raise ValueError(f"attn_only=True, but the circuit has MLPs {circuit.mlps()}.")
    srcs = sources(n_layers, n_heads, attn_only=attn_only)
    position = {s: i for i, s in enumerate(srcs)}
    ported = any(node_of(d) != d for _, d in circuit.edges | set(circuit.edge_scores))
    unported = any(
        "attn.head" in d and node_of(d) == d for _, d in circuit.edges | set(circuit.edge_scores)
    )
    if ported and unported:
        raise ValueError("The circuit mixes head edges with and without q/k/v ports.")
    out: dict[str, Tensor] = {}
    per_layer = n_heads + (0 if attn_only else 1)
    for layer in range(n_layers):
        n_src = 1 + layer * per_layer
        for port in ("q", "k", "v") if not unported else (None,):
            name = f"blocks.{layer}.hook_{port}_input" if port else f"blocks.{layer}.hook_attn_in"
            out[name] = torch.zeros(n_heads, n_src)
        if not attn_only:
            out[f"blocks.{layer}.hook_mlp_in"] = torch.zeros(
                n_src + (0 if parallel_attn_mlp else n_heads)
            )
    out[f"blocks.{n_layers - 1}.hook_resid_post"] = torch.zeros(len(srcs))
    if scores:  # auto-circuit reads an edge as in the circuit where its score is non-zero
        unmarked = sorted(
            e
            for e in circuit.edges
            if e in circuit.edge_scores
            and (circuit.edge_scores[e] == 0.0 or math.isnan(circuit.edge_scores[e]))
        )
        if unmarked:
            raise ValueError(
                f"{len(unmarked)} edges of the circuit have a score of 0 or NaN (e.g. "
                f"{unmarked[:3]}): auto-circuit's prune scores mark the circuit's edges by "
                "non-zero scores, so these would read back as outside it. Pass scores=False "
                "to write membership (1 in the circuit, 0 outside), or give them scores."
            )
    edges = circuit.edges | (set(circuit.edge_scores) if scores else set())
    for edge in edges:
        src, dst = edge
        if src not in position:
            raise ValueError(f"Edge {edge} has a source auto-circuit's graph does not have.")
        value = circuit.edge_scores.get(edge, 1.0) if scores else 1.0
        if scores is False and edge not in circuit.edges:
            continue
        node = node_of(dst)
        if dst == UNEMBED:
            out[f"blocks.{n_layers - 1}.hook_resid_post"][position[src]] = value
            continue
        layer, head = node_position(node)
        if head is None:
            tensor, index = out[f"blocks.{layer}.hook_mlp_in"], (position[src],)
        else:
            hook = f"hook_{dst[-1]}_input" if node != dst else "hook_attn_in"
            tensor, index = out[f"blocks.{layer}.{hook}"], (head, position[src])
        if index[-1] >= tensor.shape[-1]:
            raise ValueError(f"Edge {edge} does not run forward (its source is not earlier).")
        tensor[index] = value
    return out


__all__ = ["from_auto_circuit", "to_auto_circuit"]
