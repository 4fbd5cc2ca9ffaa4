"""Legacy HookedTransformer (transformer-lens < 4), run by .ci/run in a second environment."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

pytest.importorskip("transformers")
try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
        convert_neox_weights,
    )
except ImportError:  # transformer-lens >= 4 removed HookedTransformer
    pytest.skip("needs transformer-lens < 4 (HookedTransformer)", allow_module_level=True)

from _hf_models import (  # noqa: E402
    D_HEAD,
    HEADS,
    LAYERS,
    TOKENS,
    VOCAB,
    D,
    gpt2,
    hand_zeroed,
    hand_zeroed_biases,
    llama,
    neox,
    random_masks,
)


def _rope(config) -> tuple[float, float]:
    """(fraction of each head rotated, base) of a transformers config (5.x ``rope_parameters``,
    4.x ``rotary_pct`` / ``rotary_emb_base`` / ``rope_theta``)."""
    rope = getattr(config, "rope_parameters", None) or {}
    fraction = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    base = rope.get("rope_theta", getattr(config, "rotary_emb_base", None))
    return fraction, base or getattr(config, "rope_theta", 10000.0)


def _config(hf) -> tuple[HookedTransformerConfig, object]:
    """The HookedTransformerConfig transformer-lens 3 derives from ``hf``'s config (the fields
    of ``convert_hf_model_config``, filled in by hand: that function reads the hub), and the
    weight conversion for its architecture."""
    c = hf.config
    sizes = dict(n_layers=LAYERS, d_model=D, n_heads=HEADS, d_head=D_HEAD, d_vocab=VOCAB,
                 n_ctx=16, default_prepend_bos=False)  # fmt: skip
    if c.model_type == "gpt2":
        fields = dict(d_mlp=4 * D, act_fn="gelu_new", normalization_type="LN")
        return HookedTransformerConfig(**sizes, **fields), convert_gpt2_weights
    fraction, base = _rope(c)
    rotary = dict(positional_embedding_type="rotary", rotary_adjacent_pairs=False,
                  rotary_dim=round(fraction * D_HEAD), rotary_base=base)  # fmt: skip
    if c.model_type == "gpt_neox":  # parallel attention and MLP, rotary on a quarter of d_head
        fields = dict(d_mlp=c.intermediate_size, act_fn=c.hidden_act, eps=c.layer_norm_eps,
                      parallel_attn_mlp=c.use_parallel_residual, normalization_type="LN")  # fmt: skip
        return HookedTransformerConfig(**sizes, **rotary, **fields), convert_neox_weights
    assert c.model_type == "llama", c.model_type  # RMS norms, gated MLP, grouped-query attention
    fields = dict(d_mlp=c.intermediate_size, act_fn=c.hidden_act, eps=c.rms_norm_eps,
                  normalization_type="RMS", final_rms=True, gated_mlp=True,
                  n_key_value_heads=c.num_key_value_heads)  # fmt: skip
    return HookedTransformerConfig(**sizes, **rotary, **fields), convert_llama_weights


def hooked_from(hf) -> HookedTransformer:
    """A legacy HookedTransformer holding ``hf``'s weights (no folding or centring)."""
    cfg, convert = _config(hf)
    model = HookedTransformer(cfg)
    # strict=False: the attention's mask / rotary buffers are not in the converted dict, nor is
    # GPT-2's unembedding bias (it has none; TransformerLens starts it at zero)
    loaded = model.load_state_dict(convert(hf, cfg), strict=False)
    assert not loaded.unexpected_keys and all(
        k.rpartition(".")[2] in ("mask", "IGNORE", "rotary_sin", "rotary_cos", "b_U")
        for k in loaded.missing_keys
    ), loaded
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
        # NeoX's and Llama's: rotary (hook_q / hook_k come before the rotation), parallel
        # attention and MLP; RMS norms with grouped-query attention and a gated MLP
        {"positional_embedding_type": "rotary", "rotary_dim": 2, "parallel_attn_mlp": True},
        dict(
            positional_embedding_type="rotary",
            rotary_dim=D_HEAD,
            normalization_type="RMS",
            n_key_value_heads=2,
            gated_mlp=True,
            act_fn="silu",
        ),
    ],
)
def test_each_weights_map_is_patched_where_the_model_computes_it(overrides):
    """One weight masked at a time: where the model computes its map, the output is
    ``(m W) x + ((1 - m) W) x' + b``, ``x'`` the twin's input (patching) or the mean input per
    feature (mean ablation); with split / per-head inputs, grouped keys and values,
    ``use_attn_result``, the gated MLP, rotary embeddings and parallel attention and MLP."""
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


