"""Half-precision models (bf16, fp16) and models masked concurrently in threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from _hf_models import TOKENS, gpt2, hand_zeroed, random_masks
from _util import snapshot
from conftest import TinyMLP
from torch.nn.utils import parametrize

import subnet_interp as si

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def next_token_loss(model, tokens):
    logits = model(tokens).logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits.float(), tokens[:, 1:].flatten())


def assert_bit_exact(model, before):
    """Like ``_util.assert_bit_exact``, for dtypes numpy lacks (bf16): compares raw bytes."""

    def raw(tensor):
        return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)

    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
        assert torch.equal(raw(after[key]), raw(value)), key


def assert_restored(model, before, parameters):
    assert_bit_exact(model, before)
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("dtype", HALF)
def test_half_gpt2_masked_equals_hand_zeroed_and_restores(dtype):
    model = gpt2().to(dtype)
    masks = random_masks(model)
    reference = copy.deepcopy(model)
    hand_zeroed("gpt2", reference, masks)
    before, parameters = snapshot(model), dict(model.named_parameters())
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        assert model.transformer.h[0].attn.c_attn.weight.dtype == dtype
        got = model(TOKENS).logits
    with torch.no_grad():
        expected = reference(TOKENS).logits
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert_restored(model, before, parameters)


@pytest.mark.parametrize("dtype", HALF)
def test_half_plain_module_masked_equals_zeroing_and_restores(dtype):
    model = TinyMLP().to(dtype)
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in si.targets(model).items()}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            reference.get_parameter(name).mul_(mask)
    inputs = torch.randn(5, 6, generator=gen).to(dtype)
    before, parameters = snapshot(model), dict(model.named_parameters())
    with torch.no_grad(), si.masked(model, si.Subnetwork(masks)):
        got = model(inputs)
    assert got.dtype == dtype
    assert torch.equal(got, reference(inputs).detach())
    assert_restored(model, before, parameters)


@pytest.mark.parametrize("dtype", HALF)
def test_fp32_soft_mask_on_half_model_gets_fp32_gradients(dtype):
    model = TinyMLP().to(dtype)
    soft = torch.full((8, 6), 0.5, requires_grad=True)
    before = snapshot(model)
    with si.masked(model, {"layers.0.weight": soft}):
        model(torch.randn(5, 6).to(dtype)).float().pow(2).sum().backward()
    assert soft.grad is not None and soft.grad.dtype == torch.float32
    assert torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0
    assert_bit_exact(model, before)


def recording(name: str, seen: list[torch.dtype], **hparams):
    """Method ``name`` that records the dtypes of the mask parameters it is asked to optimise."""
    base = si.methods.get(name)

    def optimizer(self, params):
        seen.extend(p.dtype for p in params)
        return base.optimizer(self, params)

    return type(f"Recording{base.__name__}", (base,), {"optimizer": optimizer})(**hparams)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "name", ["gumbel_sigmoid", "hard_concrete", "continuous_sparsification_lepori"]
)
def test_find_on_half_model_trains_fp32_masks(name, dtype):
    model = gpt2().to(dtype)
    seen: list[torch.dtype] = []
    before, parameters = snapshot(model), dict(model.named_parameters())
    hparams = {"mask_samples": 1} if name == "gumbel_sigmoid" else {}
    method = recording(name, seen, **hparams)
    result = si.find(model, method, next_token_loss, [TOKENS], steps=2, progress=False)
    assert seen and set(seen) == {torch.float32}
    assert all(torch.isfinite(torch.tensor(result.history["loss"])))
    assert all(m.dtype == torch.bool for m in result.subnetwork.masks.values())
    assert next(model.parameters()).dtype == dtype
    assert_restored(model, before, parameters)


# ------------------------------------------------------------------ threads
def masked_pair(kind):
    """Two models of one architecture with different weights, masks and expected outputs."""
    if kind == "gpt2":
        models = [gpt2(), gpt2()]
        with torch.no_grad():
            models[1].transformer.h[0].mlp.c_fc.weight.mul_(-1.0)
        inputs = TOKENS
        subs = [si.Subnetwork(random_masks(m, seed=s)) for m, s in zip(models, (1, 2), strict=True)]
        references = [copy.deepcopy(m) for m in models]
        for reference, sub in zip(references, subs, strict=True):
            hand_zeroed("gpt2", reference, dict(sub.masks))
    else:
        models = [TinyMLP(seed=0), TinyMLP(seed=1)]
        inputs = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(3)
        subs = [
            si.Subnetwork(
                {n: torch.rand(t.shape, generator=gen) < d for n, t in si.targets(m).items()}
            )
            for m, d in zip(models, (0.3, 0.7), strict=True)
        ]
        references = [copy.deepcopy(m) for m in models]
        with torch.no_grad():
            for reference, sub in zip(references, subs, strict=True):
                for name, mask in sub.masks.items():
                    reference.get_parameter(name).mul_(mask)

    def output(model):
        with torch.no_grad():
            out = model(inputs)
        return out.logits if kind == "gpt2" else out

    return models, subs, [output(r) for r in references], output


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_two_models_masked_in_two_threads_do_not_interfere(kind):
    models, subs, expected, output = masked_pair(kind)
    unmasked = [output(m) for m in models]
    states = [(snapshot(m), dict(m.named_parameters())) for m in models]
    rounds, barrier, failures = 10, threading.Barrier(2, timeout=60), []

    def work(index):
        model = models[index]
        try:
            for _ in range(rounds):
                with si.masked(model, subs[index]):
                    barrier.wait()  # both models are masked now
                    inside = output(model)
                    barrier.wait()  # neither leaves before both have computed
                assert torch.equal(inside, expected[index])
                assert torch.equal(output(model), unmasked[index])
        except BaseException as error:  # reported by the main thread
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures
    for model, (before, parameters) in zip(models, states, strict=True):
        assert_restored(model, before, parameters)
