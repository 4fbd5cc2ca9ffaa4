"""``torch.compile``: a compiled model has the eager model's targets, computes with its masks,
and compiles once, not once per mask (``backend="aot_eager"``: Dynamo and AOTAutograd without
inductor's C++ build, so the tests stay fast; the benchmark uses inductor)."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from conftest import TinyMLP

import subnet_interp as si

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

BACKEND = "aot_eager"
pytestmark = [
    # torch's own import of torch.utils.mkldnn while compiling (not ours to fix)
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    # Dynamo probes a soft mask's `.grad` and hides the warning from users itself (through
    # `warnings.showwarning`, which the suite's "error" filter bypasses)
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def graphs() -> int:
    """Graphs Dynamo compiled since the last reset (a recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def mlp():
    return TinyMLP(sizes=(6, 16, 16, 4)).eval()


def random_masks(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in si.targets(model).items()}


X = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
DATA = [
    (torch.randn(8, 6, generator=torch.Generator().manual_seed(s)), torch.randn(8, 4))
    for s in range(3)
]


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_compiled_model_has_the_eager_models_targets_and_fingerprint():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    assert list(si.targets(compiled, include="*")) == list(si.targets(model, include="*"))
    assert si.fingerprint(compiled) == si.fingerprint(model)
    hf = pytest.importorskip("_hf_models").gpt2()
    compiled = torch.compile(hf, backend=BACKEND)
    assert list(si.targets(compiled)) == list(si.targets(hf))
    assert si.fingerprint(compiled) == si.fingerprint(hf)


def test_masked_compiled_forward_equals_eager_masked_forward_and_restores_bit_exactly():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    before = snapshot(model)
    with torch.no_grad():
        plain = compiled(X)  # compiled unmasked first: the masked call must not reuse it
        masks = si.Subnetwork(random_masks(model, 0)).with_meta(fingerprint=si.fingerprint(model))
        with si.masked(model, masks):
            expected = model(X)
        with si.masked(compiled, masks):
            got = compiled(X)
        after = compiled(X)
    assert not torch.equal(expected, plain)
    assert torch.equal(got, expected)
    assert torch.equal(after, plain)  # no stale masked graph after exit
    assert_bit_exact(model, before)


def test_masked_compiles_once_for_many_subnetworks():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        compiled(X)
        for seed in range(5):
            masks = random_masks(model, seed)
            with si.masked(model, masks):
                expected = model(X)
            with si.masked(compiled, masks):
                assert torch.equal(compiled(X), expected)
    assert graphs() == 2, "one graph unmasked, one masked: entering si.masked must not recompile"


def test_module_compiled_in_place_computes_with_the_mask():
    model, reference = mlp(), mlp()
    model.compile(backend=BACKEND)
    masks = random_masks(reference, 3)
    with torch.no_grad(), si.masked(reference, masks):
        expected = reference(X)
    with torch.no_grad():
        for _ in range(3):
            with si.masked(model, masks):
                assert torch.equal(model(X), expected)
    assert graphs() == 1


def test_find_on_a_compiled_model_compiles_once_and_finds_the_eager_mask():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    before = snapshot(model)
    found = si.find(compiled, "gumbel_sigmoid", mse, DATA, steps=8, progress=False)
    assert graphs() == 1 and graph_breaks() == 0, "the masks must not recompile every step"
    assert_bit_exact(model, before)
    # one mask sample at a time on the compiled model: the eager sequential run's maths
    eager = si.find(mlp(), "gumbel_sigmoid", mse, DATA, steps=8, sample_batching="sequential", progress=False)  # fmt: skip
    assert found.subnetwork.meta["fingerprint"] == si.fingerprint(model)
    for name in eager.subnetwork.names:
        assert torch.equal(found.subnetwork[name], eager.subnetwork[name]), name
    assert found.history["loss"] == eager.history["loss"]


def test_find_trains_weights_on_a_copy_of_a_compiled_model():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    before = snapshot(model)
    found = si.find(compiled, "lt_sft", mse, DATA, steps=4, progress=False)
    assert set(found.subnetwork.names) == set(si.targets(model))
    assert_bit_exact(model, before)


@pytest.mark.parametrize(
    ("option", "message"),
    [({"recompute_masks": True}, "recompute_masks=True"), ({"sample_batching": "fused"}, "fused")],
)
def test_find_refuses_mask_sampling_inside_a_compiled_forward(option, message):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        si.find(torch.compile(model, backend=BACKEND), "gumbel_sigmoid", mse, DATA, steps=2, progress=False, **option)  # fmt: skip
    assert "uncompiled model" in str(error.value)
    assert_bit_exact(model, before)


def test_masked_compiled_bridge_equals_eager_masked_bridge():
    transformers = pytest.importorskip("transformers")
    sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=8)
    hf = transformers.GPT2LMHeadModel(config).eval()
    bridge = sources.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=config).eval()
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    masks = random_masks(bridge, 5)
    before = snapshot(bridge)
    with torch.no_grad():
        with si.masked(bridge, masks):
            expected = bridge(tokens)
        # Dynamo alone (backend="eager"): the bridge's hooks break its graph into many pieces,
        # and tracing them is this file's slowest test (7 s on an idle CPU)
        compiled = torch.compile(bridge, backend="eager")
        with si.masked(compiled, masks):
            got = compiled(tokens)
    assert torch.equal(got, expected)
    assert_bit_exact(bridge, before)


def test_hook_ablations_are_refused_on_a_compiled_model():
    model = mlp()
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        compiled(X)  # compiled before the hooks exist: its graph would never run them
    before = snapshot(model)
    with pytest.raises(ValueError, match="forward hooks") as error:
        with si.masked(compiled, random_masks(model, 0), ablation=si.MeanAblation([X])):
            pass
    assert "uncompiled model" in str(error.value)
    assert_bit_exact(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


class _Double(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_nested_masks_and_a_users_own_parametrization_on_a_compiled_model():
    from torch.nn.utils import parametrize

    model = mlp()
    parametrize.register_parametrization(model.layers[0], "weight", _Double())
    own_class = type(model.layers[0])
    plain_class = type(model.layers[1])
    compiled = torch.compile(model, backend=BACKEND)
    outer, inner = random_masks(model, 1), random_masks(model, 2)
    with torch.no_grad():
        plain = compiled(X)  # first compiled unmasked: the masked calls must not reuse it
        with si.masked(model, outer), si.masked(model, inner):
            expected = model(X)
        for _ in range(2):
            with si.masked(compiled, outer):
                with si.masked(compiled, inner):
                    assert torch.equal(compiled(X), expected)
                assert not torch.equal(compiled(X), expected)
        assert torch.equal(compiled(X), plain)
    assert type(model.layers[0]) is own_class  # someone else's parametrized class is left alone
    assert type(model.layers[1]) is plain_class
    assert [type(p) for p in model.layers[0].parametrizations["weight"]] == [_Double]
