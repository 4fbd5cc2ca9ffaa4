import subprocess
import sys

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp.tasks import planted_mlp


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.conv = torch.nn.Conv1d(4, 3, 3)
        self.conv2d = torch.nn.Conv2d(1, 2, (2, 2))
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)


def test_default_targets_skip_embeddings_biases_norms():
    names = list(si.targets(ConvNet()))
    assert names == ["conv.weight", "conv2d.weight", "head.weight"]


def test_targets_axes_and_shapes():
    found = si.targets(ConvNet(), include="*")
    assert found["conv.weight"].axes == ("out_channels", "in_channels", "kernel")
    assert found["conv2d.weight"].shape == (2, 1, 2, 2)
    assert found["embed.weight"].axes == ("vocab", "d")
    assert found["head.weight"].axes == ("out", "in")


def test_glob_include_and_exclude():
    model = ConvNet()
    assert list(si.targets(model, include="conv*")) == ["conv.weight", "conv2d.weight"]
    assert list(si.targets(model, include="*", exclude="embed.*")) == [
        "conv.weight",
        "conv2d.weight",
        "head.weight",
    ]
    assert list(si.targets(model, include=["head.*", "embed.*"])) == ["embed.weight", "head.weight"]


def test_pattern_matching_nothing_lists_available():
    with pytest.raises(
        KeyError, match=r"'lin\*' matches no maskable weight.*Available: embed.weight, conv.weight"
    ):
        si.targets(ConvNet(), include="lin*")


def test_canonical_name_on_plain_module_explains():
    with pytest.raises(KeyError, match="plain nn.Module"):
        si.targets(ConvNet(), include="blocks.*.attn.W_Q")


def test_masked_forward_equals_hand_computed(mlp):
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in si.targets(mlp).items()}
    x = torch.randn(7, 6, generator=gen)
    w0, b0 = mlp.layers[0].weight.detach().clone(), mlp.layers[0].bias.detach()
    w1, b1 = mlp.layers[1].weight.detach().clone(), mlp.layers[1].bias.detach()
    expected = (
        torch.relu(x @ (w0 * masks["layers.0.weight"]).T + b0) @ (w1 * masks["layers.1.weight"]).T
        + b1
    )
    with si.masked(mlp, si.Subnetwork(masks)):
        got = mlp(x)
    torch.testing.assert_close(got, expected)


def test_soft_masks_pass_gradients(mlp):
    soft = torch.full((8, 6), 0.5, requires_grad=True)
    with si.masked(mlp, {"layers.0.weight": soft}):
        mlp(torch.randn(3, 6)).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_exact_restore_on_normal_exit(mlp):
    before = snapshot(mlp)
    params_before = [id(p) for p in mlp.parameters()]
    cls_before = type(mlp.layers[0])
    sub = si.Subnetwork(
        {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in si.targets(mlp).items()}
    )
    with si.masked(mlp, sub):
        assert torch.equal(mlp.layers[0].weight, torch.zeros(8, 6))
    assert_bit_exact(mlp, before)
    assert [id(p) for p in mlp.parameters()] == params_before
    assert type(mlp.layers[0]) is cls_before


def test_exact_restore_on_exception(mlp):
    before = snapshot(mlp)
    sub = si.Subnetwork({"layers.0.weight": torch.zeros(8, 6, dtype=torch.bool)})
    with pytest.raises(RuntimeError, match="boom"), si.masked(mlp, sub):
        raise RuntimeError("boom")
    assert_bit_exact(mlp, before)


def test_nested_masked_composes_as_intersection(mlp):
    gen = torch.Generator().manual_seed(2)
    a = si.Subnetwork({"layers.0.weight": torch.rand(8, 6, generator=gen) < 0.5})
    b = si.Subnetwork({"layers.0.weight": torch.rand(8, 6, generator=gen) < 0.5})
    x = torch.randn(4, 6)
    with si.masked(mlp, a & b):
        expected = mlp(x)
    before = snapshot(mlp)
    with si.masked(mlp, a):
        with si.masked(mlp, b):
            got = mlp(x)
        with si.masked(mlp, a):  # inner exit leaves the outer mask in place
            pass
        torch.testing.assert_close(
            mlp.layers[0].weight,
            mlp.layers[0].parametrizations.weight.original * a["layers.0.weight"],
        )
    torch.testing.assert_close(got, expected)
    assert_bit_exact(mlp, before)


