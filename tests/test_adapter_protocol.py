"""What every adapter answers beyond targets: ``blocks(model)`` (the block modules the forward pass
runs, in order), ``block_output``, ``reinitialize(root)`` (the family's own init, deterministic
under a seed), ``inner(model)`` and ``linear_site``; and the errors when a family's blocks are
unknown."""

from __future__ import annotations

import ast
import copy
import pathlib

import pytest
import torch
from _util import snapshot

import subnet_interp as si
from subnet_interp import adapters

transformers = pytest.importorskip("transformers")

from _hf_models import BUILDERS, LAYERS, PIXELS, TOKENS, encoder  # noqa: E402


def vit_blocks(model):
    base = model.vit  # transformers 5 keeps the blocks in `layers`, earlier releases in encoder
    return base.layers if hasattr(base, "layers") else base.encoder.layer


# per Hugging Face family: (build, inputs, the model's own list of blocks)
HF = {
    "gpt2": (BUILDERS["gpt2"], TOKENS, lambda m: m.transformer.h),
    "neox": (BUILDERS["neox"], TOKENS, lambda m: m.gpt_neox.layers),
    "llama": (BUILDERS["llama"], TOKENS, lambda m: m.model.layers),
    "bert": (lambda: encoder("bert_mlm"), TOKENS % 38 + 2, lambda m: m.bert.encoder.layer),
    "vit": (lambda: encoder("vit_cls"), PIXELS, vit_blocks),
}


def run_order(model, blocks, inputs):
    """The indices into ``blocks`` in the order the forward pass runs them."""
    order = []
    handles = [
        block.register_forward_hook(lambda *_, i=i: order.append(i))
        for i, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def weights(model):
    return {k: v for k, v in snapshot(model).items() if v.is_floating_point()}


def reinit(model, seed):
    """A copy of ``model`` re-initialised by its adapter under ``torch.manual_seed(seed)``."""
    fresh = copy.deepcopy(model)
    adapter = adapters.resolve(fresh)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        adapter.reinitialize(adapter.root(fresh))
    return fresh


def assert_deterministic_and_new(model):
    first, same, other = reinit(model, 1), reinit(model, 1), reinit(model, 2)
    original, first_w = weights(model), weights(first)
    assert first_w.keys() == original.keys()
    for key, value in first_w.items():
        torch.testing.assert_close(value, weights(same)[key], rtol=0, atol=0, msg=key)
    changed = [k for k in original if not torch.equal(first_w[k], original[k])]
    differs = [k for k in original if not torch.equal(first_w[k], weights(other)[k])]
    assert changed and differs
    return first


# ------------------------------------------------------------------ blocks
@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "bert", "vit"])
def test_hf_blocks_are_the_modules_the_forward_runs(kind):
    build, inputs, own_blocks = HF[kind]
    model = build()
    own = own_blocks(model)
    adapter = adapters.resolve(model)
    assert adapter.family == "huggingface"
    blocks = adapter.blocks(model)
    assert len(blocks) == LAYERS
    assert all(a is b for a, b in zip(blocks, own, strict=True))
    assert run_order(model, blocks, inputs) == list(range(LAYERS))
    assert adapter.block_output(model, blocks[0]) is blocks[0]
    assert adapter.inner(model) is model


def test_bridge_and_nnsight_blocks():
    tl_sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    nnsight = pytest.importorskip("nnsight")
    hf = BUILDERS["gpt2"]()
    bridge = tl_sources.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    adapter = adapters.resolve(bridge.eval())
    blocks = adapter.blocks(bridge)
    assert len(blocks) == LAYERS and all(a is b for a, b in zip(blocks, bridge.blocks, strict=True))
    assert run_order(bridge, blocks, TOKENS) == list(range(LAYERS))
    assert adapter.block_output(bridge, blocks[1]) is blocks[1].hook_out
    assert adapter.inner(bridge) is hf  # the transformers model it wraps

    inner = BUILDERS["gpt2"]()
    wrapped = nnsight.NNsight(inner)
    adapter = adapters.resolve(wrapped)
    assert adapter.family == "nnsight" and adapter.inner(wrapped) is inner
    blocks = adapter.blocks(wrapped)
    assert all(a is b for a, b in zip(blocks, inner.transformer.h, strict=True))
    assert run_order(inner, blocks, TOKENS) == list(range(LAYERS))


def test_plain_blocks_found_at_a_usual_place_or_a_clear_error(mlp):
    adapter = adapters.resolve(mlp)
    assert adapter.family == "torch"
    assert all(a is b for a, b in zip(adapter.blocks(mlp), mlp.layers, strict=True))
    sequential = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with pytest.raises(TypeError) as error:
        adapter.blocks(sequential)
    message = str(error.value)
    assert "Sequential" in message  # what was given
    assert "'h'" in message and "'encoder.layer'" in message  # where it looked
    assert "Expected a Hugging Face" in message  # what is expected
    assert "Pass the path of the module" in message and "register_adapter" in message  # fixes
    assert adapter.inner(sequential) is sequential


