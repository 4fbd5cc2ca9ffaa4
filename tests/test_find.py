"""si.find: inputs, errors, callbacks, data handling."""

from __future__ import annotations

import copy

import pytest
import torch
from _util import assert_bit_exact, snapshot
from torch import nn

import subnet_interp as si
from subnet_interp._train import split_batch


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture
def setup(mlp):
    x = torch.randn(16, 6)
    return mlp, [(x, torch.zeros(16, 4))]


def test_callbacks_receive_floats_every_log_every(setup):
    model, data = setup
    seen = []
    si.find(
        model,
        "gumbel_sigmoid",
        mse,
        data,
        steps=25,
        log_every=10,
        progress=False,
        callbacks=[lambda s, r: seen.append((s, r))],
    )
    assert [s for s, _ in seen] == [0, 10, 20, 24]
    assert all(isinstance(v, float) for _, r in seen for v in r.values())
    assert {"loss", "penalty", "density", "temperature"} <= set(seen[0][1])


def test_targets_patterns_restrict_the_mask(setup):
    model, data = setup
    result = si.find(
        model, "gumbel_sigmoid", mse, data, targets="layers.1.*", steps=3, progress=False
    )
    assert result.subnetwork.names == ("layers.1.weight",)
    assert result.subnetwork.meta["targets"] == ["layers.1.weight"]


def test_unknown_method_lists_registered(setup):
    model, data = setup
    with pytest.raises(
        KeyError, match=r"Unknown method 'gumbel'.*Registered: \[.*'gumbel_sigmoid'"
    ):
        si.find(model, "gumbel", mse, data, steps=1)


@pytest.mark.parametrize("steps", [0, -1])
def test_bad_steps(setup, steps):
    model, data = setup
    with pytest.raises(ValueError, match="`steps` must be a positive int"):
        si.find(model, "gumbel_sigmoid", mse, data, steps=steps)


