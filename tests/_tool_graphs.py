"""The circuit tools' own structures, written by hand from the code each tool runs (none of the
tools is installed here), for the round-trip tests.

Versions followed:
- EAP-IG main at commit 795f560, ``src/eap/graph.py``: ``Graph.from_model`` (node and edge
  order, ``cfg`` keys), ``apply_topn`` + ``prune`` (which flags are set) and ``to_json``.
- ACDC commit bc99ace: ``TLACDCCorrespondence.setup_from_model`` (every edge, its type, and the
  order ``all_edges()`` yields them), ``TLACDCExperiment.save_subgraph`` (complete dict of
  ``present`` flags), the post-run graph (``remove_edge`` deletes non-placeholder edges),
  ``subnetwork_probing/train.py:iterative_correspondence_from_mask`` and the ground truths of
  ``acdc/ioi/utils.py`` and ``acdc/greaterthan/utils.py``.
- auto-circuit 1.0.1, ``model_utils/transformer_lens_utils.py``: ``factorized_src_nodes`` /
  ``factorized_dest_nodes`` (source order and the layer numbers that decide which sources a
  destination sees); a ``PruneScores`` tensor per destination module.

All three build head destinations from ``cfg.n_heads`` (K and V inputs too), so a grouped-query
model (``n_key_value_heads < n_heads``) has the same graph as one with ``n_heads`` full heads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

ADDITION, PLACEHOLDER, DIRECT = "addition", "placeholder", "direct_computation"


@dataclass(frozen=True)
class Shape:
    """A model shape as the tools' configs give it."""

    name: str
    n_layers: int
    n_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    n_key_value_heads: int | None = None
    d_model: int = 16


SHAPES = [
    Shape("gpt2", 3, 4),
    Shape("attn_only", 3, 4, attn_only=True),
    Shape("neox", 3, 4, parallel_attn_mlp=True),
    Shape("llama_gqa", 3, 4, n_key_value_heads=2),
]


# ---- EAP-IG ----------------------------------------------------------------------------------
def eap_ig_edges(shape: Shape) -> list[str]:
    """Edge names in the order ``Graph.from_model`` adds them (MLP nodes even when attention-only:
    it reads only n_layers, n_heads, parallel_attn_mlp and d_model)."""
    residual, names = ["input"], []
    for layer in range(shape.n_layers):
        heads = [f"a{layer}.h{h}" for h in range(shape.n_heads)]
        mlp = f"m{layer}"
        for parent in residual:
            names += [f"{parent}->{head}<{x}>" for head in heads for x in "qkv"]
            if shape.parallel_attn_mlp:
                names.append(f"{parent}->{mlp}")
        if shape.parallel_attn_mlp:
            residual += [*heads, mlp]
        else:
            residual += heads
            names += [f"{parent}->{mlp}" for parent in residual]
            residual.append(mlp)
    names += [f"{parent}->logits" for parent in residual]
    return names


def eap_ig_json(shape: Shape, n_top: int, seed: int) -> dict:
    """What ``to_json`` writes after scoring every edge and ``apply_topn(n_top)`` (which prunes):
    float32 scores, the top edges by |score| kept if they lie on a path from input to logits,
    nodes flagged when they keep an incoming and an outgoing edge (logits always)."""
    gen = torch.Generator().manual_seed(seed)
    names = eap_ig_edges(shape)
    scores = torch.randn(len(names), generator=gen)
    top = set(torch.argsort(scores.abs(), descending=True)[:n_top].tolist())
    in_graph = {name for i, name in enumerate(names) if i in top}
    ends = lambda name: name.split("<")[0].split("->")  # noqa: E731
    while True:  # Graph.prune
        has_out = {ends(n)[0] for n in in_graph}
        has_in = {ends(n)[1] for n in in_graph} | {"input"}
        alive = has_out & has_in
        kept = {n for n in in_graph if ends(n)[0] in alive and ends(n)[1] in alive | {"logits"}}
        if kept == in_graph:
            break
        in_graph = kept
    cfg = {
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "parallel_attn_mlp": shape.parallel_attn_mlp,
        "d_model": shape.d_model,
    }
    nodes = {"input": {"in_graph": "input" in alive}}
    for layer in range(shape.n_layers):
        for node in [f"a{layer}.h{h}" for h in range(shape.n_heads)] + [f"m{layer}"]:
            nodes[node] = {"in_graph": node in alive}
    nodes["logits"] = {"in_graph": True}
    edges = {
        name: {"score": float(scores[i].item()), "in_graph": name in in_graph}
        for i, name in enumerate(names)
    }
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


