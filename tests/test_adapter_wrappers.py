"""TransformerBridge and nnsight: the same canonical mask gives the same logits everywhere."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si

pytest.importorskip("transformers")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge.sources")
nnsight = pytest.importorskip("nnsight")

from _hf_models import BUILDERS, TOKENS, hand_zeroed, random_masks  # noqa: E402

from subnet_interp.tasks import planted_mlp  # noqa: E402

ARCH = {"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}


def bridge(kind, hf=None):
    hf = hf if hf is not None else BUILDERS[kind]()
    return tl_bridge.build_bridge_from_module(hf, ARCH[kind], hf_config=hf.config).eval()


def logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_same_targets_and_fingerprint_across_wrappers(kind):
    hf, tl = BUILDERS[kind](), bridge(kind)
    wrapped = nnsight.NNsight(BUILDERS[kind]())
    hf_targets, tl_targets = si.targets(hf, include="*"), si.targets(tl, include="*")
    assert {n: t.shape for n, t in tl_targets.items() if n != "unembed.W_U"} == {
        n: t.shape for n, t in hf_targets.items() if n != "unembed.W_U"
    }
    assert si.fingerprint(hf) == si.fingerprint(wrapped)
    assert list(si.targets(tl)) == list(si.targets(hf))
    default = {n: t.shape for n, t in si.targets(hf).items()}
    assert {n: t.shape for n, t in si.targets(tl).items()} == default


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_one_mask_same_logits_in_hf_bridge_nnsight_and_reference(kind):
    masks = si.Subnetwork(random_masks(BUILDERS[kind]()))
    results = {}
    hf = BUILDERS[kind]()
    with torch.no_grad(), si.masked(hf, masks):
        results["hf"] = hf(TOKENS).logits
    tl = bridge(kind)
    before = snapshot(tl)
    with torch.no_grad(), si.masked(tl, masks):
        results["bridge"] = tl(TOKENS)
    assert_bit_exact(tl, before)
    wrapped = nnsight.NNsight(BUILDERS[kind]())
    with torch.no_grad(), si.masked(wrapped, masks):
        with wrapped.trace(TOKENS):
            saved = wrapped.output.save()
    results["nnsight"] = logits(saved)
    reference = BUILDERS[kind]()
    hand_zeroed(kind, reference, masks.masks)
    with torch.no_grad():
        expected = reference(TOKENS).logits
    for name, got in results.items():
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{kind}/{name}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_whole_head_mask_equals_hook_z_ablation_in_bridge(kind):
    tl = bridge(kind)
    layer, head = 1, 2
    masks = {}
    for letter in "QO":
        target = si.targets(tl)[f"blocks.{layer}.attn.W_{letter}"]
        mask = torch.ones(target.shape, dtype=torch.bool)
        mask[head] = False
        masks[f"blocks.{layer}.attn.W_{letter}"] = mask
    with torch.no_grad(), si.masked(tl, masks):
        got = tl(TOKENS)

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        expected = tl.run_with_hooks(TOKENS, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_run_with_cache_returns_masked_activations():
    masks = random_masks(BUILDERS["gpt2"]())
    tl = bridge("gpt2")
    with torch.no_grad(), si.masked(tl, masks):
        _, cache = tl.run_with_cache(TOKENS)
    reference_hf = BUILDERS["gpt2"]()
    hand_zeroed("gpt2", reference_hf, masks)
    with torch.no_grad():
        _, expected = bridge("gpt2", reference_hf).run_with_cache(TOKENS)
    for name in ("blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"):
        torch.testing.assert_close(cache[name], expected[name], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        _, unmasked = tl.run_with_cache(TOKENS)
    assert not torch.allclose(unmasked["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_z"])


def test_compatibility_mode_inside_masked_is_blocked_and_explained():
    tl = bridge("gpt2")
    masks = random_masks(BUILDERS["gpt2"]())
    before = snapshot(tl)
    with si.masked(tl, masks):
        with pytest.raises(RuntimeError, match="call enable_compatibility_mode\\(\\) first"):
            tl.enable_compatibility_mode()
    assert_bit_exact(tl, before)
    assert "enable_compatibility_mode" not in tl.__dict__


def test_masks_attach_after_compatibility_mode_and_fingerprint_explains_processing():
    tl = bridge("gpt2")
    found_before = si.Subnetwork(random_masks(tl), {"fingerprint": si.fingerprint(tl)})
    tl.enable_compatibility_mode()
    with pytest.raises(ValueError, match="fold_ln"):
        with si.masked(tl, found_before):
            pass
    masks = random_masks(tl)
    before = snapshot(tl)
    with torch.no_grad():
        plain = tl(TOKENS)
        with si.masked(tl, masks):
            masked_out = tl(TOKENS)
            _, cache = tl.run_with_cache(TOKENS)
        _, plain_cache = tl.run_with_cache(TOKENS)
    assert not torch.allclose(plain, masked_out)
    assert not torch.allclose(
        cache["blocks.1.hook_resid_post"], plain_cache["blocks.1.hook_resid_post"]
    )
    assert_bit_exact(tl, before)


def test_find_trains_through_bridge_and_nnsight():
    def next_token_loss(model, batch):
        out = model(batch)
        out = logits(out)
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    tl = bridge("gpt2")
    before = snapshot(tl)
    result = si.find(
        tl, "continuous_sparsification_lepori", next_token_loss, [TOKENS], steps=3, progress=False
    )
    assert_bit_exact(tl, before)
    assert result.subnetwork.meta["family"] == "transformer_lens.TransformerBridge"

    wrapped = nnsight.NNsight(BUILDERS["gpt2"]())

    def traced_loss(model, batch):
        with model.trace(batch):
            out = model.output.save()
        out = logits(out)
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    result = si.find(
        wrapped, "continuous_sparsification_lepori", traced_loss, [TOKENS], steps=3, progress=False
    )
    assert result.history["loss"][0] > 0
    assert set(result.subnetwork.names) == set(si.targets(wrapped))


@pytest.mark.parametrize("method", ["lottery_ticket", "continuous_sparsification", "lt_sft"])
def test_weight_training_methods_run_on_an_nnsight_wrapper_and_leave_it_as_it_was(method):
    # a deep copy of the wrapper cannot be traced ("the model already ran past it"): the module
    # is trained itself and its weights put back
    wrapped = nnsight.NNsight(BUILDERS["gpt2"]())
    before = si.fingerprint(wrapped)
    state = {k: v.clone() for k, v in wrapped._module.state_dict().items()}

    def traced_loss(model, batch):
        with model.trace(batch):
            out = model.output.save()
        out = logits(out)
        return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    hp = {"rounds": 2} if method == "lottery_ticket" else {}
    result = si.find(wrapped, si.methods.create(method, **hp), traced_loss, [TOKENS], steps=4,
                     progress=False)  # fmt: skip
    assert si.fingerprint(wrapped) == before
    assert all(torch.equal(v, state[k]) for k, v in wrapped._module.state_dict().items())
    assert result.weights is not None and set(result.weights) <= set(si.targets(wrapped))
    assert result.history["loss"][0] > 0


def test_nnsight_interventions_compose_with_masks():
    wrapped = nnsight.NNsight(BUILDERS["gpt2"]())
    masks = random_masks(BUILDERS["gpt2"]())
    with torch.no_grad(), si.masked(wrapped, masks):
        with wrapped.trace(TOKENS):
            wrapped.transformer.h[0].mlp.output[:] = 0  # the user's own intervention
            patched = wrapped.output.save()
    reference = BUILDERS["gpt2"]()
    hand_zeroed("gpt2", reference, masks)
    handle = reference.transformer.h[0].mlp.register_forward_hook(
        lambda m, i, o: torch.zeros_like(o)
    )
    try:
        with torch.no_grad():
            expected = reference(TOKENS).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits(patched), expected, atol=1e-5, rtol=1e-5)


def offline_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


@pytest.mark.parametrize("wrapper", ["TransformersModel", "LanguageModel"])
def test_language_model_wrappers_see_masks_and_restore(wrapper):
    tokenizer = offline_tokenizer()
    hf = BUILDERS["gpt2"]()
    if wrapper == "TransformersModel":
        from nnsight.modeling.transformers import TransformersModel

        model = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    else:
        with pytest.warns(nnsight.NNsightDeprecationWarning):  # still widely used
            model = nnsight.LanguageModel(hf, tokenizer=tokenizer)
    masks = random_masks(BUILDERS["gpt2"]())
    before = snapshot(hf)
    prompt = "w1 w2 w3 w4"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad(), si.masked(model, masks):
        with model.trace(prompt):
            out = model.output.save()
    assert_bit_exact(hf, before)
    reference = BUILDERS["gpt2"]()
    hand_zeroed("gpt2", reference, masks)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(logits(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["continuous_sparsification", "lottery_ticket"])
def test_weight_training_on_a_wrapper_keeps_the_users_gradients_out(method):
    """An nnsight wrapper cannot be copied, so a method that trains weights trains the model
    itself: gradients already on its weights change neither the run nor are they lost, and
    the run leaves none of its own behind."""
    task = planted_mlp()

    def loss(wrapped, batch):  # the wrapped module is the task's model
        return task.loss_fn(task.model, batch)

    def run():
        return si.find(nnsight.NNsight(task.model), method, loss, task.batches(64),
                       steps=3, progress=False).subnetwork  # fmt: skip

    clean = run()
    assert all(p.grad is None for p in task.model.parameters())
    task.loss_fn(task.model, task.batches(64)[0]).backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters()}
    assert run() == clean
    for name, p in task.model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_weights_that_share_storage_train_in_place():
    """A GPT-2 bridge's q / k / v weights are views of one fused tensor: trained in place they
    step after backward (stepping one inside backward would change what the others' backward
    reads), and the run equals the one on a copy."""
    model = bridge("gpt2")
    q = model.blocks[0].attn.q.original_component.weight
    k = model.blocks[0].attn.k.original_component.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()

    def loss(m, batch):
        logits = m(batch)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()
        )

    data = [TOKENS[:, :8]]
    copied = si.find(model, "continuous_sparsification", loss, data, steps=3, progress=False)
    trained = si.find(model, "continuous_sparsification", loss, data, steps=3, progress=False,
                      inplace=True)  # fmt: skip
    assert trained.subnetwork == copied.subnetwork


def test_a_model_a_bridge_was_built_from_is_refused_with_the_fix():
    """Building a bridge replaces the transformers model's layers in place: masking that model
    afterwards is refused with what happened and what to mask instead."""
    hf = BUILDERS["gpt2"]()
    masks = si.Subnetwork(random_masks(hf))
    wrapped = bridge("gpt2", hf)
    with pytest.raises(TypeError, match="wrapped by a TransformerLens bridge.*Mask the bridge"):
        si.targets(hf)
    with pytest.raises(TypeError, match="wrapped by a TransformerLens bridge"):
        with si.masked(hf, masks):
            pass
    with torch.no_grad(), si.masked(wrapped, masks):
        wrapped(TOKENS)