def test_an_adapter_without_blocks_says_so():
    class Custom(adapters.Adapter):
        family = "custom"

        def matches(self, model):
            return False

        def all_targets(self, model):
            return {}

    with pytest.raises(TypeError, match=r"'custom' adapter .* implements `blocks\(model\)`"):
        Custom().blocks(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ linear_site
class Heads(torch.nn.Module):
    """An einsum owner: ``y = x W + b`` per head, ``x W`` made at ``hook``."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(2, 3, 4, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(2, 4, generator=gen))
        self.hook = torch.nn.Identity()

    def forward(self, x):
        return self.hook(torch.einsum("bd,hde->bhe", x, self.W)) + self.b


class HeadsAdapter(adapters.Adapter):
    family = "test.heads"

    def matches(self, model):
        return isinstance(model, Heads)

    def all_targets(self, model):
        return {"W": si.Target("W", "", "W", (2, 3, 4), ("head", "d_model", "d_head"))}

    def linear_site(self, root, location):
        return adapters.LinearSite("", "input", "hook", "...d,hde->...he")


@pytest.fixture
def heads_adapter():
    adapter = adapters.register_adapter(HeadsAdapter())
    try:
        yield adapter
    finally:
        adapters._ADAPTERS.remove(adapter)


def test_input_based_ablations_use_the_adapters_linear_site(heads_adapter):
    gen = torch.Generator().manual_seed(1)
    model, x, twin = Heads(), torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    mask = torch.rand(2, 3, 4, generator=gen)
    W, b = model.W.detach(), model.b.detach()
    part = lambda inputs, m: torch.einsum("...d,hde->...he", inputs, m * W)  # noqa: E731
    patch = si.PatchAblation(lambda m, batch: m(batch[1]))
    with torch.no_grad(), si.masked(model, {"W": mask}, ablation=patch):
        patch.record((x, twin))
        torch.testing.assert_close(model(x), part(x, mask) + part(twin, 1 - mask) + b)
    with torch.no_grad(), si.masked(model, {"W": mask}, ablation=si.MeanAblation([twin])):
        torch.testing.assert_close(model(x), part(x, mask) + part(twin.mean(0), 1 - mask) + b)
    assert not model._forward_hooks and not model.hook._forward_hooks
    assert adapters.resolve(torch.nn.Linear(2, 2)).linear_site(model, ("", "W")) is None
    nnsight = pytest.importorskip("nnsight")  # the wrapper asks the wrapped module's adapter
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), si.masked(wrapped, {"W": mask}, ablation=si.MeanAblation([twin])):
        torch.testing.assert_close(model(x), part(x, mask) + part(twin.mean(0), 1 - mask) + b)


# ------------------------------------------------------------------ reinitialize
@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "bert", "vit"])
def test_hf_reinitialize_is_the_transformers_init_and_deterministic(kind):
    model = HF[kind][0]()
    fresh = assert_deterministic_and_new(model)
    std = model.config.initializer_range
    norms = [m for m in fresh.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    linears = [m for m in fresh.modules() if isinstance(m, torch.nn.Linear)]
    weight = torch.cat([m.weight.flatten() for m in linears])
    assert weight.std().item() == pytest.approx(std, rel=0.3)
    if kind == "gpt2":  # the unembedding stays tied to the embedding
        assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_bridge_and_nnsight_reinitialize_the_wrapped_transformers_model():
    tl_sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    nnsight = pytest.importorskip("nnsight")
    hf = BUILDERS["gpt2"]()
    bridge = tl_sources.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    fresh = assert_deterministic_and_new(bridge.eval())
    wrapped = adapters.resolve(fresh).inner(fresh)  # the bridge's transformers model
    assert wrapped is not fresh and si.fingerprint(fresh) != si.fingerprint(bridge)
    embedding = wrapped.transformer.wte.weight
    assert not torch.equal(embedding, hf.transformer.wte.weight)
    assert embedding.std().item() == pytest.approx(hf.config.initializer_range, rel=0.3)

    model = nnsight.NNsight(BUILDERS["gpt2"]())
    fresh = assert_deterministic_and_new(model)
    expected = reinit(BUILDERS["gpt2"](), 1)  # the same draws as on the bare model
    got = weights(adapters.resolve(fresh).inner(fresh))
    assert got.keys() == weights(expected).keys()
    for key, value in weights(expected).items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_plain_reinitialize_resets_parameters_and_errors_without_any(mlp):
    fresh = assert_deterministic_and_new(mlp)
    expected = copy.deepcopy(mlp)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        for layer in expected.layers:
            layer.reset_parameters()
    for key, value in weights(expected).items():
        torch.testing.assert_close(weights(fresh)[key], value, rtol=0, atol=0, msg=key)

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

    with pytest.raises(TypeError, match="no init_weights\\(\\) and no sub-module with reset"):
        adapters.resolve(Frozen()).reinitialize(Frozen())


# ------------------------------------------------------------------ module structure
def test_hf_adapters_share_builders_without_importing_each_other():
    folder = pathlib.Path(adapters.__file__).parent
    for name, other in (("hf.py", ".hf_encoders"), ("hf_encoders.py", ".hf")):
        tree = ast.parse((folder / name).read_text())
        body_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        nested = [
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in body_imports
        ]
        assert not nested, f"{name} imports inside a function or class"
        first_code = next(i for i, n in enumerate(tree.body) if not isinstance(n, ast.Expr))
        imports_at_top = tree.body[first_code : first_code + len(body_imports)]
        assert all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in imports_at_top), name
        if name == "hf_encoders.py":
            assert all(f".{n.module}" != other for n in body_imports if n.level == 1)
