"""Analysis: what a subnetwork means (ablation against controls) and how subnetworks relate
(overlap with a chance baseline). Vectorised torch on the masks' device."""

from . import circuit_formats
from ._edge_circuits import edge_kind
from .ablation import (
    AblationReport,
    MeanAblation,
    Metric,
    PatchAblation,
    ReinitAblation,
    ResampleAblation,
    ablation_effect,
    accuracy,
    kl_to_full,
    logit_difference,
    loss,
)
from .circuit_plot import CircuitPlot, plot_circuit
from .circuits import (
    Circuit,
    CircuitComparison,
    CircuitOverlap,
    compare_circuits,
    compare_edges,
    compare_to_circuit,
    head_node,
    mlp_node,
    node_of,
    roc_auc,
)
from .components import edge_scores, graph_edge_scores, head_scores, neuron_scores, top_heads
from .faithfulness import (
    MIB_DENSITIES,
    FaithfulnessCurve,
    faithfulness_areas,
    faithfulness_curve,
)
from .modules import Lesion, Modules, module_enrichment, module_lesions, modules
from .overlap import Overlap, OverlapStats, OverlapTest, overlap, overlap_matrix, overlap_test
from .plots import (
    head_densities,
    per_layer_densities,
    plot_ablation,
    plot_densities,
    plot_faithfulness,
    plot_overlap,
)
from .subspaces import head_ov, retained_energy, subspace_angles

__all__ = [
    "AblationReport",
    "Circuit",
    "CircuitPlot",
    "plot_circuit",
    "CircuitComparison",
    "CircuitOverlap",
    "circuit_formats",
    "compare_circuits",
    "compare_edges",
    "compare_to_circuit",
    "edge_kind",
    "edge_scores",
    "graph_edge_scores",
    "node_of",
    "head_node",
    "mlp_node",
    "roc_auc",
    "MeanAblation",
    "Lesion",
    "Modules",
    "module_lesions",
    "head_ov",
    "module_enrichment",
    "modules",
    "retained_energy",
    "subspace_angles",
    "Metric",
    "MIB_DENSITIES",
    "FaithfulnessCurve",
    "faithfulness_areas",
    "faithfulness_curve",
    "Overlap",
    "OverlapStats",
    "OverlapTest",
    "ReinitAblation",
    "PatchAblation",
    "ResampleAblation",
    "ablation_effect",
    "head_densities",
    "head_scores",
    "neuron_scores",
    "per_layer_densities",
    "plot_ablation",
    "plot_densities",
    "plot_faithfulness",
    "plot_overlap",
    "top_heads",
    "accuracy",
    "kl_to_full",
    "logit_difference",
    "loss",
    "overlap",
    "overlap_matrix",
    "overlap_test",
]