# ------------------------------------------------- GPT-NeoX and Llama (rotary, RMS, GQA, gated)
ROTARY = {"neox": neox, "llama": llama}


def _canonical(model, name):
    """The canonical tensor of target ``name`` as the model's adapter reads it."""
    from subnet_interp._fingerprint import read_canonical

    root = si.adapters.resolve(model).root(model)
    return read_canonical(root, si.targets(model, include="*")[name])


@pytest.mark.parametrize("kind", list(ROTARY))
def test_rotary_families_have_the_hf_models_targets_tensors_and_fingerprint(kind):
    """Loaded with the same weights, the HookedTransformer has the HF model's target names,
    shapes, axes and canonical tensors (grouped-query W_K / W_V are its ``_W_K`` / ``_W_V``
    parameters), hence its fingerprint; each canonical tensor is the parameter itself and writes
    back exactly; and the unmasked logits agree (the config reproduces the model)."""
    hf = ROTARY[kind]()
    model = hooked_from(hf)
    ours, theirs = si.targets(model, include="*"), si.targets(hf, include="*")
    assert list(ours) == list(theirs)
    grouped = kind == "llama"
    for name, target in ours.items():
        described = (target.shape, target.axes, target.default)
        assert described == (theirs[name].shape, theirs[name].axes, theirs[name].default), name
        assert torch.equal(_canonical(model, name), _canonical(hf, name)), name
        real = si.adapters.real_tensor(model.get_submodule(target.module), target.attribute)
        assert isinstance(real, torch.nn.Parameter) and target.layout.is_identity, name
        written = target.layout.write_real(real.detach().clone(), torch.zeros_like(real))
        assert torch.equal(written, real), name
    assert ours["blocks.1.attn.W_K"].attribute == ("_W_K" if grouped else "W_K")
    assert ("blocks.0.mlp.W_gate" in ours) == grouped
    assert si.fingerprint(model) == si.fingerprint(hf)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(ROTARY))
def test_rotary_families_random_mask_equals_hand_zeroed_hf_and_restores(kind):
    """One random mask over every target: the masked HookedTransformer gives the logits of the
    HF model with the same weights zeroed by hand (``hand_zeroed``, written from HF's forward)
    and of the masked HF model; every parameter and buffer is bit-exact afterwards."""
    masks = si.Subnetwork(random_masks(ROTARY[kind](), include="*"))
    model, hf = hooked_from(ROTARY[kind]()), ROTARY[kind]()
    before = snapshot(model)
    with torch.no_grad():
        with si.masked(model, masks):
            got = model(TOKENS)
        with si.masked(hf, masks):
            masked_hf = hf(TOKENS).logits
    assert_bit_exact(model, before)
    reference = ROTARY[kind]()
    blocks = {n: m for n, m in masks.masks.items() if n.startswith("blocks.")}
    hand_zeroed(kind, reference, blocks)
    with torch.no_grad():
        reference.get_output_embeddings().weight.mul_(masks["unembed.W_U"].T)
        reference.get_input_embeddings().weight.mul_(masks["embed.W_E"])
        expected = reference(TOKENS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, masked_hf, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, hf(TOKENS).logits.detach(), atol=1e-3)  # the mask did act


@pytest.mark.parametrize("kind", list(ROTARY))
def test_rotary_families_whole_head_mask_equals_zeroing_its_hook_z(kind):
    """Masking head 2's rows of W_Q and W_O (and its own W_K / W_V where it has them) equals
    zeroing head 2 in ``hook_z``; with grouped-query attention, masking key/value head 0's W_K
    and W_V equals zeroing query heads 0 and 1 (those that read it) in ``hook_z`` (Llama's value
    bias is zero)."""
    model = hooked_from(ROTARY[kind]())
    found = si.targets(model)
    layer, grouped = 1, kind == "llama"

    def run(masked_heads, zeroed_heads):
        masks = {}
        for letter, heads in masked_heads.items():
            mask = torch.ones(found[f"blocks.{layer}.attn.W_{letter}"].shape, dtype=torch.bool)
            mask[heads] = False
            masks[f"blocks.{layer}.attn.W_{letter}"] = mask
        with torch.no_grad(), si.masked(model, masks):
            got = model(TOKENS)

        def zero(z, hook):
            z[:, :, zeroed_heads] = 0
            return z

        with torch.no_grad():
            hook = f"blocks.{layer}.attn.hook_z"
            expected = model.run_with_hooks(TOKENS, fwd_hooks=[(hook, zero)])
            clean = model(TOKENS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, clean, atol=1e-4)

    run({"Q": [2], "O": [2]} if grouped else {x: [2] for x in "QKVO"}, [2])
    if grouped:
        assert model.cfg.n_heads // model.cfg.n_key_value_heads == 2
        run({"K": [0], "V": [0]}, [0, 1])


