# %% [markdown]
# # Quick start: find the weights a behaviour needs
#
# We train a tiny two-output MLP, then ask which of its weights output A needs, with the
# differentiable weight masks of Csordás et al. (2021). We check the answer the usual way:
# keep only the subnetwork, remove it, and compare with density-matched random masks.
#
# Run it as a script (`python tutorials/01_quickstart.py`) or open it as a notebook
# (jupytext / VS Code understand the `# %%` cells). `SUBNET_INTERP_FAST=1` shrinks it for
# the test suite.

# %%
import os
import tempfile

import torch

import subnet_interp as si
from subnet_interp.tasks import two_outputs

FAST = os.environ.get("SUBNET_INTERP_FAST") == "1"
TRAIN_STEPS, MASK_STEPS, CONTROLS = (150, 150, 5) if FAST else (1500, 1500, 20)
torch.manual_seed(0)

# %% [markdown]
# ## A tiny model with two behaviours
# Output A depends on inputs 0-3, output B on inputs 4-7.


# %%
model = torch.nn.Sequential(
    torch.nn.Linear(8, 64),
    torch.nn.ReLU(),
    torch.nn.Linear(64, 64),
    torch.nn.ReLU(),
    torch.nn.Linear(64, 2),
)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(TRAIN_STEPS):
    x, y = two_outputs(128)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

test_x, test_y = two_outputs(2048)


def loss_a(net, batch=(test_x, test_y)) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(net(x)[:, 0], y[:, 0])


def loss_b(net, batch=(test_x, test_y)) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(net(x)[:, 1], y[:, 1])


with torch.no_grad():
    print(f"trained model: loss A = {loss_a(model):.4f}, loss B = {loss_b(model):.4f}")

# %% [markdown]
# ## Find the subnetwork for output A
# `si.targets` lists the maskable weights (weight matrices; no biases or embeddings).
# `si.find` trains one mask logit per weight while the weights stay frozen.

# %%
print(list(si.targets(model)))
train_batches = [two_outputs(128) for _ in range(16)]
# Csordás et al. train masks for 10-20k steps with the regulariser divided by the batch size;
# for this short run we leave the division out (a stronger push towards sparsity).
method = si.methods.create("gumbel_sigmoid", per_example_penalty=False)
result = si.find(model, method, loss_a, train_batches, steps=MASK_STEPS, progress=not FAST)
subnetwork = result.subnetwork
print(subnetwork)

# %% [markdown]
# ## Test it: keep it, remove it, compare with chance
# Inside `si.masked` the model computes with the subnetwork only; on exit every weight is
# restored bit-exactly.

# %%
with torch.no_grad(), si.masked(model, subnetwork):
    kept_a, kept_b = float(loss_a(model)), float(loss_b(model))
with torch.no_grad(), si.masked(model, ~subnetwork):
    removed_a = float(loss_a(model))
controls = []
for seed in range(CONTROLS):
    control = si.random_like(subnetwork, torch.Generator().manual_seed(seed))
    with torch.no_grad(), si.masked(model, control):
        controls.append(float(loss_a(model)))
controls_t = torch.tensor(controls)
print(f"loss A, subnetwork only:       {kept_a:.4f}")
print(f"loss A, subnetwork removed:    {removed_a:.4f}")
print(f"loss A, random masks (n={CONTROLS}):  {controls_t.mean():.4f} ± {controls_t.std():.4f}")
print(f"loss B, subnetwork only:       {kept_b:.4f}  (the subnetwork is specific to A)")
print(f"fraction of random controls at least as good: {(controls_t <= kept_a).float().mean():.2f}")

# %% [markdown]
# ## Save it
# Safetensors plus JSON metadata (method, hyper-parameters, model fingerprint); no pickle.

# %%
with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "output_a.safetensors")
    subnetwork.save(path)
    loaded = si.Subnetwork.load(path)
assert loaded == subnetwork
print("saved and loaded:", loaded.meta["method"], loaded.meta["steps"], loaded.meta["fingerprint"])
