"""Each method's maths against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch

import subnet_interp as si
from subnet_interp._train import TrainState
from subnet_interp.methods.continuous_sparsification import geometric_temperature
from subnet_interp.methods.gumbel_sigmoid import gumbel_sigmoid, logistic_noise
from subnet_interp.methods.hard_concrete import (
    deterministic_gate,
    expected_l0,
    hard_concrete_sample,
)


def state(**kw) -> TrainState:
    return TrainState(step=kw.pop("step", 0), total_steps=kw.pop("total_steps", 10), **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- Gumbel-sigmoid
def test_logistic_noise_has_logistic_moments():
    noise = logistic_noise((200_000,), gen(), "cpu")
    assert abs(float(noise.mean())) < 0.02
    assert float(noise.var()) == pytest.approx(math.pi**2 / 3, rel=0.03)


def test_hard_gumbel_sigmoid_keeps_with_probability_sigmoid_logit():
    for logit in (-1.5, 0.0, 2.0):
        logits = torch.full((100_000,), logit)
        sample = gumbel_sigmoid(logits, logistic_noise(logits.shape, gen(1), "cpu"), 1.0, True)
        assert set(sample.unique().tolist()) <= {0.0, 1.0}
        assert float(sample.mean()) == pytest.approx(1 / (1 + math.exp(-logit)), abs=0.01)


def test_straight_through_gradient_is_the_soft_gradient():
    logits = torch.tensor([0.3, -0.7], requires_grad=True)
    noise = torch.tensor([0.1, 0.2])
    gumbel_sigmoid(logits, noise, 1.0, True).sum().backward()
    soft = torch.sigmoid(logits.detach() + noise)
    torch.testing.assert_close(logits.grad, soft * (1 - soft))


def test_gumbel_defaults_penalty_and_threshold():
    method = si.methods.create("gumbel_sigmoid")
    assert (
        method.init_logit,
        method.temperature,
        method.mask_samples,
        method.alpha,
        method.lr,
    ) == (
        2.0,
        1.0,
        4,
        1e-4,
        1e-2,
    )
    params = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([[0.5]])]
    penalty = method.penalty(params, [1, 4], state(batch_size=8))
    assert float(penalty) == pytest.approx(1e-4 * (2.0 + 4 * 0.5) / 8)  # / batch size, as the code
    unscaled = si.methods.create("gumbel_sigmoid", per_example_penalty=False)
    assert float(unscaled.penalty(params, [1, 4], state(batch_size=8))) == pytest.approx(1e-4 * 4.0)
    assert method.final_mask(torch.tensor([-0.1, 0.0, 0.1])).tolist() == [False, False, True]


# ----------------------------------------------------- continuous sparsification
def test_geometric_schedule_hits_one_and_final():
    temps = [geometric_temperature(200.0, t, 11) for t in range(11)]
    assert temps[0] == 1.0 and temps[-1] == pytest.approx(200.0)
    ratios = [b / a for a, b in zip(temps, temps[1:], strict=False)]
    assert all(r == pytest.approx(200.0 ** (1 / 10)) for r in ratios)


def test_savarese_mask_is_rescaled_and_rounds_rewind_s():
    method = si.methods.create("continuous_sparsification", mask_init=0.3)
    s = torch.full((3,), 0.3)
    st = state(temperature=1.0)
    torch.testing.assert_close(method.sample(s, st, gen()), torch.ones(3))  # dense at init
    st.temperature = 5.0
    s2 = torch.tensor([-0.2, 0.01, 0.5])
    expected = torch.sigmoid(5.0 * s2) / torch.sigmoid(torch.tensor(0.3))
    torch.testing.assert_close(method.sample(s2, st, gen()), expected)
    method.on_round_end([s2], st)
    torch.testing.assert_close(s2, torch.tensor([-1.0, 0.05, 0.3]))  # min(beta * s, s0)
    assert st.temperature == 1.0
    assert method.final_mask(torch.tensor([0.0, 1e-6])).tolist() == [False, True]


def test_savarese_penalty_and_defaults():
    method = si.methods.create("continuous_sparsification")
    assert (method.mask_init, method.final_temperature, method.l1_lambda, method.num_rounds) == (
        0.0,
        200.0,
        1e-8,
        3,
    )
    s = torch.tensor([0.1, -0.4])
    penalty = method.penalty([s], [2], state(temperature=3.0))
    assert float(penalty) == pytest.approx(1e-8 * 2 * float(torch.sigmoid(3.0 * s).sum()))


def test_savarese_temperature_restarts_each_round():
    method = si.methods.create("continuous_sparsification")
    st = state(total_steps=30, rounds=3, steps_per_round=10)
    seen = []
    for step in range(30):
        st.round_step = step % 10
        method.on_step(st)
        seen.append(st.temperature)
    assert seen[0] == seen[10] == seen[20] == 1.0
    assert seen[9] == seen[19] == seen[29] == pytest.approx(200.0)


def test_lepori_mask_is_not_rescaled_and_ramps_over_whole_run():
    method = si.methods.create("continuous_sparsification_lepori")
    st = state(step=0, total_steps=21)
    method.on_step(st)
    torch.testing.assert_close(method.sample(torch.zeros(2), st, gen()), torch.full((2,), 0.5))
    st.step = 20
    method.on_step(st)
    assert st.temperature == pytest.approx(200.0)
    s = torch.tensor([0.02, -0.02])
    torch.testing.assert_close(method.sample(s, st, gen()), torch.sigmoid(200.0 * s))
    assert float(method.penalty([s], [1], st)) == pytest.approx(
        1e-8 * float(torch.sigmoid(200 * s).sum())
    )


@pytest.mark.parametrize("name", ["continuous_sparsification", "continuous_sparsification_lepori"])
def test_sigmoid_gates_never_scale_a_weight_to_a_subnormal_float(name):
    """Gates at most 2**-63 are exactly 0 (value and gradient); every other gate, and its
    gradient, is the plain ``sigmoid(T * s)``'s bit for bit. Unmasked, 200 * s in (-104, -87)
    gives subnormal gates, and many more weights times gates become subnormal."""
    unscaled = {"rescale": False} if name == "continuous_sparsification" else {}
    method = si.methods.create(name, **unscaled)  # Savarese's gate, not divided by sigmoid(s0)
    st = state(temperature=200.0)
    s = torch.linspace(-0.6, 0.1, 7001).requires_grad_(True)
    plain = s.detach().clone().requires_grad_(True)
    gate = method.sample(s, st, gen())
    reference = torch.sigmoid(200.0 * plain)
    (gate * torch.arange(7001.0)).sum().backward()
    (reference * torch.arange(7001.0)).sum().backward()
    kept = reference.detach() > 2.0**-63
    assert torch.equal(gate[kept], reference[kept]) and torch.equal(s.grad[kept], plain.grad[kept])
    assert not gate[~kept].any() and not s.grad[~kept].any()
    tiny = torch.finfo(torch.float32).tiny
    weights = torch.full_like(gate, 0.01)
    subnormal = lambda x: ((x != 0) & (x.abs() < tiny)).sum().item()  # noqa: E731
    assert subnormal(reference * weights) > 100  # the test can fail: the band is there
    assert subnormal(gate.detach() * weights) == 0


# --------------------------------------------------------------- hard concrete
def test_hard_concrete_expected_l0_matches_sampling():
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    for log_alpha in (-2.0, 0.0, 1.5):
        la = torch.full((200_000,), log_alpha)
        u = torch.rand(la.shape, generator=gen(2)).clamp(1e-6, 1 - 1e-6)
        z = hard_concrete_sample(la, u, beta, gamma, zeta)
        assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
        assert float((z > 0).float().mean()) == pytest.approx(
            float(expected_l0(torch.tensor(log_alpha), beta, gamma, zeta)), abs=0.01
        )
        # probability of an exact zero: P(s * (zeta - gamma) + gamma <= 0), closed form
        threshold = -gamma / (zeta - gamma)
        p_zero = 1 / (1 + math.exp(-(beta * math.log(threshold / (1 - threshold)) - log_alpha)))
        assert float((z == 0).float().mean()) == pytest.approx(p_zero, abs=0.01)


def test_hard_concrete_deterministic_gate_and_threshold():
    method = si.methods.create("hard_concrete")
    assert (method.beta, method.gamma, method.zeta) == (2 / 3, -0.1, 1.1)
    la = torch.tensor([-10.0, 0.0, 10.0])
    gate = deterministic_gate(la, -0.1, 1.1)
    torch.testing.assert_close(gate, torch.tensor([0.0, 0.5, 1.0]), atol=1e-4, rtol=0)
    assert method.final_mask(torch.tensor([-0.1, 0.1])).tolist() == [False, True]


def test_hard_concrete_init_and_penalty():
    method = si.methods.create("hard_concrete", droprate_init=0.2)
    target = si.Target("w", "", "weight", (10_000,), ("out",))
    init = method.init_parameters(target, (10_000,), torch.zeros(1), gen())
    assert float(init.mean()) == pytest.approx(math.log(0.8 / 0.2), abs=1e-3)
    assert float(init.std()) == pytest.approx(0.01, rel=0.05)
    la = torch.tensor([0.3, -1.0])
    expected = 0.1 / 60000 * float(expected_l0(la, 2 / 3, -0.1, 1.1).sum())
    assert float(method.penalty([la], [1], state())) == pytest.approx(expected)


def test_hard_concrete_lagrangian_reaches_target_density():
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 20, bias=False)
    x = torch.randn(64, 20)
    reference = model(x).detach()

    def keep_outputs(m, batch):  # every weight matters; only the Lagrangian makes it sparse
        return torch.nn.functional.mse_loss(m(batch), reference)

    method = si.methods.create("hard_concrete", target_density=0.3, lr=5e-2)
    result = si.find(model, method, keep_outputs, [x], steps=600, progress=False)
    assert result.subnetwork.density() == pytest.approx(0.3, abs=0.1)
    unconstrained = si.find(model, "hard_concrete", keep_outputs, [x], steps=600, progress=False)
    assert unconstrained.subnetwork.density() > 0.6


def test_hard_concrete_lambda_ramp_is_cao_et_al_schedule():
    # lambda 0 for the first quarter of the steps, linear to l0_lambda over the next half
    ramped = si.methods.create("hard_concrete", lambda_ramp=(0.25, 0.5))
    constant = si.methods.create("hard_concrete")
    la = torch.tensor([0.3, -1.0, 2.0])
    full = float(constant.penalty([la], [1], state(step=0, total_steps=100)))
    for step, factor in [(0, 0.0), (25, 0.0), (50, 0.5), (60, 0.7), (75, 1.0), (99, 1.0)]:
        value = float(ramped.penalty([la], [1], state(step=step, total_steps=100)))
        assert value == pytest.approx(factor * full, abs=1e-12), step
    as_list = si.methods.create("hard_concrete", lambda_ramp=[0.25, 0.5])  # e.g. from JSON
    assert as_list.lambda_ramp == (0.25, 0.5)
    assert si.methods.create("hard_concrete", lambda_ramp=(0.9, 0.1)).lambda_ramp == (0.9, 0.1)
    # subnetwork probing ramps lambda (Cao et al.), unless target_density replaces the L0 penalty
    from subnet_interp.probing import _method

    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert _method("hard_concrete", net, None, {}).lambda_ramp == (0.25, 0.5)
    assert _method("hard_concrete", net, None, {}).l0_lambda == 1.0
    constrained = _method("hard_concrete", net, None, {"target_density": 0.1})
    assert constrained.lambda_ramp is None and constrained.target_density == 0.1


def test_hard_concrete_rejects_bad_hparams():
    with pytest.raises(ValueError, match="droprate_init must be in"):
        si.methods.create("hard_concrete", droprate_init=1.0)
    with pytest.raises(ValueError, match="target_density must be in"):
        si.methods.create("hard_concrete", target_density=1.5)
    for ramp in [(0.5, 0.6), (0.25, 0.0), (-0.1, 0.5), (0.25,), (0.1, 0.2, 0.3)]:
        with pytest.raises(ValueError, match=r"lambda_ramp must be \(start, length\)"):
            si.methods.create("hard_concrete", lambda_ramp=ramp)
    with pytest.raises(ValueError, match="set one of them"):
        si.methods.create("hard_concrete", lambda_ramp=(0.25, 0.5), target_density=0.3)


# --------------------------------------------------------------- granularity
@pytest.mark.parametrize(
    "name", ["gumbel_sigmoid", "continuous_sparsification_lepori", "hard_concrete"]
)
def test_neuron_granularity_gives_whole_rows(name):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.randn(16, 6)
    method = si.methods.create(name, granularity="neuron")
    result = si.find(model, method, lambda m, b: m(b).pow(2).mean(), [x], steps=20, progress=False)
    for mask in result.subnetwork.masks.values():
        assert (mask.all(dim=1) | (~mask).all(dim=1)).all()  # one decision per output unit


def test_unknown_granularity_is_rejected():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="Unknown granularity 'layer'"):
        si.find(
            model,
            si.methods.create("gumbel_sigmoid", granularity="layer"),
            lambda m, b: m(b).sum(),
            [torch.randn(4, 3)],
            steps=1,
            progress=False,
        )


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_hard_gumbel_sample_is_the_straight_through_estimator_bit_for_bit(temperature):
    """The hard sample's fused forward/backward equals ``hard - soft.detach() + soft``: the
    same binary value, and the same gradient as autograd takes through the soft sample."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 200, generator=generator).mul_(3).requires_grad_()
    noise = logistic_noise(logits.shape, generator, "cpu")
    upstream = torch.randn(300, 200, generator=generator)
    soft = torch.sigmoid((logits + noise) / temperature)
    reference = (soft > 0.5).to(soft.dtype) - soft.detach() + soft
    (expected,) = torch.autograd.grad(reference, logits, upstream)
    sample = gumbel_sigmoid(logits, noise, temperature, hard=True)
    (found,) = torch.autograd.grad(sample, logits, upstream)
    assert torch.equal(sample, reference.detach())
    assert set(sample.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(found, expected)


def test_hard_concrete_sample_function_equals_the_composed_operations_bit_for_bit():
    """The one-function sample (kept: only the sigmoid) gives the composed formula's values and
    autograd's gradient through it exactly, clamped gates included."""
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    generator = torch.Generator().manual_seed(5)
    log_alpha = torch.randn(400, 300, generator=generator).mul_(3).requires_grad_()
    uniform = torch.rand(400, 300, generator=generator).mul_(1 - 2e-6).add_(1e-6)
    upstream = torch.randn(400, 300, generator=generator)
    s = torch.sigmoid((torch.log(uniform) - torch.log1p(-uniform) + log_alpha) / beta)
    reference = torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)
    (expected,) = torch.autograd.grad(reference, log_alpha, upstream)
    sample = hard_concrete_sample(log_alpha, uniform, beta, gamma, zeta)
    (found,) = torch.autograd.grad(sample, log_alpha, upstream)
    assert torch.equal(sample, reference.detach())
    assert torch.equal(found, expected)
    clamped = (reference == 0) | (reference == 1)
    assert clamped.any() and (~clamped).any()  # both branches of the clamp are exercised