@pytest.mark.parametrize("kind", list(ROTARY))
def test_rotary_families_pass_the_conformance_kit_and_find_trains(kind):
    """``si.testing.check_adapter`` over every target (layouts, identity, effect, by-hand
    zeroing, restore also on error, fingerprint, gradients reach every mask), then ``si.find``
    with the model's own next-token loss leaves the weights bit-exact, and the subnetwork it
    finds applies to the HF model (its fingerprint checked) with the same logits."""
    model = hooked_from(ROTARY[kind]())
    report = si.testing.check_adapter(model, TOKENS, include="*")
    assert report.targets == tuple(si.targets(ROTARY[kind](), include="*"))
    assert report.passed[-1] == "find"
    before = snapshot(model)
    result = si.find(
        model,
        "gumbel_sigmoid",
        lambda m, batch: m(batch, return_type="loss"),
        [torch.cat([TOKENS, TOKENS])],
        steps=3,
        progress=False,
    )
    assert result.subnetwork.meta["family"] == "transformer_lens.HookedTransformer"
    assert_bit_exact(model, before)
    hf = ROTARY[kind]()  # the subnetwork carries the fingerprint si.masked checks on the HF model
    with torch.no_grad(), si.masked(hf, result.subnetwork), si.masked(model, result.subnetwork):
        torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(ROTARY))
