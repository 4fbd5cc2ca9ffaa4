"""PatchAblation (paired counterfactuals): hand-written references per family, the clean and the
counterfactual extremes, gradients through both terms, and training under it."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot
from einops import einsum

import subnet_interp as si
from subnet_interp.analysis import ablation_effect, faithfulness_curve, loss

PATCH = lambda: si.PatchAblation(lambda model, batch: model(batch[1]))  # noqa: E731


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-fast-form", "trained-two-terms"])
def test_linear_layer_matches_the_formula_and_gradients_reach_both_terms(frozen):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(5, 3)
    layer.requires_grad_(not frozen)  # frozen weights and a soft mask: (m W)(x - x') + y'
    x, x_twin = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    soft = torch.rand(3, 5, generator=gen).requires_grad_(True)
    W, b = layer.weight.detach(), layer.bias.detach()
    expected = (
        einsum(x, soft * W, "n i, o i -> n o")
        + einsum(x_twin, (1 - soft) * W, "n i, o i -> n o")
        + b
    )
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), soft)
    patch = PATCH()
    before = snapshot(layer)
    with si.masked(layer, {"weight": soft}, ablation=patch):
        patch.record((x, x_twin))
        got = layer(x)
        (grad,) = torch.autograd.grad(got.square().sum(), soft)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)
    # d/dm at m = 1 is W * (dL/dy)(x - x')^T: attribution patching per weight
    assert_bit_exact(layer, before)
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_gradient_at_all_ones_is_attribution_patching():
    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(4, 2, bias=False)
    x, x_twin = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    ones = torch.ones(2, 4, requires_grad=True)
    patch = PATCH()
    with si.masked(layer, {"weight": ones}, ablation=patch):
        patch.record((x, x_twin))
        (grad,) = torch.autograd.grad(layer(x).sum(), ones)
    W = layer.weight.detach()
    expected = W * einsum(torch.ones(3, 2), x - x_twin, "n o, n i -> o i")
    torch.testing.assert_close(grad, expected)


def test_the_twin_must_have_the_clean_shape_and_be_recorded():
    layer = torch.nn.Linear(5, 3)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    patch = PATCH()
    with torch.no_grad(), si.masked(layer, {"weight": mask}, ablation=patch):
        with pytest.raises(RuntimeError, match=r"call `ablation.record\(batch\)`"):
            layer(torch.randn(2, 5))
        patch.record((torch.randn(2, 5), torch.randn(3, 5)))
        with pytest.raises(ValueError, match=r"input of shape \(3, 5\), the clean run \(2, 5\)"):
            layer(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="needs the ablation attached"):
        patch.record((torch.randn(2, 5), torch.randn(2, 5)))
    with pytest.raises(TypeError, match="runs the model on the batch's counterfactual twin"):
        si.PatchAblation(3.5)


def test_a_key_names_the_twin_in_a_mapping_batch():
    layer = torch.nn.Linear(5, 3)
    x, twin = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    patch = si.PatchAblation("corrupted")
    with torch.no_grad(), si.masked(layer, {"weight": mask}, ablation=patch):
        patch.record({"clean": x, "corrupted": twin})
        got = layer(x)
    torch.testing.assert_close(got, layer(twin))


def test_one_patch_ablation_per_attachment():
    layer = torch.nn.Linear(5, 3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    patch = PATCH()
    with si.masked(layer, {"weight": mask}, ablation=patch):
        with pytest.raises(RuntimeError, match="already in use"):
            with si.masked(layer, {"weight": mask}, ablation=patch):
                pass
    with si.masked(layer, {"weight": mask}, ablation=patch):  # free again after the exit
        pass


# ------------------------------------------------------------------ model families
transformers = pytest.importorskip("transformers")
from _hf_models import BUILDERS, TOKENS, VOCAB, hand_zeroed, random_masks  # noqa: E402

TWIN = torch.randint(0, VOCAB, TOKENS.shape, generator=torch.Generator().manual_seed(5))


def owners(model):
    """Module path -> module of every masked weight's owner (the blocks' linear layers)."""
    root = model
    return {
        t.module: root.get_submodule(t.module)
        for t in si.targets(model, include="blocks.*").values()
    }


def linear_out(module, x, weight, bias=None):
    if isinstance(module, torch.nn.Linear):
        out = einsum(x, weight, "... i, o i -> ... o")
    else:  # transformers' Conv1D stores [in, out]
        out = einsum(x, weight, "... i, i o -> ... o")
    return out if bias is None else out + bias


def inputs_of(model, paths, tokens):
    seen = {}
    handles = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: seen.__setitem__(p, a[0].detach())
        )
        for p in paths
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return seen


def hand_patched_logits(kind, masks):
    """The patched model written out by hand: every owner computes ``(m W) x + ((1 - m) W) x'``
    from two hand-zeroed copies (kept and removed parts) and the counterfactual run's inputs."""
    clean = BUILDERS[kind]()
    paths = list(owners(clean))
    twin_inputs = inputs_of(clean, paths, TWIN)
    kept, removed = BUILDERS[kind](), BUILDERS[kind]()
    hand_zeroed(kind, kept, masks)
    hand_zeroed(kind, removed, {n: ~m for n, m in masks.items()})
    handles = []
    for path in paths:
        part = removed.get_submodule(path)
        handles.append(
            kept.get_submodule(path).register_forward_hook(
                lambda m, a, out, part=part, path=path: (
                    out + linear_out(part, twin_inputs[path], part.weight)
                )
            )
        )
    try:
        with torch.no_grad():
            return kept(TOKENS).logits
    finally:
        for h in handles:
            h.remove()


