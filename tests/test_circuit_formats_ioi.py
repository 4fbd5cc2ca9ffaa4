"""ACDC's IOI ground truth form: the internal edges ``get_ioi_true_edges`` adds (ACDC commit
bc99ace, ``acdc/ioi/utils.py``: 1,131 keys = 963 residual + 78 ``hook_q/k/v_input ->
hook_q/k/v`` + 90 ``hook_q/k/v -> hook_result`` / ``hook_mlp_in -> hook_mlp_out``)."""

from __future__ import annotations

from subnet_interp.analysis import Circuit, head_node, mlp_node

# the 26 heads of IOI_CIRCUIT in acdc/ioi/utils.py (written out by hand)
IOI_HEADS = [
    (9, 9), (10, 0), (9, 6), (10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0),
    (11, 9), (10, 7), (11, 10), (7, 3), (7, 9), (8, 6), (8, 10), (5, 5), (5, 8), (5, 9),
    (6, 9), (0, 1), (0, 10), (3, 0), (2, 2), (4, 11),
]  # fmt: skip


def test_ioi_circuit_gets_the_internal_edges_get_ioi_true_edges_has():
    assert len(set(IOI_HEADS)) == 26
    edges = {("embed", head_node(layer, h, "q")) for layer, h in IOI_HEADS}
    edges |= {(head_node(layer, h), "unembed") for layer, h in IOI_HEADS}
    edges |= {("embed", mlp_node(layer)) for layer in range(12)}  # ACDC wires every MLP
    circuit = Circuit(frozenset(), frozenset(edges), n_layers=12, n_heads=12)
    residual = circuit.to_acdc()
    full = circuit.to_acdc(internal=True)
    internal = [k for k in full if k not in residual]
    into_qkv = [k for k in internal if k[2].endswith("_input")]
    assert len(residual) == len(edges)
    assert (len(into_qkv), len(internal) - len(into_qkv)) == (78, 90)
    assert Circuit.from_acdc(full, n_heads=12).to_acdc() == full