# ---- ACDC ------------------------------------------------------------------------------------
def acdc_graph(shape: Shape, use_pos_embed: bool = False) -> OrderedDict:
    """Every edge of ``setup_from_model`` as ``key -> edge type``, keys as ``save_subgraph``
    writes them, in the order ``all_edges()`` yields them: children in the order they first
    received an edge, then child index, parent and parent index in insertion order. The graph
    is always sequential (ACDC does not read ``parallel_attn_mlp``)."""
    children: dict = {}  # child -> child index -> parent -> parent index -> type

    def add(parent: tuple, child: tuple, kind: str) -> None:
        by_index = children.setdefault(child[0], {}).setdefault(child[1], {})
        by_index.setdefault(parent[0], {})[parent[1]] = kind

    none, last = (None,), shape.n_layers - 1
    downstream = [(f"blocks.{last}.hook_resid_post", none)]
    for layer in range(last, -1, -1):
        if not shape.attn_only:
            mlp_out, mlp_in = (
                (f"blocks.{layer}.hook_mlp_out", none),
                (
                    f"blocks.{layer}.hook_mlp_in",
                    none,
                ),
            )
            for node in downstream:
                add(mlp_out, node, ADDITION)
            add(mlp_in, mlp_out, PLACEHOLDER)
            downstream.append(mlp_in)
        new = []
        for h in range(shape.n_heads - 1, -1, -1):
            index = (None, None, h)
            result = (f"blocks.{layer}.attn.hook_result", index)
            for node in downstream:
                add(result, node, ADDITION)
            for x in "qkv":
                hook, hook_input = (
                    (f"blocks.{layer}.attn.hook_{x}", index),
                    (f"blocks.{layer}.hook_{x}_input", index),
                )
                add(hook, result, PLACEHOLDER)
                add(hook_input, hook, DIRECT)
                new.append(hook_input)
        downstream += new
    embeds = ["hook_embed", "hook_pos_embed"] if use_pos_embed else ["blocks.0.hook_resid_pre"]
    for embed in embeds:
        for node in downstream:
            add((embed, none), node, ADDITION)
    out = OrderedDict()
    for child, by_index in children.items():
        for child_index, parents in by_index.items():
            for parent, by_parent_index in parents.items():
                for parent_index, kind in by_parent_index.items():
                    out[(child, child_index, parent, parent_index)] = kind
    return out


def is_internal(key: tuple) -> bool:
    """ACDC's edges inside a head or MLP (q/k/v_input -> hook_q/k/v, hook_q/k/v ->
    hook_result, hook_mlp_in -> hook_mlp_out), as opposed to residual edges."""
    return key[2].endswith(("_input", "attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp_in")) and (
        ".attn.hook_" in key[0] or key[0].endswith("mlp_out")
    )


def save_subgraph(shape: Shape, seed: int, use_pos_embed: bool = False) -> OrderedDict:
    """``save_subgraph(return_it=True)`` of an experiment whose non-placeholder edges were set
    present at random (every key, in ``all_edges()`` order; placeholders present)."""
    gen = torch.Generator().manual_seed(seed)
    graph = acdc_graph(shape, use_pos_embed)
    flags = (torch.rand(len(graph), generator=gen) < 0.3).tolist()
    return OrderedDict(
        (key, kind == PLACEHOLDER or flag)
        for (key, kind), flag in zip(graph.items(), flags, strict=True)
    )


def after_acdc_run(shape: Shape, seed: int, use_pos_embed: bool = False) -> OrderedDict:
    """``save_subgraph`` after an ACDC run: ``remove_edge`` deleted the edges it pruned
    (never placeholders), so every key left is present."""
    full = save_subgraph(shape, seed, use_pos_embed)
    graph = acdc_graph(shape, use_pos_embed)
    return OrderedDict((k, True) for k, v in full.items() if v or graph[k] == PLACEHOLDER)