def wrapped(kind, family):
    hf = BUILDERS[kind]()
    if family == "hf":
        return hf, lambda model, tokens: model(tokens).logits
    if family == "bridge":
        sources = pytest.importorskip("transformer_lens.model_bridge.sources")
        arch = {
            "gpt2": "GPT2LMHeadModel",
            "neox": "GPTNeoXForCausalLM",
            "llama": "LlamaForCausalLM",
        }
        model = sources.build_bridge_from_module(hf, arch[kind], hf_config=hf.config).eval()
        return model, lambda model, tokens: model(tokens)
    nnsight = pytest.importorskip("nnsight")

    def run(model, tokens):
        with model.trace(tokens):
            out = model.output.save()
        return out.logits if hasattr(out, "logits") else out

    return nnsight.NNsight(hf), run


@pytest.mark.parametrize("family", ["hf", "bridge", "nnsight"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_patched_forward_equals_the_hand_written_reference(kind, family):
    masks = random_masks(BUILDERS[kind](), include="blocks.*")
    expected = hand_patched_logits(kind, masks)
    model, run = wrapped(kind, family)
    before = snapshot(model if family != "nnsight" else model._module)
    patch = si.PatchAblation(lambda m, batch: run(m, batch[1]))
    with torch.no_grad(), si.masked(model, masks, ablation=patch):
        patch.record((TOKENS, TWIN))
        got = run(model, TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_bit_exact(model if family != "nnsight" else model._module, before)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_all_ones_is_the_clean_model_and_all_zeros_the_counterfactual_at_every_owner(kind):
    model = BUILDERS[kind]()
    paths = owners(model)
    names = si.targets(model, include="blocks.*")
    with torch.no_grad():
        clean = model(TOKENS).logits
    outputs = {}
    twin_out = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, p=p: twin_out.__setitem__(p, o.detach()))
        for p, module in paths.items()
    ]
    with torch.no_grad():
        model(TWIN)
    for h in handles:
        h.remove()
    patch = si.PatchAblation(lambda m, batch: m(batch[1]))
    ones = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in names.items()}
    with torch.no_grad(), si.masked(model, ones, ablation=patch):
        patch.record((TOKENS, TWIN))
        assert torch.equal(model(TOKENS).logits, clean)
    zeros = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in names.items()}
    with torch.no_grad(), si.masked(model, zeros, ablation=patch):
        patch.record((TOKENS, TWIN))
        handles = [  # registered after the ablation's hooks: they see the patched output
            module.register_forward_hook(lambda m, a, o, p=p: outputs.__setitem__(p, o.detach()))
            for p, module in paths.items()
        ]
        model(TOKENS)
        for h in handles:
            h.remove()
    assert set(outputs) == set(paths)
    for path in paths:
        torch.testing.assert_close(outputs[path], twin_out[path], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training and judging
def test_find_trains_under_patching_and_is_judged_under_it():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = []
    for _ in range(4):
        x = torch.randn(16, 6, generator=gen)
        batches.append((x, x.flip(0), (x[:, 0] > 0).long()))
    task_loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[2])  # noqa: E731
    patch = si.PatchAblation(lambda m, b: m(b[1]))
    before = snapshot(model)
    result = si.find(
        model, "gumbel_sigmoid", task_loss, batches, steps=12, progress=False, ablation=patch
    )
    assert_bit_exact(model, before)
    assert result.subnetwork.meta["ablation"] == "patch"
    assert result.scores is not None
    report = ablation_effect(model, result.at_density(0.5), loss(task_loss), batches, controls=2,
                             ablation=patch)  # fmt: skip
    assert report.full == pytest.approx(
        sum(float(task_loss(model, b).detach()) for b in batches) / len(batches), rel=1e-5
    )
    curve = faithfulness_curve(model, result, batches, loss(task_loss), densities=(0.5, 1.0),
                               ablation=patch)  # fmt: skip
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    assert curve.ablation == "patch"


