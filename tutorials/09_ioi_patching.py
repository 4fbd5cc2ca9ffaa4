# %% [markdown]
# # Training and judging a mask under patching (IOI)
#
# "Which weights does the model need?" has no answer until we say what a removed weight
# becomes. Zero ablation (`m * W`) asks what the model still does with the weights gone;
# patching (interchange ablation) asks which weights carry the information that *distinguishes*
# a prompt from a minimally different twin: a removed weight computes on what its layer saw in
# the twin's run, `y = (m*W) x + ((1-m)*W) x'`. Miller, Chughtai & Saunders (2024, "Transformer
# Circuit Faithfulness Metrics are not Robust") show that circuit faithfulness moves a lot
# with the ablation; circuit benchmarks have settled on patching: Edge Pruning (Bhaskar et al.
# 2024) trains its masks under interchange ablation and MIB's circuit track (Mueller et al.
# 2025) judges circuits with it.
#
# Here we train a tiny GPT-2 on a templated indirect-object task (IOI), pair every prompt with
# its name-swapped twin, find masks under zero ablation and under patching at a matched
# density, and judge all of them the same way — under patching (and, for contrast, under zero
# ablation).

# %%
import os

import torch

import subnet_interp as si
from subnet_interp.analysis import (
    ablation_effect,
    faithfulness_curve,
    logit_difference,
    plot_faithfulness,
)
from subnet_interp.tasks import (
    VOCAB,
    ioi_batches,
    ioi_loss,
    ioi_pair_accuracy,
    ioi_pair_logit_diff,
    ioi_pair_logits,
    ioi_pair_loss,
    ioi_pairs,
    tiny_gpt2,
    train,
)

FAST = os.environ.get("SUBNET_INTERP_FAST") == "1"
TRAIN_STEPS, MASK_STEPS = (200, 40) if FAST else (300, 1000)
# a model this small runs fastest on one thread (more only add synchronisation, and a busy
# machine makes threads wait for each other)
torch.set_num_threads(1)
DENSITY = 0.05  # the matched density: 5% of the masked weights
# Gumbel-sigmoid masks (Csordás et al. 2021) without the division of the regulariser by the
# batch size (a stronger push towards sparsity for a few hundred steps), and hard-concrete
# masks with Edge Pruning's Lagrangian towards DENSITY, with faster multipliers than Edge
# Pruning's 3000 steps need. Both take bigger steps than the papers' (fast mode, which the test
# suite runs, bigger still).
GUMBEL = si.methods.create("gumbel_sigmoid", per_example_penalty=False, lr=0.1 if FAST else 1e-2)
HARD_CONCRETE = si.methods.create(
    "hard_concrete", target_density=DENSITY, lr=0.1 if FAST else 5e-2, lagrangian_lr=0.1
)

# %% [markdown]
# ## A tiny GPT-2 that solves IOI
# `"<bos> when mary and john went to the park , john gave a ball to"` -> `mary`: the answer is
# the name that is not repeated. Two layers, four heads, trained on the last position only.

# %%
model = tiny_gpt2(len(VOCAB), n_positions=16)
train(
    model,
    ioi_loss,
    ioi_batches(TRAIN_STEPS, 64, generator=torch.Generator().manual_seed(0)),
    steps=TRAIN_STEPS,
    lr=3e-3,
)
# mask-training pairs and held-out evaluation pairs (different seeds from the training prompts)
pairs = ioi_pairs(16 if FAST else 32, 64, generator=torch.Generator().manual_seed(2))
held_out = ioi_pairs(2 if FAST else 4, 64, generator=torch.Generator().manual_seed(3))


def mean_over(fn, batches) -> float:
    with torch.no_grad():
        return float(torch.stack([fn(model, b) for b in batches]).mean())


accuracy = mean_over(ioi_pair_accuracy, held_out)
print(f"held-out accuracy {accuracy:.3f}")
assert accuracy >= 0.95, "the base model must solve the task before we look for its mechanism"

# %% [markdown]
# ## Name-swapped twins
# `ioi_pairs` gives each prompt a twin that differs only at the repeated name (S2): there the
# twin has the other name, so its answer flips. With the weights all patched from the twin the
# model answers the twin's question, so the empty circuit's logit difference is about minus the
# full model's; zero ablation's empty circuit instead says nothing (about 0).

# %%
example = held_out[0]
words = lambda ids: " ".join(VOCAB[i] for i in ids.tolist())  # noqa: E731
print("clean:    ", words(example["tokens"][0]), "->", VOCAB[example["correct"][0]])
print("corrupted:", words(example["corrupted"][0]), "->", VOCAB[example["repeated"][0]])
clean_ld = mean_over(ioi_pair_logit_diff, held_out)
twin_ld = mean_over(ioi_pair_logit_diff, [{**b, "tokens": b["corrupted"]} for b in held_out])
print(f"logit difference (correct - repeated): clean {clean_ld:.2f}, on the twins {twin_ld:.2f}")