# ---- auto-circuit ----------------------------------------------------------------------------
def auto_circuit_prune_scores(shape: Shape, seed: int, separate_qkv: bool = True) -> dict:
    """``PruneScores``: per destination module a float32 tensor ``[n_heads, n_src]`` (heads) or
    ``[n_src]``, over the sources whose layer number is below the destination's, in source
    order. Layer numbers as ``factorized_*_nodes`` count them: an MLP shares its block's number
    when ``parallel_attn_mlp`` (so it does not see that block's heads)."""
    gen = torch.Generator().manual_seed(seed)
    src_layers, layer = [0], 0  # Resid Start
    dests: list[tuple[str, int, bool]] = []  # module, layer number, per head
    for block in range(shape.n_layers):
        layer += 1
        src_layers += [layer] * shape.n_heads
        kinds = ("q", "k", "v") if separate_qkv else ("attn",)
        dests += [(f"blocks.{block}.hook_{x}_{'input' if x != 'attn' else 'in'}", layer, True)
                  for x in kinds]  # fmt: skip
        if not shape.attn_only:
            mlp_layer = layer if shape.parallel_attn_mlp else layer + 1
            dests.append((f"blocks.{block}.hook_mlp_in", mlp_layer, False))
            src_layers.append(mlp_layer)
            layer = mlp_layer
    dests.append((f"blocks.{shape.n_layers - 1}.hook_resid_post", layer + 1, False))
    out = {}
    for module, dest_layer, per_head in dests:
        n_src = sum(src < dest_layer for src in src_layers)
        size = (shape.n_heads, n_src) if per_head else (n_src,)
        tensor = torch.randn(size, generator=gen)
        tensor[tensor.abs() < 0.7] = 0.0
        out[module] = tensor
    return out


# ---- ACDC's ground truths (GPT-2 small) --------------------------------------------------------
GPT2_SMALL = Shape("gpt2_small", 12, 12)
NONE = (None,)
RESID_PRE, RESID_POST = "blocks.0.hook_resid_pre", "blocks.11.hook_resid_post"

