"""Legacy HookedTransformer (transformer-lens < 4), run by .ci/run in a second environment."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

pytest.importorskip("transformers")
try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
except ImportError:  # transformer-lens >= 4 removed HookedTransformer
    pytest.skip("needs transformer-lens < 4 (HookedTransformer)", allow_module_level=True)

from _hf_models import D_HEAD, HEADS, LAYERS, TOKENS, VOCAB, D, gpt2, hand_zeroed, random_masks  # noqa: E402


def hooked_from(hf) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=LAYERS,
        d_model=D,
        n_heads=HEADS,
        d_head=D_HEAD,
        d_mlp=4 * D,
        d_vocab=VOCAB,
        n_ctx=16,
        act_fn="gelu_new",
        normalization_type="LN",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return model.eval()


def test_canonical_targets_are_the_hooked_parameters():
    model = hooked_from(gpt2())
    found = si.targets(model, include="*")
    assert found["blocks.0.attn.W_Q"].shape == (HEADS, D, D_HEAD)
    assert found["blocks.1.attn.W_O"].shape == (HEADS, D_HEAD, D)
    assert found["blocks.0.mlp.W_in"].shape == (D, 4 * D)
    assert found["unembed.W_U"].shape == (D, VOCAB)
    assert list(si.targets(model)) == list(si.targets(gpt2()))
    assert si.fingerprint(model) == si.fingerprint(gpt2())


def test_same_logits_as_hf_and_hand_zeroed_reference():
    masks = si.Subnetwork(random_masks(gpt2()))
    model = hooked_from(gpt2())
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS)
        _, cache = model.run_with_cache(TOKENS)
    assert_bit_exact(model, before)
    reference = gpt2()
    hand_zeroed("gpt2", reference, masks.masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
        _, expected_cache = hooked_from(reference).run_with_cache(TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache["blocks.1.attn.hook_z"], expected_cache["blocks.1.attn.hook_z"], atol=1e-5, rtol=1e-5
    )


def test_whole_head_mask_equals_hook_z_ablation():
    model = hooked_from(gpt2())
    layer, head = 1, 2
    masks = {}
    for letter in "QKVO":
        mask = torch.ones(
            si.targets(model)[f"blocks.{layer}.attn.W_{letter}"].shape, dtype=torch.bool
        )
        mask[head] = False
        masks[f"blocks.{layer}.attn.W_{letter}"] = mask
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS)

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        expected = model.run_with_hooks(
            TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)]
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_find_trains_on_hooked_transformer():
    model = hooked_from(gpt2())
    before = snapshot(model)

    def next_token_loss(m, batch):
        return m(batch, return_type="loss")

    result = si.find(
        model,
        "gumbel_sigmoid",
        next_token_loss,
        [torch.cat([TOKENS, TOKENS])],
        steps=3,
        progress=False,
    )
    assert result.subnetwork.meta["family"] == "transformer_lens.HookedTransformer"
    assert_bit_exact(model, before)


def test_blocks_block_output_and_reinitialize_are_the_hooked_transformers_own():
    import copy

    from subnet_interp import adapters
    from subnet_interp.probing import read_hidden

    model = hooked_from(gpt2())
    adapter = adapters.resolve(model)
    blocks = adapter.blocks(model)
    assert len(blocks) == LAYERS and all(a is b for a, b in zip(blocks, model.blocks, strict=True))
    assert adapter.block_output(model, blocks[0]) is model.blocks[0].hook_resid_post
    assert adapter.inner(model) is model
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
        torch.testing.assert_close(read_hidden(model, 0, TOKENS), cache["blocks.0.hook_resid_post"])

    def reinitialized(seed):
        fresh = copy.deepcopy(model)
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            adapter.reinitialize(fresh)
        return snapshot(fresh)

    first, same, other = reinitialized(1), reinitialized(1), reinitialized(2)
    assert all(torch.equal(first[k], same[k]) for k in first)  # deterministic under a seed
    assert not torch.equal(first["blocks.0.attn.W_Q"], model.blocks[0].attn.W_Q)
    assert not torch.equal(first["blocks.0.attn.W_Q"], other["blocks.0.attn.W_Q"])


def test_hooked_transformer_passes_the_conformance_kit():
    report = si.testing.check_adapter(hooked_from(gpt2()), TOKENS)
    assert report.targets == tuple(si.targets(gpt2())) and report.passed[-1] == "find"


# ------------------------------------------------------------------ input-based ablations
TWIN = torch.randint(0, VOCAB, TOKENS.shape, generator=torch.Generator().manual_seed(5))


def test_patch_and_mean_ablation_give_the_hf_gpt2s_logits():
    """The HF path is checked against a hand-written reference in test_patching.py."""
    masks = random_masks(gpt2(), include="blocks.*")
    hf, hooked = gpt2(), hooked_from(gpt2())
    before = snapshot(hooked)
    for make in (
        lambda run: si.PatchAblation(lambda m, batch: run(m, batch[1])),
        lambda run: si.MeanAblation([TWIN, TOKENS[:1]], forward=run),
    ):
        got, expected = {}, {}
        for model, run, out in (
            (hooked, lambda m, x: m(x), got),
            (hf, lambda m, x: m(x).logits, expected),
        ):
            ablation = make(run)
            with torch.no_grad(), si.masked(model, masks, ablation=ablation):
                ablation.on_batch((TOKENS, TWIN))
                out["logits"] = run(model, TOKENS)
        torch.testing.assert_close(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
    assert_bit_exact(hooked, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hooked.modules())


def _outputs(model, paths, tokens):
    """What each module in ``paths`` returns when ``model`` runs on ``tokens``."""
    seen = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: seen.__setitem__(p, o.detach())
        )
        for p in paths
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_patching_all_ones_is_clean_and_all_zeros_the_counterfactual_at_every_output():
    model = hooked_from(gpt2())
    names = si.targets(model, include=["blocks.*", "unembed.W_U"])
    paths = ["unembed.hook_out"] + [
        f"blocks.{layer}.{p}"
        for layer in range(LAYERS)
        for p in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn", "mlp.hook_pre", "mlp")
    ]
    with torch.no_grad():
        clean = model(TOKENS)
    twin = _outputs(model, paths, TWIN)
    patch = si.PatchAblation(lambda m, batch: m(batch[1]))
    ones = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in names.items()}
    with torch.no_grad(), si.masked(model, ones, ablation=patch):
        patch.record((TOKENS, TWIN))
        assert torch.equal(model(TOKENS), clean)
    zeros = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in names.items()}
    with si.masked(model, zeros, ablation=patch):
        patch.record((TOKENS, TWIN))
        patched = _outputs(model, paths, TOKENS)  # its hooks come after the ablation's
    assert set(patched) == set(paths)
    for path in paths:
        torch.testing.assert_close(patched[path], twin[path], atol=1e-5, rtol=1e-5)


def test_resample_from_one_repeated_example_is_patching_with_it():
    model = hooked_from(gpt2())
    masks = random_masks(model, include=["blocks.*", "unembed.W_U"])
    pair = TWIN[:1].expand(2, -1)
    resample = si.ResampleAblation([pair])
    patch = si.PatchAblation(lambda m, batch: m(batch[1]))
    with torch.no_grad():
        with si.masked(model, masks, ablation=resample):
            got = model(TOKENS)
        with si.masked(model, masks, ablation=patch):
            patch.record((TOKENS, pair))
            expected = model(TOKENS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def variant(**overrides) -> HookedTransformer:
    """A one-block random HookedTransformer (random biases too) with ``overrides`` in its config."""
    torch.manual_seed(0)
    cfg = dict(n_layers=1, d_model=D, n_heads=HEADS, d_head=D_HEAD, d_mlp=48, d_vocab=VOCAB,
               n_ctx=16, act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False)  # fmt: skip
    model = HookedTransformer(HookedTransformerConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2].lstrip("_").startswith("b_"):
                param.normal_(0, 0.1)
    return model.eval()


def linear_maps(model):
    """Canonical name -> (where x is read, how, where y is made, the map, the bias added there),
    read by hand from transformer-lens 3's components (block 0 of ``model``)."""
    cfg, attn = model.cfg, model.blocks[0].attn
    split = cfg.use_split_qkv_input or cfg.use_attn_in
    maps = {}
    for letter, kw in zip("QKV", ("query_input", "key_input", "value_input"), strict=True):
        grouped = letter in "KV" and hasattr(attn, f"_W_{letter}")
        bias = getattr(attn, f"_b_{letter}" if grouped else f"b_{letter}")
        equation = "... h d, h d e -> ... h e" if split else "... d, h d e -> ... h e"
        maps[f"attn.W_{letter}"] = ("attn", kw, f"attn.hook_{letter.lower()}", equation, bias)
    mlp = model.blocks[0].mlp
    maps["attn.W_O"] = ("attn.hook_z", "output", "attn", "... h e, h e d -> ... d", attn.b_O)
    maps["mlp.W_out"] = ("mlp.hook_post", "output", "mlp", "... n, n d -> ... d", mlp.b_out)
    if cfg.gated_mlp:  # act(x W_gate) * (x W_in) + b_in
        maps["mlp.W_gate"] = ("mlp", "input", "mlp.hook_pre", "... d, d n -> ... n", None)
        maps["mlp.W_in"] = ("mlp", "input", "mlp.hook_pre_linear", "... d, d n -> ... n", None)
    else:
        maps["mlp.W_in"] = ("mlp", "input", "mlp.hook_pre", "... d, d n -> ... n", mlp.b_in)
    return maps