@pytest.mark.parametrize(
    "name", ["gumbel_sigmoid", "continuous_sparsification_lepori", "hard_concrete"]
)
def test_mask_adam_is_fused_for_fp32_masks_and_steps_as_the_default_adam(name):
    """The frozen-weight methods' mask optimiser: Adam's fused kernel on fp32 masks, bit-identical
    to the default Adam on the CPU over many steps; other dtypes keep the default kernel."""
    from subnet_interp.methods._base import adam_for_masks

    gen = torch.Generator().manual_seed(3)
    start = torch.randn(4, 33, generator=gen)
    grads = [torch.randn(4, 33, generator=gen) * 10.0**k for k in range(-3, 3) for _ in range(4)]
    method = si.methods.create(name)
    params = {}
    for label, make in (
        ("default", lambda p: torch.optim.Adam([p], lr=method.lr)),
        ("method", lambda p: method.optimizer([p])),
    ):
        param = start.clone().requires_grad_()
        optimizer = make(param)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        params[label] = param.detach()
        assert bool(optimizer.param_groups[0]["fused"]) == (label == "method")
    assert torch.equal(params["method"], params["default"])
    assert not torch.equal(params["method"], start)
    bf16 = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    assert not adam_for_masks([bf16], 0.1).param_groups[0]["fused"]