def test_non_scalar_loss_is_explained_and_model_restored(setup):
    model, data = setup
    before = snapshot(model)
    with pytest.raises(
        TypeError, match=r"must return a scalar tensor.*Tensor\(16, 4\).*\.mean\(\)"
    ):
        si.find(model, "gumbel_sigmoid", lambda m, b: m(b[0]) - b[1], data, steps=2, progress=False)
    assert_bit_exact(model, before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_loss_without_graph_is_explained(setup):
    model, data = setup

    def detached(m, b):
        with torch.no_grad():
            return mse(m, b)

    with pytest.raises(ValueError, match="does not depend on the masks"):
        si.find(model, "gumbel_sigmoid", detached, data, steps=2, progress=False)


def test_empty_data_is_explained(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="yielded no batches"):
        si.find(model, "gumbel_sigmoid", mse, [], steps=2, progress=False)


def test_one_shot_iterator_that_runs_out_is_explained(setup):
    model, data = setup
    with pytest.raises(ValueError, match="one-shot iterator"):
        si.find(model, "gumbel_sigmoid", mse, iter(data), steps=3, progress=False)


def test_data_is_cycled(setup):
    model, data = setup
    calls = []

    def counting(m, b):
        calls.append(1)
        return mse(m, b)

    si.find(model, "continuous_sparsification_lepori", counting, data, steps=5, progress=False)
    assert len(calls) == 5


def test_gumbel_splits_the_batch_among_mask_samples(setup):
    model, data = setup
    sizes = []

    def recording(m, b):
        sizes.append(b[0].shape[0])
        return mse(m, b)

    si.find(model, "gumbel_sigmoid", recording, data, steps=1, progress=False)
    assert sizes == [16]  # the four samples side by side, each on its quarter (test_fused_samples)
    sizes.clear()
    si.find(
        model, "gumbel_sigmoid", recording, data, steps=1, progress=False,
        sample_batching="sequential",
    )  # fmt: skip
    assert sizes == [4, 4, 4, 4]


def test_split_batch_handles_nested_structures():
    batch = {"x": torch.arange(8), "pair": (torch.zeros(8, 2), "label")}
    parts = split_batch(batch, 4)
    assert len(parts) == 4
    assert parts[1]["x"].tolist() == [2, 3]
    assert parts[3]["pair"][0].shape == (2, 2) and parts[3]["pair"][1] == "label"


def test_split_batch_gives_tensors_of_another_length_to_every_part():
    """Class weights (or any tensor not led by the batch dimension) are not examples."""
    weights = torch.tensor([1.0, 2.0, 3.0])
    parts = split_batch((torch.zeros(8, 2), weights, {"y": torch.arange(8)}), 4)
    assert [p[0].shape[0] for p in parts] == [2, 2, 2, 2]
    assert all(p[1] is weights for p in parts)
    assert parts[2][2]["y"].tolist() == [4, 5]


def test_baselines_take_no_loss_or_data_and_the_others_say_they_need_them(setup):
    model, data = setup
    assert si.find(model, "magnitude", None, None).subnetwork.kept() > 0
    assert si.find(model, "random", None, None).subnetwork.kept() > 0
    with pytest.raises(TypeError, match="'gumbel_sigmoid' learns from the task loss, so `loss_fn`"):
        si.find(model, "gumbel_sigmoid", None, data, steps=1)
    with pytest.raises(TypeError, match="so `data` is required"):
        si.find(model, "attribution", mse, None, steps=1)


def test_split_batch_too_small_is_explained():
    with pytest.raises(ValueError, match="at least 4 examples"):
        split_batch(torch.zeros(3, 2), 4)


def test_empty_target_selection_is_rejected(setup):
    model, data = setup
    with pytest.raises(ValueError, match="selection is empty"):
        si.find(model, "gumbel_sigmoid", mse, data, targets=[], steps=1)


def test_weight_training_method_leaves_model_alone_unless_inplace(setup):
    model, data = setup
    before = snapshot(model)
    method = si.methods.create("continuous_sparsification", lr=1e-2, weight_lr=1e-2)
    result = si.find(model, method, mse, data, steps=5, progress=False)
    assert_bit_exact(model, before)
    assert result.weights is not None
    si.find(model, method, mse, data, steps=5, progress=False, inplace=True)
    assert not torch.equal(model.layers[0].weight, before["layers.0.weight"])


def test_batch_size_reads_the_first_tensor():
    from subnet_interp._train import batch_size

    assert batch_size((torch.zeros(5, 2), torch.zeros(5))) == 5
    assert batch_size({"ids": torch.zeros(3, 7)}) == 3
    assert batch_size(["text", torch.zeros(2)]) == 2
    assert batch_size("no tensors") == 1


def test_activation_caches_the_run_leaves_are_detached():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.mine = torch.ones(2, requires_grad=True) * 2  # the user's own, before the run

        def forward(self, x):
            out = self.layer(x)
            self.last = out  # a cache, as TransformerBridge's attention keeps one
            return out

    model = Caching()
    data = [(torch.randn(8, 4), torch.randn(8, 4))]
    si.find(model, "continuous_sparsification_lepori", mse, data, steps=2, progress=False)
    assert model.last.grad_fn is None
    assert model.mine.grad_fn is not None  # not the run's: left alone
    del model.mine  # (it refuses deepcopy itself, as before the run)
    copy.deepcopy(model)


def test_a_trained_copy_leaves_no_graph_on_the_original():
    class Hooked(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)
            owner = self

            def remember(module, args, out):  # a closure: deepcopy keeps pointing at `owner`
                owner.last = out

            self.layer.register_forward_hook(remember)

        def forward(self, x):
            return self.layer(x)

    model = Hooked()
    data = [(torch.randn(8, 4), torch.randn(8, 4))]
    si.find(model, "continuous_sparsification", mse, data, steps=2, progress=False)
    assert model.last.grad_fn is None  # written by the copy's forward, detached afterwards
    copy.deepcopy(model)