def read_maps(model, tokens, maps):
    """Every map's (x, y) in block 0 when ``model`` runs on ``tokens``."""
    seen, handles = {}, []
    for name, (source, how, out, _, _) in maps.items():
        source, out = model.blocks[0].get_submodule(source), model.blocks[0].get_submodule(out)

        def read(m, args, kwargs, how=how, name=name):
            seen[name, "x"] = args[0] if how == "input" else kwargs[how]

        if how == "output":
            handles.append(source.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__((name, "x"), o)))  # fmt: skip
        else:
            handles.append(source.register_forward_pre_hook(read, with_kwargs=True))
        handles.append(out.register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__((name, "y"), o)))  # fmt: skip
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (seen[name, "x"], seen[name, "y"]) for name in maps}


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_split_qkv_input": True, "use_attn_result": True},
        {"use_attn_in": True, "gated_mlp": True, "act_fn": "silu"},
        {"n_key_value_heads": 2, "use_split_qkv_input": True},
        {"n_key_value_heads": 2, "gated_mlp": True, "act_fn": "silu"},
    ],
)
def test_each_weights_map_is_patched_where_the_model_computes_it(overrides):
    """One weight masked at a time: where the model computes its map, the output is
    ``(m W) x + ((1 - m) W) x' + b``, ``x'`` the twin's input (patching) or the mean input per
    feature (mean ablation); with split / per-head inputs, grouped keys and values,
    ``use_attn_result`` and the gated MLP."""
    from einops import einsum

    model = variant(**overrides)
    maps = linear_maps(model)
    clean, twin = read_maps(model, TOKENS, maps), read_maps(model, TWIN, maps)
    available = si.targets(model, include="blocks.*")
    assert set(available) == {f"blocks.0.{n}" for n in maps}
    gen = torch.Generator().manual_seed(3)
    for name, (_, _, _, equation, bias) in maps.items():
        target = available[f"blocks.0.{name}"]
        W = si.adapters.real_tensor(model.get_submodule(target.module), target.attribute).detach()
        mask = torch.rand(W.shape, generator=gen)
        (x, _), (x_twin, _) = clean[name], twin[name]
        features = len(equation.split(",")[0].split()) - 1  # the letters after "..."
        mean = x_twin.flatten(0, x_twin.dim() - features - 1).mean(0)
        patch = si.PatchAblation(lambda m, batch: m(batch[1]))
        for ablation, other in ((patch, x_twin), (si.MeanAblation([TWIN]), mean)):
            with si.masked(model, {target.name: mask}, ablation=ablation):
                ablation.on_batch((TOKENS, TWIN))
                _, y = read_maps(model, TOKENS, {name: maps[name]})[name]
            expected = einsum(x, mask * W, equation) + einsum(other, (1 - mask) * W, equation)
            expected = expected if bias is None else expected + bias.detach()
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_weights_without_a_linear_map_are_refused_clearly():
    model = hooked_from(gpt2())
    with pytest.raises(TypeError, match=r"'embed'.W_E .*Zero ablation and ReinitAblation work"):
        with si.masked(
            model, {"embed.W_E": torch.ones(VOCAB, D)}, ablation=si.MeanAblation([TOKENS])
        ):
            pass
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    gated = variant(gated_mlp=True, act_fn="solu_ln")
    with pytest.raises(TypeError, match=r"does not use W_in.*Zero ablation and ReinitAblation"):
        with si.masked(gated, {"blocks.0.mlp.W_in": torch.ones(D, 48)},
                       ablation=si.PatchAblation(lambda m, b: m(b[1]))):  # fmt: skip
            pass


def test_find_trains_under_patching_on_hooked_transformer():
    model = hooked_from(gpt2())
    before = snapshot(model)
    result = si.find(
        model,
        "gumbel_sigmoid",
        lambda m, batch: m(batch[0], return_type="loss"),
        [(torch.cat([TOKENS, TWIN]), torch.cat([TWIN, TOKENS]))],  # split per mask sample
        steps=3,
        progress=False,
        ablation=si.PatchAblation(lambda m, batch: m(batch[1])),
    )
    assert result.subnetwork.meta["ablation"] == "patch"
    assert_bit_exact(model, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