# the head groups of IOI_CIRCUIT in acdc/ioi/utils.py (26 heads)
IOI_GROUPS = {
    "name mover": [(9, 9), (10, 0), (9, 6)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative": [(10, 7), (11, 10)],
    "s2 inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}
# get_ioi_true_edges' connections: (sender group, receiver group, head inputs)
IOI_CONNECTIONS = [
    ("INPUT", "previous token", "qkv"),
    ("INPUT", "duplicate token", "qkv"),
    ("INPUT", "s2 inhibition", "q"),
    ("INPUT", "negative", "kv"),
    ("INPUT", "name mover", "kv"),
    ("INPUT", "backup name mover", "kv"),
    ("previous token", "induction", "kv"),
    ("induction", "s2 inhibition", "kv"),
    ("duplicate token", "s2 inhibition", "kv"),
    ("s2 inhibition", "negative", "q"),
    ("s2 inhibition", "name mover", "q"),
    ("s2 inhibition", "backup name mover", "q"),
    ("negative", "OUTPUT", ""),
    ("name mover", "OUTPUT", ""),
    ("backup name mover", "OUTPUT", ""),
]
# CIRCUIT of acdc/greaterthan/utils.py: heads (layer, head), MLPs (layer, None)
GREATERTHAN_GROUPS = {
    "0305": [(0, 3), (0, 5)],
    "01": [(0, 1)],
    "MEARLY": [(0, None), (1, None), (2, None), (3, None)],
    "AMID": [(5, 5), (6, 1), (6, 9), (7, 10), (8, 11), (9, 1)],
    "MLATE": [(8, None), (9, None), (10, None), (11, None)],
}
GREATERTHAN_PAIRS = [
    ("01", "MEARLY"),
    ("01", "AMID"),
    ("0305", "AMID"),
    ("MEARLY", "AMID"),
    ("AMID", "MLATE"),
]


class _Flags(dict):
    """``present`` of every edge of GPT-2 small's ACDC graph; setting an edge the graph lacks
    fails, as indexing ACDC's correspondence does."""

    def set(self, child: tuple, parent: tuple, value: bool) -> None:
        key = (*child, *parent)
        assert key in self, f"ACDC's graph has no edge {key}"
        self[key] = value

    def present(self) -> OrderedDict:
        return OrderedDict((key, True) for key, flag in self.items() if flag)


def ioi_true_edges() -> OrderedDict:
    """``get_ioi_true_edges(model)`` for GPT-2 small: 1,131 keys."""
    flags = _Flags(dict.fromkeys(acdc_graph(GPT2_SMALL), True))
    circuit = [head for group in IOI_GROUPS.values() for head in group]
    # iterative_correspondence_from_mask with the hook_q/k/v of every other head: those, the
    # head's q/k/v inputs and (all three letters masked) its hook_result lose all their edges
    masked = set()
    for layer in range(12):
        for h in range(12):
            if (layer, h) not in circuit:
                index = (None, None, h)
                for x in "qkv":
                    masked |= {(f"blocks.{layer}.attn.hook_{x}", index)}
                    masked |= {(f"blocks.{layer}.hook_{x}_input", index)}
                masked.add((f"blocks.{layer}.attn.hook_result", index))
    for key in flags:
        if key[:2] in masked or key[2:] in masked:
            flags[key] = False
    # the circuit's heads lose the embedding and earlier heads as inputs, and the output
    for layer, h in circuit:
        index = (None, None, h)
        for x in "qkv":
            child = (f"blocks.{layer}.hook_{x}_input", index)
            flags.set(child, (RESID_PRE, NONE), False)
            for earlier in range(layer):
                for other in range(12):
                    flags.set(
                        child, (f"blocks.{earlier}.attn.hook_result", (None, None, other)), False
                    )
        flags.set((RESID_POST, NONE), (f"blocks.{layer}.attn.hook_result", index), False)
    # then the connections come back
    for inp, out, letters in IOI_CONNECTIONS:
        if inp == "INPUT":
            senders = [(-1, (RESID_PRE, NONE))]
            senders += [(m, (f"blocks.{m}.hook_mlp_out", NONE)) for m in range(12)]
        else:
            senders = [
                (layer, (f"blocks.{layer}.attn.hook_result", (None, None, h)))
                for layer, h in IOI_GROUPS[inp]
            ]
        if out == "OUTPUT":
            receivers = [(13, (RESID_POST, NONE))]
            receivers += [(m, (f"blocks.{m}.hook_mlp_in", NONE)) for m in range(12)]
        else:
            receivers = [
                (layer, (f"blocks.{layer}.hook_{x}_input", (None, None, h)))
                for layer, h in IOI_GROUPS[out]
                for x in letters
            ]
        for sender_layer, sender in senders:
            for receiver_layer, receiver in receivers:
                if receiver_layer > sender_layer:
                    flags.set(receiver, sender, True)
    return flags.present()


def _gt_hooks(layer: int, head: int | None, output: bool) -> list[tuple]:
    if head is None:
        return [(f"blocks.{layer}.hook_mlp_{'out' if output else 'in'}", NONE)]
    if output:
        return [(f"blocks.{layer}.attn.hook_result", (None, None, head))]
    return [(f"blocks.{layer}.hook_{x}_input", (None, None, head)) for x in "qkv"]


def greaterthan_true_edges() -> OrderedDict:
    """``get_greaterthan_true_edges(model)`` for GPT-2 small: 289 keys."""
    flags = _Flags(dict.fromkeys(acdc_graph(GPT2_SMALL), False))
    groups = GREATERTHAN_GROUPS
    for group in ("0305", "01", "MEARLY"):  # input
        for layer, head in groups[group]:
            for hook in _gt_hooks(layer, head, output=False):
                flags.set(hook, (RESID_PRE, NONE), True)
    for group in ("AMID", "MLATE"):  # output
        for layer, head in groups[group]:
            for hook in _gt_hooks(layer, head, output=True):
                flags.set((RESID_POST, NONE), hook, True)
    for group in ("MEARLY", "MLATE"):  # MLPs of a group feed each other
        for first, _ in groups[group]:
            for second, _ in groups[group]:
                if first < second:
                    flags.set(*_gt_hooks(second, None, False), *_gt_hooks(first, None, True), True)
    for group_from, group_to in GREATERTHAN_PAIRS:
        for layer_from, head_from in groups[group_from]:
            for layer_to, head_to in groups[group_to]:
                head_into_own_mlp = (
                    layer_from == layer_to and head_from is not None and head_to is None
                )
                if layer_from >= layer_to and not head_into_own_mlp:
                    continue
                for sender in _gt_hooks(layer_from, head_from, output=True):
                    for receiver in _gt_hooks(layer_to, head_to, output=False):
                        flags.set(receiver, sender, True)
    heads = [(layer, h) for group in groups.values() for layer, h in group if h is not None]
    for layer, h in heads:  # their internal edges
        index = (None, None, h)
        for x in "qkv":
            hook = (f"blocks.{layer}.attn.hook_{x}", index)
            flags.set(hook, (f"blocks.{layer}.hook_{x}_input", index), True)
            flags.set((f"blocks.{layer}.attn.hook_result", index), hook, True)
    last_amid = max(layer for layer, _ in groups["AMID"])
    for sender in range(last_amid):  # every MLP before the last AMID layer feeds the later ones
        for receiver in range(sender + 1, last_amid):
            flags.set(*_gt_hooks(receiver, None, False), *_gt_hooks(sender, None, True), True)
    for layer, h in groups["AMID"]:  # and the queries of the AMID heads
        for sender in range(layer):
            flags.set(
                (f"blocks.{layer}.hook_q_input", (None, None, h)),
                *_gt_hooks(sender, None, True),
                True,
            )
    return flags.present()


# get_docstring_subgraph_true_edges (acdc/docstring/utils.py), attention-only 4 layers x 8 heads:
# its 37 edges as (child hook, child head, parent hook, parent head); "in" is resid_pre,
# "out" resid_post, "x.L" hook_x_input of layer L, "aL" a head's hook_result of layer L
_DOCSTRING = [
    ("v.1", 4, "a0", 5), ("v.0", 5, "in", None), ("q.2", 0, "in", None), ("q.2", 0, "a0", 5),
    ("k.2", 0, "in", None), ("k.2", 0, "a0", 5), ("v.2", 0, "a1", 4), ("v.1", 4, "in", None),
    ("q.1", 2, "in", None), ("k.1", 2, "in", None), ("q.1", 2, "a0", 5), ("k.1", 2, "a0", 5),
] + [
    edge
    for h in (0, 6)
    for edge in [
        ("out", None, "a3", h), ("q.3", h, "a1", 4), ("v.3", h, "in", None), ("v.3", h, "a0", 5),
        ("k.3", h, "a2", 0), ("k.3", h, "a1", 2),
    ]
]  # fmt: skip
_DOCSTRING_INTERNAL = [("v", 0, 5), ("q", 2, 0), ("k", 2, 0), ("v", 2, 0), ("v", 1, 4)]
_DOCSTRING_INTERNAL += [("q", 1, 2), ("k", 1, 2)]
_DOCSTRING_INTERNAL += [(x, 3, h) for h in (0, 6) for x in "qvk"]


def docstring_true_edges() -> dict:
    """``get_docstring_subgraph_true_edges()``: a plain dict of 37 present edges (24 residual,
    13 ``hook_x_input -> hook_x``)."""

    def hook(name: str, head: int | None) -> tuple:
        if name == "in":
            return ("blocks.0.hook_resid_pre", NONE)
        if name == "out":
            return ("blocks.3.hook_resid_post", NONE)
        if name.startswith("a"):
            return (f"blocks.{name[1:]}.attn.hook_result", (None, None, head))
        x, layer = name.split(".")
        return (f"blocks.{layer}.hook_{x}_input", (None, None, head))

    out = {(*hook(c, ch), *hook(p, ph)): True for c, ch, p, ph in _DOCSTRING}
    for x, layer, h in _DOCSTRING_INTERNAL:
        index = (None, None, h)
        out[(f"blocks.{layer}.attn.hook_{x}", index, f"blocks.{layer}.hook_{x}_input", index)] = (
            True
        )
    return out