@pytest.mark.parametrize(
    "method", ["gumbel_sigmoid", "hard_concrete", "continuous_sparsification", "lottery_ticket"]
)
def test_every_learnable_method_trains_under_mean_and_patching(method):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = [(x := torch.randn(8, 6, generator=gen), x.flip(0), (x[:, 0] > 0).long())
               for _ in range(2)]  # fmt: skip
    task_loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[2])  # noqa: E731
    hparams = {"lottery_ticket": {"target_density": 0.5}}.get(method, {})
    for ablation in (
        si.PatchAblation(lambda m, b: m(b[1])),
        si.MeanAblation([b[0] for b in batches]),
    ):
        before = snapshot(model)
        result = si.find(model, si.methods.create(method, **hparams), task_loss, batches,
                         steps=6, progress=False, ablation=ablation)  # fmt: skip
        assert_bit_exact(model, before)
        assert result.subnetwork.meta["ablation"] == ablation.name


def test_find_refuses_ablations_that_do_not_apply():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    data = [torch.randn(3, 4)]
    task = lambda m, b: m(b).sum()  # noqa: E731
    with pytest.raises(ValueError, match="does not train: its mask does not depend on"):
        si.find(model, "magnitude", task, data, ablation=si.MeanAblation(data))
    with pytest.raises(ValueError, match="removes no weight while it trains"):
        si.find(model, "lt_sft", task, data, steps=2, ablation=si.MeanAblation(data))
    with pytest.raises(ValueError, match=r"si.PatchAblation\(counterfactual\)"):
        si.find(model, "gumbel_sigmoid", task, data, steps=2, ablation="patch")


# ------------------------------------------------------------------ attribution and warm starts
def two_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)) for _ in range(3)]
    return model, data


def attribution_loss(model, batch):
    return model(batch[0]).square().mean()


@pytest.mark.parametrize("accumulate", ["signed", "absolute"])
def test_attribution_under_zero_ablation_is_w_times_grad(accumulate):
    model, data = two_layer()
    method = si.methods.create("attribution", accumulate=accumulate, density=0.3)
    result = si.find(model, method, attribution_loss, data, steps=3, progress=False)
    per_batch = []
    for batch in data:
        model.zero_grad()
        attribution_loss(model, batch).backward()
        per_batch.append({n: (p * p.grad).detach() for n, p in model.named_parameters()})
    for name in ("0.weight", "2.weight"):
        terms = torch.stack([b[name] for b in per_batch])
        expected = terms.mean(0).abs() if accumulate == "signed" else terms.abs().mean(0)
        torch.testing.assert_close(result.scores[name], expected)
    assert result.subnetwork == si.Subnetwork.from_scores(result.scores, density=0.3)


def test_attribution_under_patching_is_weight_level_attribution_patching():
    model, data = two_layer()
    patch = si.PatchAblation(lambda m, b: m(b[1]))
    result = si.find(model, "attribution", attribution_loss, data, steps=3, progress=False,
                     ablation=patch)  # fmt: skip
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for clean, twin in data:
        # hand-written: dL/dm = W * (dL/dy)^T (x - x') per layer, x and x' the layer's inputs
        h = model[0](clean)
        h.retain_grad()
        a = torch.tanh(h)
        out = model[2](a)
        out.retain_grad()
        out.square().mean().backward()
        a_twin = torch.tanh(model[0](twin)).detach()
        expected["0.weight"] += model[0].weight.detach() * einsum(
            h.grad, clean - twin, "n o, n i -> o i"
        )
        expected["2.weight"] += model[2].weight.detach() * einsum(
            out.grad, a.detach() - a_twin, "n o, n i -> o i"
        )
        model.zero_grad()
    for name in ("0.weight", "2.weight"):
        torch.testing.assert_close(result.scores[name], (expected[name] / 3).abs())


