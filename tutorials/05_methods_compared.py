# %% [markdown]
# # Methods compared at matched density
#
# Which weights a behaviour "needs" depends on how you ask. We take one trained MLP and one
# behaviour (output A of the quick-start task) and compare the registered methods at the same
# density: the task loss each subnetwork gives, and how much their subnetworks overlap — with
# the hypergeometric chance test, since two masks of density d share a fraction d of each
# other's weights by chance alone.

# %%
import os

import torch

import subnet_interp as si
from subnet_interp.analysis import overlap, overlap_matrix, overlap_test
from subnet_interp.tasks import train, two_outputs

FAST = os.environ.get("SUBNET_INTERP_FAST") == "1"
TRAIN_STEPS, MASK_STEPS = (200, 100) if FAST else (2000, 1000)
torch.manual_seed(0)
# Gumbel-sigmoid masks (Csordás et al. 2021). The paper trains masks for 10-20k steps with the
# regulariser divided by the batch size; for the few hundred steps here we leave that division
# out (a push towards sparsity stronger by the batch size), and fast mode (the test suite) also
# takes bigger steps.
GUMBEL = si.methods.create("gumbel_sigmoid", per_example_penalty=False, lr=0.1 if FAST else 1e-2)


gen = torch.Generator().manual_seed(0)
batches = [two_outputs(128, gen) for _ in range(32)]
test = two_outputs(4096, torch.Generator().manual_seed(1))


def loss_a(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x)[:, 0], y[:, 0])


def fresh_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 2),
    )


model = fresh_model()
train(
    model,
    lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
    batches,
    steps=TRAIN_STEPS,
    lr=3e-3,
)


def test_loss(net, subnetwork=None):
    with torch.no_grad():
        if subnetwork is None:
            return float(loss_a(net, test))
        with si.masked(net, subnetwork):
            return float(loss_a(net, test))


print(f"trained model: loss A {test_loss(model):.4f}")

# %% [markdown]
# ## The density to match
# Gumbel-sigmoid masks pick their own density; the others are asked for it.

# %%
found = {}
found["gumbel_sigmoid"] = si.find(
    model, GUMBEL, loss_a, batches, steps=MASK_STEPS, progress=False
).subnetwork
density = found["gumbel_sigmoid"].density()
print(f"gumbel_sigmoid chose density {density:.3f}")
found["hard_concrete"] = si.find(
    model,
    si.methods.create("hard_concrete", target_density=density, lr=5e-2),
    loss_a,
    batches,
    steps=MASK_STEPS,
    progress=False,
).subnetwork
found["continuous_sparsification_lepori"] = si.find(
    model,
    si.methods.create("continuous_sparsification_lepori", l0_lambda=1e-5),
    loss_a,
    batches,
    steps=MASK_STEPS,
    progress=False,
).subnetwork
found["magnitude"] = si.find(
    model, si.methods.create("magnitude", density=density), loss_a, batches
).subnetwork
found["random"] = si.find(
    model, si.methods.create("random", density=density), loss_a, batches
).subnetwork
lottery = si.find(
    fresh_model(),
    si.methods.create("lottery_ticket", target_density=density, lr=3e-3),
    loss_a,
    batches,
    steps=TRAIN_STEPS // 2,
    progress=False,
)
found["lottery_ticket"] = lottery.subnetwork

print(f"{'method':34s} {'density':>8s} {'loss A with the mask':>21s}")
for name, sub in found.items():
    value = (
        lottery.history["final_ticket_loss"][0]
        if name == "lottery_ticket"
        else test_loss(model, sub)
    )
    note = "  (its own retrained ticket)" if name == "lottery_ticket" else ""
    print(f"{name:34s} {sub.density():8.3f} {value:21.4f}{note}")

# %% [markdown]
# ## Task loss against density (magnitude pruning sweep)

# %%
for d in (0.05, 0.1, 0.2, 0.4, 0.8):
    sub = si.find(model, si.methods.create("magnitude", density=d), loss_a, batches).subnetwork
    print(f"magnitude density {d:.2f}: loss A {test_loss(model, sub):.4f}")

# %% [markdown]
# ## Do the methods find the same weights?
# IoU between every pair, and the chance test for a few pairs.

# %%
names = list(found)
matrix = overlap_matrix([found[n] for n in names], "iou")
print("IoU (rows/cols: " + ", ".join(names) + ")")
print(matrix.numpy().round(2))
for a, b in (
    ("gumbel_sigmoid", "hard_concrete"),
    ("gumbel_sigmoid", "magnitude"),
    ("gumbel_sigmoid", "random"),
):
    test_result = overlap_test(found[a], found[b])
    print(
        f"{a} vs {b}: shared {test_result.observed} weights, chance {test_result.expected:.1f}, "
        f"enrichment {test_result.enrichment:.2f}, p = {test_result.p_value:.3g}"
    )
learned_vs_random = overlap_test(found["gumbel_sigmoid"], found["random"]).p_value
learned_vs_learned = overlap_test(found["gumbel_sigmoid"], found["hard_concrete"]).p_value
if not FAST:
    assert learned_vs_learned < 0.05 and learned_vs_random > 0.001
print(
    "per-layer sharing of gumbel_sigmoid's weights with hard_concrete's:",
    {
        n: round(s.sharing_a, 2)
        for n, s in overlap(found["gumbel_sigmoid"], found["hard_concrete"]).per_target.items()
    },
)

# %% [markdown]
# ## What we learned
# At similar densities the methods differ a lot. Continuous sparsification (Lepori et al.)
# keeps the task almost perfectly at about a quarter of the weights, and hard concrete at a
# fifth does far better than magnitude pruning at that density (magnitude needs about 0.4-0.8
# density for the same loss); Gumbel-sigmoid masks after 1000 steps are only a little better than
# magnitude at their own density. Random masks of the same size destroy the task. The learned
# masks agree with each other far beyond chance (enrichment about 2, p far below 1e-100) and
# with magnitude somewhat, while their overlap with a random mask is what chance predicts. The
# lottery ticket answers a different question — which weights suffice when retrained from
# initialisation — so its loss is that of its retrained ticket and its mask overlaps the others
# only modestly.