# %% [markdown]
# ## Masks trained under zero ablation and under patching
# The same method, loss and data; only the ablation differs. `si.PatchAblation("corrupted")`
# runs the model on `batch["corrupted"]` before every step (with the masks off) and feeds
# every removed weight its layer's input from that run. Gumbel-sigmoid masks choose their own
# density; hard-concrete masks are trained towards `DENSITY` and land near it. For an exact
# match we cut every result at `DENSITY` with `result.at_density(DENSITY)` (its top-scored
# weights), and also keep each method's own mask.


# %%
def patch():
    return si.PatchAblation("corrupted")  # one per attachment


results = {}
for method_name, method in (("gumbel_sigmoid", GUMBEL), ("hard_concrete", HARD_CONCRETE)):
    for trained_under in ("zero", "patch"):
        results[method_name, trained_under] = si.find(
            model,
            method,
            ioi_pair_loss,
            pairs,
            steps=MASK_STEPS,
            ablation=patch() if trained_under == "patch" else "zero",
            progress=False,
        )
        own = results[method_name, trained_under].subnetwork.density()
        print(f"{method_name:15s} trained under {trained_under:5s}: its own density {own:.4f}")

masks = {key: result.at_density(DENSITY) for key, result in results.items()}

# %% [markdown]
# ## Judged under patching
# `ablation_effect(..., ablation=patch())` keeps each mask, patches the rest from the twin and
# reports the faithfulness `(kept - empty) / (full - empty)` of the logit difference, with
# random masks of the same density as controls. For contrast we judge under zero ablation too,
# and judge each method's own mask (at the density it chose) both ways.

# %%
metric = logit_difference(ioi_pair_logits)
controls = 3 if FAST else 10
reports = {}
for key, sub in masks.items():
    reports[key, "patch"] = ablation_effect(
        model, sub, metric, held_out, ablation=patch(), controls=controls
    )
    reports[key, "zero"] = ablation_effect(model, sub, metric, held_out, controls=0)
    own = results[key].subnetwork
    reports[key, "own patch"] = ablation_effect(
        model, own, metric, held_out, ablation=patch(), controls=0
    )
    reports[key, "own zero"] = ablation_effect(model, own, metric, held_out, controls=0)
print(reports[("gumbel_sigmoid", "patch"), "patch"])

# %% [markdown]
# ## Faithfulness curves under patching
# `faithfulness_curve` ranks the weights by each result's scores and keeps the top 0.1% ...
# 100%, patching the rest (MIB's circuit sizes); CPR is the area under the faithfulness
# curve (higher is better), CMD the area under `|1 - faithfulness|` (lower is better).

# %%
curves = {}
for key, result in results.items():
    curves[key] = faithfulness_curve(model, result, held_out, metric, ablation=patch())
    method_name, trained_under = key
    figure = plot_faithfulness(curves[key])
    axes = figure.axes[0]
    axes.set_title(f"{method_name}, trained under {trained_under}: {axes.get_title()}")
    figure.savefig(f"faithfulness_{method_name}_{trained_under}.png", dpi=120)
print(curves[("gumbel_sigmoid", "patch")])
print("faithfulness under patching of each result's top-scored weights, by density:")
print(f"{'':23s}" + "".join(f"{d:>7g}" for d in curves[key].densities))
for (method_name, trained_under), curve in curves.items():
    print(
        f"{method_name:15s} {trained_under:>7s}" + "".join(f"{f:7.3f}" for f in curve.faithfulness)
    )

# %% [markdown]
# ## The table
# LD: logit difference (correct - repeated name) with only the mask kept; faithfulness ("f")
# normalises it between the empty circuit (0) and the full model (1) under the same ablation.
# "random LD" is the mean of density-matched random masks under patching, p the fraction of them
# (plus one) that do at least as well.