def test_rotary_families_patch_and_mean_ablation_give_the_hf_models_logits(kind):
    """Patching and mean ablation of one random mask: the same logits as on the HF model (whose
    patched forward is checked against a hand-written reference in test_patching.py)."""
    masks = random_masks(ROTARY[kind](), include="blocks.*")
    hf, model = ROTARY[kind](), hooked_from(ROTARY[kind]())
    for make in (
        lambda run: si.PatchAblation(lambda m, batch: run(m, batch[1])),
        lambda run: si.MeanAblation([TWIN, TOKENS[:1]], forward=run),
    ):
        logits = []
        for wrapper, run in ((model, lambda m, x: m(x)), (hf, lambda m, x: m(x).logits)):
            ablation = make(run)
            with torch.no_grad(), si.masked(wrapper, masks, ablation=ablation):
                ablation.on_batch((TOKENS, TWIN))
                logits.append(run(wrapper, TOKENS))
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_a_4bit_hooked_transformer_is_refused_clearly_and_left_unchanged():
    """transformer-lens 3 keeps a ``load_in_4bit`` model's attention and MLP weights as packed
    bitsandbytes tensors; the adapter reads the flag (set here on a float model: bitsandbytes
    is not installed) and refuses before anything is attached."""
    model = hooked_from(llama())
    before = snapshot(model)
    model.cfg.load_in_4bit = True
    with pytest.raises(TypeError, match=r"load_in_4bit=True.*Load the model without load_in_4bit"):
        with si.masked(model, random_masks(llama())):
            pass
    assert_bit_exact(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# ------------------------------------------------- opt-in bias and norm-weight targets
FAMILIES = {"gpt2": gpt2, **ROTARY}


def _randomized(kind):
    """``kind``'s HF model with random biases and norm weights (so that masks on them show)."""
    from test_adapter_biases_all import randomized

    return randomized(FAMILIES[kind]())


def _bias_targets(model):
    found = si.targets(model, biases=True)
    return {n: t for n, t in found.items() if t.kind in si.adapters.OPTIONAL_KINDS}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_bias_targets_are_the_hooked_parameters_with_the_hf_names(kind):
    """``b_Q`` ... ``ln_final.b`` are the HookedTransformer's own parameters (identity views;
    grouped-query ``_b_K`` / ``_b_V``) with the HF model's names, order, shapes, axes and
    canonical values; Llama, which has no biases, gets TransformerLens's zero biases as extra
    targets. They are opt-in and outside the fingerprint."""
    from subnet_interp._fingerprint import read_canonical

    hf = _randomized(kind)
    model = hooked_from(_randomized(kind))
    ours, theirs = _bias_targets(model), _bias_targets(hf)
    assert theirs and [n for n in ours if n in theirs] == list(theirs)
    for name, target in ours.items():
        real = si.adapters.real_tensor(model.get_submodule(target.module), target.attribute)
        assert isinstance(real, torch.nn.Parameter) and target.layout.is_identity, name
        if name in theirs:
            described = (target.shape, target.axes, target.kind, target.default)
            other = theirs[name]
            assert described == (other.shape, other.axes, other.kind, other.default), name
            assert torch.equal(read_canonical(model, target), read_canonical(hf, other)), name
        else:  # a bias the HF model does not have: TransformerLens keeps it at zero
            assert not real.any(), name
    extra = {n.split(".", 2)[-1] for n in ours if n not in theirs}
    grouped = kind == "llama"
    assert extra == ({"attn.b_Q", "attn.b_K", "attn.b_V", "attn.b_O", "mlp.b_in", "mlp.b_out"}
                     if grouped else set())  # fmt: skip
    if grouped:
        assert ours["blocks.0.attn.b_K"].attribute == "_b_K"
        assert ours["blocks.0.attn.b_K"].axes == ("kv_head", "d_head")
    assert not set(ours) & set(si.targets(model, include="*"))
    assert si.fingerprint(model) == si.fingerprint(hf)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_random_bias_mask_equals_hand_zeroed_parameters_and_the_hf_model(kind):
    """A random mask over every bias and norm target: the masked HookedTransformer's logits and
    cache are those of the HookedTransformer with the same entries of ``blocks.L.attn.b_Q`` ...
    zeroed by hand, and its logits those of the HF model zeroed by hand (``hand_zeroed_biases``,
    from HF's forward) and of the masked HF model; everything is bit-exact afterwards."""
    model = hooked_from(_randomized(kind))
    gen = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.6 for n, t in _bias_targets(model).items()}
    names = ["blocks.1.attn.hook_q", "blocks.1.ln1.hook_normalized", "ln_final.hook_normalized"]
    before = snapshot(model)
    with torch.no_grad(), si.masked(model, masks):
        got = model(TOKENS)
        _, cache = model.run_with_cache(TOKENS, names_filter=names)
    assert_bit_exact(model, before)
    reference = hooked_from(_randomized(kind))
    with torch.no_grad():
        for name, mask in masks.items():
            owner, attribute = name.rsplit(".", 1)
            module = reference.get_submodule(owner)
            if attribute in ("b_K", "b_V") and hasattr(module, "_b_K"):  # grouped-query K / V
                attribute = f"_{attribute}"
            getattr(module, attribute).mul_(mask)
        expected = reference(TOKENS)
        _, expected_cache = reference.run_with_cache(TOKENS, names_filter=names)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(cache[name], expected_cache[name], atol=1e-5, rtol=1e-5)
    hf, zeroed = _randomized(kind), _randomized(kind)
    hf_names = _bias_targets(hf)
    hand_zeroed_biases(kind, zeroed, {n: m for n, m in masks.items() if n in hf_names})
    with torch.no_grad(), si.masked(hf, {n: m for n, m in masks.items() if n in hf_names}):
        torch.testing.assert_close(got, hf(TOKENS).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, zeroed(TOKENS).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, model(TOKENS).detach(), atol=1e-3)  # the mask did act


@pytest.mark.parametrize("normalization", ["LNPre", "RMSPre"])
def test_a_folded_norm_has_no_weight_to_mask_and_the_biases_stay_targets(normalization):
    """With the norms folded into the next weights (``fold_ln``: ``LayerNormPre`` /
    ``RMSNormPre``, no parameters) there is no norm target; the biases still are."""
    model = variant(normalization_type=normalization)
    names = list(_bias_targets(model))
    assert not [n for n in names if n.endswith((".w", ".b"))]
    assert {"blocks.0.attn.b_Q", "blocks.0.attn.b_O", "blocks.0.mlp.b_in"} <= set(names)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_bias_targets_pass_the_conformance_kit_on_hooked_transformer(kind):
    """Round trip, effect, by-hand zeroing, restore also on error, fingerprint and ``si.find``
    training, on the bias and norm targets the HF model has too (Llama's extra zero biases get
    no gradient: a mask on a zero weight changes nothing)."""
    model = hooked_from(_randomized(kind))
    names = list(_bias_targets(FAMILIES[kind]()))
    report = si.testing.check_adapter(model, TOKENS, include=names, biases=True)
    assert list(report.targets) == names
    assert report.passed[-1] == "find"
