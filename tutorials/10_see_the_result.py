# %% [markdown]
# # See the result: circuit graphs, head views and an HTML report
#
# We find the induction subnetwork of a tiny GPT-2 (as `subnet-interp demo` does) and look at
# it: the strongest edges between heads and MLPs as a layered circuit graph, where it and a
# magnitude-pruning baseline agree head by head, and one self-contained HTML page with
# everything (open `report.html` in a browser; it needs no network).
#
# `SUBNET_INTERP_FAST=1` shrinks it for the test suite.

# %%
import os

import torch

import subnet_interp as si
from subnet_interp.analysis import (
    Circuit,
    accuracy,
    graph_edge_scores,
    head_overlap,
    html_report,
    plot_circuit,
)
from subnet_interp.tasks import (
    induction_loss,
    next_token_loss,
    predictable_positions,
    repeated_tokens,
    tiny_gpt2,
    train,
)

FAST = os.environ.get("SUBNET_INTERP_FAST") == "1"
TRAIN_STEPS, MASK_STEPS, CONTROLS = (150, 60, 5) if FAST else (1500, 400, 20)
torch.manual_seed(0)

# %% [markdown]
# ## A tiny GPT-2 that does induction, and its subnetwork

# %%
model = tiny_gpt2()
data = repeated_tokens(TRAIN_STEPS, 32, generator=torch.Generator().manual_seed(0))
held_out = repeated_tokens(8, 64, generator=torch.Generator().manual_seed(1))
train(model, next_token_loss, data, steps=TRAIN_STEPS, lr=1e-3)
method = si.methods.create(
    "gumbel_sigmoid", per_example_penalty=False, **({"lr": 5e-2} if FAST else {})
)
result = si.find(
    model,
    method,
    induction_loss,
    data[:64],
    targets="blocks.*.attn.*",
    steps=MASK_STEPS,
    progress=not FAST,
)
subnetwork = result.subnetwork
print(f"induction subnetwork: density {subnetwork.density():.3f}")

# %% [markdown]
# ## The circuit graph
# `graph_edge_scores` scores every edge between heads and MLPs from the masked weights
# (composition scores, Elhage et al. 2021). `plot_circuit` draws the strongest as a layered
# graph: embed at the bottom, each layer's heads (inputs `q`, `k`, `v` on their lower edge)
# and MLP, unembed at the top; colour and width follow the score. A `.html` path gives an
# interactive page (wheel to zoom, drag to pan, hover for names and scores), `.svg` / `.png`
# a static picture. In a notebook the returned plot shows itself.

# %%
scores = graph_edge_scores(model, subnetwork)
plot = plot_circuit(scores, top_k=20, path="circuit.html")
plot.save("circuit.svg")
print(f"circuit.html: {len(plot.nodes)} nodes, {len(plot.edges)} edges")

# %% [markdown]
# Circuits from other tools draw the same way: here the top edges go out as an EAP-IG / MIB
# graph file and come back with `Circuit.load` (also `Circuit.from_acdc`,
# `Circuit.from_auto_circuit`).

# %%
Circuit.from_edge_scores(scores, top_k=12).to_eap("circuit_eap.json", d_model=64)
imported = Circuit.load("circuit_eap.json")
plot_circuit(imported, path="imported_circuit.html")
print(f"imported circuit: {len(imported.nodes)} nodes, {len(imported.edges)} edges")

# %% [markdown]
# ## Head by head: the masks against magnitude pruning at the same density

# %%
baseline = si.find(
    model,
    si.methods.create("magnitude", density=subnetwork.density()),
    induction_loss,
    data[:4],
    targets="blocks.*.attn.*",
).subnetwork
agreement = head_overlap(model, subnetwork, baseline)
print("fraction of each head's weights both keep (layer x head):")
print(agreement.shared)

# %% [markdown]
# ## One page with everything
# Metadata, densities per layer and head, the ablation against density-matched random
# controls, the comparison with the baseline and the circuit graph. From the command line:
# `subnet-interp report SUB.safetensors --model pkg.mod:make_model --data pkg.mod:batches
# --metric pkg.mod:metric -o report.html`.

# %%
html_report(
    model,
    subnetwork,
    path="report.html",
    data=held_out,
    metric=accuracy(predictable_positions),
    controls=CONTROLS,
    compare=baseline,
    top_k=20,
    title="induction subnetwork of a tiny GPT-2",
)
print("wrote report.html")
