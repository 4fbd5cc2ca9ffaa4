"""subnet_interp's own JSON circuit format (``save`` / ``load``): everything a circuit holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..circuits import Circuit
from .eap import from_eap
from .files import read_json, write_atomically

FORMAT_KEY = "subnet_interp_circuit"
"""The JSON key that marks a file as a subnet_interp circuit; its value is the format version."""
FORMAT_VERSION = 1
"""The circuit format version ``save`` writes; ``load`` refuses newer versions."""


def save(circuit: Circuit, path: str | os.PathLike) -> None:
    """Write ``circuit`` to ``path`` as subnet_interp's own JSON (atomically)."""
    data = {
        FORMAT_KEY: FORMAT_VERSION,
        "nodes": sorted(circuit.nodes),
        "edges": sorted([list(e) for e in circuit.edges]),
        "edge_scores": sorted([[*e, v] for e, v in circuit.edge_scores.items()]),
        "node_scores": dict(sorted(circuit.node_scores.items())),
        "n_layers": circuit.n_layers,
        "n_heads": circuit.n_heads,
        "metadata": circuit.metadata,
    }
    write_atomically(Path(path), json.dumps(data, indent=1))


def load(path: str | os.PathLike) -> Circuit:
    """Read a JSON circuit: subnet_interp's own format or an EAP-IG / MIB graph."""
    data = read_json(path)
    if FORMAT_KEY not in data:
        if {"cfg", "nodes", "edges"} <= set(data):
            return from_eap(data)
        raise ValueError(
            f"{str(path)!r} is neither a subnet_interp circuit (key {FORMAT_KEY!r}) nor an "
            f"EAP-IG / MIB graph (keys cfg, nodes, edges); found keys {sorted(data)[:8]}. For "
            "ACDC or auto-circuit objects use Circuit.from_acdc / from_auto_circuit."
        )
    version = data[FORMAT_KEY]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has circuit format version {version!r}; this subnet_interp reads up "
            f"to {FORMAT_VERSION}. Upgrade subnet_interp to read it."
        )
    return Circuit(
        frozenset(data["nodes"]),
        frozenset(tuple(e) for e in data["edges"]),
        {(a, b): v for a, b, v in data["edge_scores"]},
        data["node_scores"],
        n_layers=data["n_layers"],
        n_heads=data["n_heads"],
        metadata=data.get("metadata", {}),
    )


__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "load", "save"]