def test_init_scores_start_each_gate_at_its_rank_quantile():
    model, data = two_layer()
    scores = {"0.weight": torch.rand(5, 4), "2.weight": torch.rand(2, 5)}
    method = si.methods.create("gumbel_sigmoid", lr=1e-12)
    result = si.find(model, method, attribution_loss, data, steps=1, progress=False,
                     init_scores=scores)  # fmt: skip
    # after one step of a vanishing learning rate the logits are where they started: the mask
    # is the top half of the 30 scores (0.05 + 0.9 q > 0.5 <=> q = 1 - rank / 29 > 0.5)
    assert result.subnetwork == si.Subnetwork.from_scores(scores, count=15)
    ranked = si.Subnetwork.from_scores(result.scores, count=7)
    assert ranked == si.Subnetwork.from_scores(scores, count=7)
    lowest = min(float(s.min()) for s in result.scores.values())
    assert lowest == pytest.approx(0.05, abs=1e-4)
    assert "init_scores" in result.subnetwork.meta
    with pytest.raises(ValueError, match="must score exactly the selected targets"):
        si.find(model, "gumbel_sigmoid", attribution_loss, data, steps=1, progress=False,
                init_scores={"0.weight": scores["0.weight"]})  # fmt: skip
    with pytest.raises(ValueError, match="has none"):
        si.find(model, "magnitude", attribution_loss, data, init_scores=scores)
    neuron = si.methods.create("hard_concrete", granularity="neuron", lr=1e-12)
    si.find(model, neuron, attribution_loss, data, steps=1, progress=False, init_scores=scores)


def test_patching_runs_resume_from_checkpoints_and_recompute_masks_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    batches = [(x := torch.randn(8, 6, generator=gen), x.flip(0), (x[:, 0] > 0).long())
               for _ in range(3)]  # fmt: skip
    task_loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[2])  # noqa: E731

    def go(**kw):
        return si.find(model, "hard_concrete", task_loss, batches, steps=20, progress=False,
                       ablation=si.PatchAblation(lambda m, b: m(b[1])), log_every=1, **kw)  # fmt: skip

    whole = go()
    assert go(recompute_masks=True).subnetwork == whole.subnetwork

    class Stop(Exception):
        pass

    def stop(step, record):
        if step == 10:
            raise Stop

    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        go(checkpoint=path, checkpoint_every=5, callbacks=[stop])
    resumed = go(checkpoint=path, checkpoint_every=5)
    assert resumed.subnetwork == whole.subnetwork
    assert resumed.history["loss"] == whole.history["loss"]
    with pytest.raises(ValueError, match="ablation"):  # a zero-ablation run is another run
        si.find(model, "hard_concrete", task_loss, batches, steps=20, progress=False,
                checkpoint=path)  # fmt: skip


def test_hooks_on_a_patched_layer_see_its_real_input_and_output():
    """The faster training form passes x - x' to the layer; another hook on it must not see that."""
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(5, 3).requires_grad_(False)
    x, x_twin = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    soft = torch.rand(3, 5, generator=gen).requires_grad_(True)
    W, b = layer.weight, layer.bias
    expected = x @ (soft * W).T + x_twin @ ((1 - soft) * W).T + b
    seen = {}
    patch = PATCH()
    with si.masked(layer, {"weight": soft}, ablation=patch):
        handles = [
            layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
            layer.register_forward_hook(lambda m, a, o: seen.__setitem__("args", a[0])),
        ]
        patch.record((x, x_twin))
        got = layer(x)
        for h in handles:
            h.remove()
    assert torch.equal(seen["in"], x) and torch.equal(seen["args"], x)
    torch.testing.assert_close(got, expected)


def test_more_bad_inputs_are_refused_clearly():
    model, data = two_layer()
    scores = {"0.weight": torch.rand(5, 4), "2.weight": torch.rand(2, 5)}
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"init_scores\['0.weight'\] has shape \(4, 5\), expected"):
        si.find(model, "gumbel_sigmoid", attribution_loss, data, steps=1, progress=False,
                init_scores={**scores, "0.weight": torch.rand(4, 5)})  # fmt: skip
    with pytest.raises(ValueError, match="accumulate must be 'signed'"):
        si.methods.create("attribution", accumulate="mean")
    with pytest.raises(ValueError, match="scope must be 'global' or 'per_target'"):
        si.methods.create("attribution", scope="layer")
    patch = si.PatchAblation(lambda m, b: None)  # a twin run that never calls the model
    with pytest.raises(ValueError, match="the counterfactual run never called"):
        si.find(model, "gumbel_sigmoid", attribution_loss, data, steps=1, progress=False,
                ablation=patch)  # fmt: skip
    assert_bit_exact(model, before)