def test_unknown_target_is_rejected_before_touching_model(mlp):
    before = snapshot(mlp)
    bad = {
        "layers.0.weight": torch.ones(8, 6, dtype=torch.bool),
        "layers.9.weight": torch.ones(2, 2, dtype=torch.bool),
    }
    with pytest.raises(
        KeyError, match=r"'layers.9.weight' is not a maskable weight.*Available: layers.0.weight"
    ):
        with si.masked(mlp, bad):
            pass
    assert_bit_exact(mlp, before)
    assert not hasattr(mlp.layers[0], "parametrizations")


def test_wrong_shape_names_target_and_shapes(mlp):
    with pytest.raises(
        ValueError, match=r"'layers.0.weight' has shape \(6, 8\), expected \(8, 6\)"
    ):
        with si.masked(mlp, {"layers.0.weight": torch.ones(6, 8, dtype=torch.bool)}):
            pass


def test_wrong_dtype_is_rejected(mlp):
    with pytest.raises(TypeError, match=r"dtype torch.int64; expected torch.bool"):
        with si.masked(mlp, {"layers.0.weight": torch.ones(8, 6, dtype=torch.long)}):
            pass


def test_wrong_device_is_rejected(mlp):
    mask = torch.ones(8, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"is on meta but the weight is on cpu.*\.to\('cpu'\)"):
        with si.masked(mlp, {"layers.0.weight": mask}):
            pass


def test_unknown_ablation_lists_known(mlp):
    with pytest.raises(ValueError, match=r"Unknown ablation 'bogus'.*\['zero'\]"):
        with si.masked(
            mlp, {"layers.0.weight": torch.ones(8, 6, dtype=torch.bool)}, ablation="bogus"
        ):
            pass
    assert not hasattr(mlp.layers[0], "parametrizations")


def test_fingerprint_mismatch_is_an_error_unless_not_strict(mlp):
    from conftest import TinyMLP

    sub = si.Subnetwork(
        {"layers.0.weight": torch.ones(8, 6, dtype=torch.bool)},
        {"fingerprint": si.fingerprint(TinyMLP(seed=5))},
    )
    with pytest.raises(ValueError, match="fingerprint .* differ.*strict=False"):
        with si.masked(mlp, sub):
            pass
    with si.masked(mlp, sub, strict=False):
        pass


def test_fingerprint_is_stable_and_sensitive(mlp):
    from conftest import TinyMLP

    assert si.fingerprint(mlp) == si.fingerprint(TinyMLP())
    assert si.fingerprint(mlp) != si.fingerprint(TinyMLP(seed=1))
    other = TinyMLP()
    with torch.no_grad():
        other.layers[1].weight.zero_()
    assert si.fingerprint(other) != si.fingerprint(mlp)


def test_tied_weights_are_masked_per_use():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    assert list(si.targets(model)) == ["a.weight", "b.weight"]
    before = snapshot(model)
    x = torch.randn(2, 3)
    with si.masked(model, {"a.weight": torch.zeros(3, 3, dtype=torch.bool)}):
        assert torch.equal(model(x), torch.zeros(2, 3))
        assert torch.equal(model.b.weight, model.a.parametrizations.weight.original)
    assert_bit_exact(model, before)
    assert model.a.weight is model.b.weight


def test_import_does_not_load_optional_backends():
    code = "import sys, subnet_interp; bad = [m for m in ('transformer_lens', 'nnsight', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_graphs_built_before_a_mask_still_run_backward():
    """Attaching and removing a mask changes no weight's data, so a graph built on the
    unmasked model before si.masked (the full model's logits of a KL loss) runs backward inside
    and after the block."""
    task = planted_mlp()
    x = task.batches(16)[0][0]
    sub = si.Subnetwork(
        {
            n: torch.rand(t.shape, generator=torch.Generator().manual_seed(0)) < 0.5
            for n, t in si.targets(task.model).items()
        }  # fmt: skip
    )
    full = task.model(x)
    with si.masked(task.model, sub):
        masked = task.model(x)
        (full - masked).square().sum().backward(retain_graph=True)
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters()}
    task.model.zero_grad()
    full.square().sum().backward()  # after the block too
    assert all(grads[n].abs().sum() > 0 for n in sub.names)  # the masked weights' gradients
    assert all(p.grad.abs().sum() > 0 for p in task.model.parameters())