# %%
any_key = next(iter(masks))
print(
    f"logit difference: full model {reports[any_key, 'patch'].full:.2f}; empty circuit "
    f"{reports[any_key, 'patch'].empty:.2f} under patching, "
    f"{reports[any_key, 'zero'].empty:.2f} under zero ablation"
)
print(f"{'':23s} | {'own mask':^21s} | {f'cut at density {DENSITY}':^39s} | {'patch curve':^13s}")
print(
    f"{'method':15s} {'trained':>7s} | {'density':>7s} {'f patch':>7s} {'f zero':>6s} | "
    f"{'LD':>6s} {'f patch':>7s} {'random LD':>9s} {'p':>5s} {'f zero':>6s} | "
    f"{'CPR':>6s} {'CMD':>6s}"
)
for key, result in results.items():
    on_patch, on_zero, curve = reports[key, "patch"], reports[key, "zero"], curves[key]
    print(
        f"{key[0]:15s} {key[1]:>7s} | {result.subnetwork.density():7.4f} "
        f"{reports[key, 'own patch'].faithfulness:7.3f} "
        f"{reports[key, 'own zero'].faithfulness:6.3f} | {on_patch.kept:6.2f} "
        f"{on_patch.faithfulness:7.3f} {on_patch.control_mean:9.2f} {on_patch.p_value:5.3f} "
        f"{on_zero.faithfulness:6.3f} | {curve.cpr:6.3f} {curve.cmd:6.3f}"
    )

# %% [markdown]
# ## What we learned
# In a full run (`SUBNET_INTERP_FAST` unset, about three minutes on one CPU thread) we measured:
# the model gets every held-out prompt right with a logit difference of 7.89; patching every
# masked weight from the twin gives -7.86 (the twin's answer), zeroing them gives -0.28.
#
# | method | trained | own density | own mask: f patch / zero | at 5%: f patch / zero | CPR | CMD |
# |---|---|---|---|---|---|---|
# | gumbel_sigmoid | zero  | 0.014 | 0.044 / 0.561  | 0.153 / 0.609  | 0.718 | 0.281 |
# | gumbel_sigmoid | patch | 0.069 | 0.677 / -0.017 | 0.454 / -0.003 | 0.586 | 0.413 |
# | hard_concrete  | zero  | 0.036 | 0.044 / 0.833  | 0.085 / 0.622  | 0.762 | 0.237 |
# | hard_concrete  | patch | 0.105 | 0.832 / -0.007 | 0.054 / -0.001 | 0.874 | 0.125 |
#
# (f: faithfulness of the logit difference; CPR / CMD from the curves under patching. Cut at
# 5%, every mask beat all 10 density-matched random masks under patching: p = 0.09, the
# smallest 10 controls allow.)
#
# - **A mask is faithful only under the ablation it was trained with.** The zero-trained masks
#   keep 56% (Gumbel) and 83% (hard concrete) of the logit difference under zero ablation and
#   4% under patching, little better than the empty circuit; the patch-trained masks keep 68%
#   and 83% under patching and nothing under zero ablation. This is Miller et al.'s warning
#   made concrete: "how faithful is this circuit?" has no answer apart from the ablation.
# - **Why.** Under zero ablation a mask must keep all the machinery the prediction needs
#   (moving the names to the last position, writing the answer), and may drop any weight
#   whose contribution is redundant. Under patching every weight computes the same on both
#   prompts except where the repeated name flows, so the generic machinery comes for free from
#   the twin — but every weight that carries the S2 name must be kept, redundant or not,
#   because a patched one writes the *other* name and pushes towards the wrong answer instead
#   of writing nothing. So the patch-trained masks are larger (6.9% vs 1.4% for Gumbel, 10.5%
#   vs 3.6% for hard concrete, which was asked for 5% both times) and useless under zero
#   ablation, and the zero-trained masks presumably leave out carriers of the name that
#   patching then turns against them.
# - **Matched density is fragile for masks.** Cut at the same 5%, the patch-trained Gumbel mask
#   (0.454) still beats the zero-trained one (0.153) under patching, but the hard-concrete
#   masks both fall apart (0.085 and 0.054): the patch-trained one loses most of its
#   faithfulness when cut from its own 10.5% to 5%, and even under zero ablation the
#   zero-trained hard-concrete mask drops from 0.833 at its own 3.6% to 0.622 when extended to
#   5%. Masks are not nested; a mask's scores rank well only near the size it was trained at.
# - **CPR / CMD disagree with faithfulness at the mask's own size.** On MIB's linear axis the
#   areas are dominated by circuits of 20-100% of the weights. The patch-trained Gumbel mask is
#   the best Gumbel circuit at 5% and 10%, but its next-ranked weights make things worse under
#   patching (faithfulness 0.63 at 10%, 0.46 at 20%, 0.44 at 50%; plausibly, keeping part of a
#   pathway clean and the rest patched mixes the two prompts' names), so it has the *lowest* CPR
#   (0.586); the zero-trained masks, useless under patching at their own size, get 0.718 and
#   0.762 from their smooth rise at large sizes. The patch-trained hard-concrete mask has the
#   best areas (CPR 0.874, CMD 0.125). Judge masks under the ablation you care about, at the
#   size you mean, and read areas alongside the curve (the saved `faithfulness_*.png`).
#
# This is why Edge Pruning trains and MIB judges under the same interchange ablation: a mask
# found under zero ablation answers a different question from the one patching asks.
