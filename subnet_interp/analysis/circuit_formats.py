"""Reading and writing circuits in the formats of other circuit-discovery tools.

Every format is mapped onto :class:`~subnet_interp.analysis.Circuit`'s canonical names
(``embed``, ``blocks.L.attn.head.H[.q|.k|.v]``, ``blocks.L.mlp``, ``unembed``). What each reads:

* **EAP / EAP-IG and MIB** (``Graph.to_json`` of hannamw/EAP-IG, also the MIB circuit-track
  submission format): ``cfg`` (``n_layers``, ``n_heads``; the rest is kept), ``nodes[name]``
  (``in_graph``, optional ``score``; ``neurons`` / ``neurons_scores`` are kept as metadata) and
  ``edges[name]`` (``in_graph``, ``score``). Node names ``input``, ``a{L}.h{H}``, ``m{L}``,
  ``logits``; edge names ``parent->child`` with ``<q|k|v>`` after a head child. Writing gives
  every edge of the complete graph (``score`` 0 and ``in_graph`` false where the circuit has
  neither) in the order EAP-IG's ``Graph.from_model`` makes them, so EAP-IG's
  ``Graph.from_json`` and MIB's evaluation load it and a file read comes back as the same
  text. A file written unpruned (``apply_topn(n, prune=False)``: in-graph edges whose nodes are
  not) is read as written with a warning, or with ``from_eap(..., prune=True)`` as EAP-IG's
  ``prune()`` leaves it. A circuit of nodes without edges is written with the edges between its
  nodes, input and logits, so that EAP-IG's ``prune()`` keeps it (see ``to_eap``).
* **ACDC** (ArthurConmy/Automatic-Circuit-Discovery): a mapping from
  ``(child_hook, child_index, parent_hook, parent_index)`` to a bool (``save_subgraph`` and the
  ``get_*_true_edges`` ground truths), to an ``Edge`` with ``present`` / ``effect_size``, or to
  an effect size; or the list of ``(key, effect_size)`` pairs ``save_edges`` pickles. Indices may
  be ``TorchIndex`` objects, their ``hashable_tuple`` (``(None, None, h)``) or ``None``-tuples.
  Hooks: ``blocks.0.hook_resid_pre`` / ``hook_embed`` / ``hook_pos_embed`` (embed),
  ``blocks.L.attn.hook_result`` (head outputs), ``blocks.L.hook_{q,k,v}_input`` (head inputs),
  ``blocks.L.hook_mlp_in`` / ``hook_mlp_out``, ``blocks.{N-1}.hook_resid_post`` (unembed).
  ACDC's internal edges (``q_input -> hook_q``, ``hook_q -> hook_result``, ``mlp_in ->
  mlp_out``) carry no circuit information of their own; those read are kept in ``metadata`` and
  written back as read, others are written present for every node of the circuit (complete
  graphs, or ``to_acdc(internal=True)``, the form of ``get_ioi_true_edges``). Which embedding
  hook (``hook_embed`` / ``hook_pos_embed``) each edge from ``embed`` had is kept too, and a
  complete graph without MLP hooks is read as attention-only (``to_acdc(attn_only=,
  use_pos_embed=)`` say it for other circuits). Keys are written in the order of ACDC's
  ``TLACDCCorrespondence.all_edges()``, so its ``OrderedDict``\\ s compare equal.
  ACDC saves pickles, which this
  library never opens: unpickle them yourself (with ``acdc`` importable) and pass the object.
* **auto-circuit** (UFO-101/auto-circuit): ``PruneScores``, a tensor per destination module
  (``blocks.L.hook_{q,k,v}_input`` or ``hook_attn_in`` ``[n_heads, n_src]``,
  ``blocks.L.hook_mlp_in`` and ``blocks.{N-1}.hook_resid_post`` ``[n_src]``) indexed by source
  in forward order (``Resid Start``, then per layer each head then the MLP); or a dict of edge
  names (``"A0.1->A1.2.Q"``, ``"Resid Start->MLP 0"``, ``"MLP 3->Resid End"``) to scores. The
  circuit is the edges whose score is non-zero (or above ``threshold``, or the ``top_k``); all
  scores are kept. Per-position scores (a leading position axis) are refused: pass one
  position or their sum. An edge-name dict gives ``n_layers`` / ``n_heads`` from the largest
  layer / head it names unless they are passed. Attention-only and parallel attention / MLP
  (GPT-NeoX, Pythia: an MLP sees only the sources before its block) scores are recognised
  from the shapes; ``to_auto_circuit(attn_only=, parallel_attn_mlp=)`` say it for other
  circuits. A grouped-query model has K and V inputs per query head, as auto-circuit builds.
* **subnet_interp's own JSON** (``Circuit.save`` / ``load``): everything a circuit holds.

This module gathers the public names. The code is one module per format in
``analysis/_formats/`` (``eap``, ``acdc``, ``auto_circuit``, ``native``); the graph they share
(``sources``, ``all_edges``, ``edge_universe``, node names) is described in
``analysis/circuits.py``, which imports no format module at import time.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._formats.acdc import from_acdc, to_acdc
from ._formats.auto_circuit import from_auto_circuit, to_auto_circuit
from ._formats.eap import from_eap, to_eap
from ._formats.native import FORMAT_KEY, FORMAT_VERSION, load, save
from .circuits import all_edges, edge_universe, sources

__all__: Iterable[str] = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "all_edges",
    "edge_universe",
    "from_acdc",
    "from_auto_circuit",
    "from_eap",
    "load",
    "save",
    "sources",
    "to_acdc",
    "to_auto_circuit",
    "to_eap",
]
