"""A catalogue of bad inputs: each is refused with an error that says what was given, what was
expected and how to fix it, and the model is left bit-exactly as it was, with no
parametrization behind."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from _hf_models import gpt2
from _util import assert_bit_exact, snapshot
from conftest import TinyMLP
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils import parametrize

import subnet_interp as si
from subnet_interp.analysis import ablation_effect, overlap_test

MODELS = {"mlp": TinyMLP, "gpt2": gpt2}
LEARNABLE = [
    "gumbel_sigmoid",
    "continuous_sparsification",
    "continuous_sparsification_lepori",
    "hard_concrete",
    "lottery_ticket",
    "lt_sft",
]
X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
DATA = [(X, torch.zeros(16, 4))]


def mse(model, batch):
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets)


def ones(*shape, device="cpu"):
    return torch.ones(shape, dtype=torch.bool, device=device)


def mlp_masks():
    return {"layers.0.weight": ones(8, 6), "layers.1.weight": ones(4, 8)}


def enter(model, subnetwork, **kwargs):
    with si.masked(model, subnetwork, **kwargs):
        pass


def typed(match, parameter):
    """``match``, or the message of the test suite's runtime type checker (jaxtyping +
    beartype, see conftest.py), which may reject a value of the wrong type for an annotated
    parameter before the library's own check runs (it samples one item of a container, so not
    always); both name the value and the expected type."""
    return (
        rf"(?s)(?:{match})|(?:Type-check error whilst checking .*Called with .*"
        rf"(?:'{parameter}':|'arg': '{parameter}'))"
    )


def assert_refused(model, action, error, match):
    """``action(model)`` raises ``error`` matching ``match``; the model is untouched."""
    before = snapshot(model)
    with pytest.raises(error, match=match):
        action(model)
    assert_bit_exact(model, before)
    assert not any(parametrize.is_parametrized(module) for module in model.modules())


# ------------------------------------------------------------------ si.masked
MASKED = [
    pytest.param(
        "mlp",
        lambda: {"layers.0.weight": ones(6, 8)},
        ValueError,
        r"'layers.0.weight' has shape \(6, 8\), expected \(8, 6\) \(axes \('out', 'in'\)\)\. "
        r"Was it found on a different model",
        id="wrong-shape-transposed",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.0.weight": ones(48)},
        ValueError,
        r"shape \(48,\), expected \(8, 6\)",
        id="wrong-shape-flattened",
    ),
    pytest.param(
        "gpt2",
        lambda: {"blocks.0.attn.W_Q": ones(2, 32, 16)},
        ValueError,
        r"shape \(2, 32, 16\), expected \(4, 32, 8\) \(axes \('head', 'd_model', 'd_head'\)\)",
        id="wrong-head-count",
    ),
    pytest.param(
        "mlp",
        lambda: {**mlp_masks(), "layers.1.weight": ones(8, 4)},
        ValueError,
        r"'layers.1.weight' has shape \(8, 4\), expected \(4, 8\)",
        id="second-mask-bad-first-fine",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.9.weight": ones(8, 6)},
        si.NotFoundError,
        r"'layers.9.weight' is not a maskable weight of this TinyMLP\. Closest: \[.*\]\. "
        r"Available: layers.0.weight, layers.0.bias, layers.1.weight, layers.1.bias",  # opt-in
        id="unknown-target",
    ),
    pytest.param(
        "mlp",
        lambda: {"blocks.0.attn.W_Q": ones(4, 32, 8)},
        si.NotFoundError,
        r"'blocks.0.attn.W_Q' is not a maskable weight of this TinyMLP.*Available: layers.0",
        id="target-the-model-lacks",
    ),
    pytest.param(
        "gpt2",
        lambda: {"transformer.h.0.attn.c_attn.weight": ones(32, 96)},
        si.NotFoundError,
        r"names the model's real parameter.*holds \['blocks.0.attn.W_Q', 'blocks.0.attn.W_K', "
        r"'blocks.0.attn.W_V'\]\); use the canonical names",
        id="ambiguous-fused-real-name",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.*.weight": ones(8, 6)},
        si.NotFoundError,
        r"glob pattern matching 2 targets.*exact canonical names.*si.targets\(model, include=",
        id="ambiguous-glob-as-key",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.0.weight": torch.ones(8, 6, dtype=torch.int64)},
        TypeError,
        r"dtype torch.int64; expected torch.bool \(binary\) or a floating dtype.*mask\.bool\(\)",
        id="integer-mask",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.0.weight": [[True] * 6] * 8},
        TypeError,
        typed(r"Mask for 'layers.0.weight' must be a torch.Tensor, got list", "subnetwork"),
        id="list-mask",
    ),
    pytest.param(
        "mlp",
        lambda: {"layers.0.weight": ones(8, 6, device="meta")},
        ValueError,
        r"is on meta but the weight is on cpu.*Move the subnetwork with `\.to\('cpu'\)`",
        id="device-mismatch",
    ),
    pytest.param(
        "mlp",
        lambda: si.find(TinyMLP(seed=1), "magnitude", mse, DATA, progress=False).subnetwork,
        ValueError,
        r"found on a model with fingerprint '\w+', but this model's fingerprint is '\w+'.*"
        r"Pass strict=False",
        id="found-on-another-model",
    ),
    pytest.param(
        "mlp",
        lambda: [ones(8, 6)],
        TypeError,
        typed(
            r"`subnetwork` must be an si.Subnetwork or a mapping name -> mask tensor", "subnetwork"
        ),
        id="not-a-subnetwork",
    ),
]


@pytest.mark.parametrize("model_name, make_masks, error, match", MASKED)
def test_masked_refuses(model_name, make_masks, error, match):
    assert_refused(MODELS[model_name](), lambda m: enter(m, make_masks()), error, match)


def test_masked_refuses_unknown_ablation():
    assert_refused(
        TinyMLP(),
        lambda m: enter(m, mlp_masks(), ablation="ones"),
        ValueError,
        r"Unknown ablation 'ones'\. Pass one of \['zero'\] or an `si.Ablation` instance",
    )


def test_masked_refuses_a_model_that_is_not_a_module():
    with pytest.raises(TypeError, match=r"cannot mask a builtins.str: expected a torch.nn.Module"):
        enter("gpt2", mlp_masks())


def test_delta_applied_refuses_a_binary_delta():
    assert_refused(
        TinyMLP(),
        lambda m: si.delta_applied(m, {"layers.0.weight": ones(8, 6)}).__enter__(),
        TypeError,
        r"delta\['layers.0.weight'\] has dtype torch.bool; a weight delta is a float tensor.*"
        r"use `si.masked` instead",
    )


# ---------------------------------------------------------- target selection
TARGETS = [
    pytest.param(
        "mlp",
        lambda m: si.targets(m, include="layers.7.*"),
        si.NotFoundError,
        r"`include` pattern 'layers.7.\*' matches no maskable weight of this torch model.*"
        r"Available: layers.0.weight, layers.1.weight",
        id="include-matches-nothing",
    ),
    pytest.param(
        "mlp",
        lambda m: si.targets(m, exclude="layers.7.*"),
        si.NotFoundError,
        r"`exclude` pattern 'layers.7.\*' matches no maskable weight.*Available: layers.0",
        id="exclude-matches-nothing",
    ),
    pytest.param(
        "mlp",
        lambda m: si.targets(m, include="blocks.*.attn.W_Q"),
        si.NotFoundError,
        r"this model is a plain nn.Module, so its targets are its parameter names",
        id="canonical-name-on-plain-module",
    ),
    pytest.param(
        "gpt2",
        lambda m: si.targets(m, include="transformer.h.*.mlp.c_fc.weight"),
        si.NotFoundError,
        r"real parameter.*transformer.h.0.mlp.c_fc.weight holds \['blocks.0.mlp.W_in'\].*"
        r"use the canonical names",
        id="hf-real-name-pattern",
    ),
    pytest.param(
        "mlp",
        lambda m: si.targets(m, include=["layers.*", 1]),
        TypeError,
        typed(r"`include` must hold glob strings, got 1", "include"),
        id="pattern-not-a-string",
    ),
    pytest.param(
        "mlp",
        lambda m: si.find(m, "gumbel_sigmoid", mse, DATA, targets="layer.*", steps=2),
        si.NotFoundError,
        r"'layer.\*' matches no maskable weight.*Available: layers.0.weight",
        id="find-targets-match-nothing",
    ),
    pytest.param(
        "mlp",
        lambda m: si.find(m, "gumbel_sigmoid", mse, DATA, targets=[], steps=2),
        ValueError,
        r"No weights selected to mask: the target selection is empty\. Available: \[",
        id="find-targets-empty",
    ),
    pytest.param(
        "mlp",
        lambda m: si.find(
            m, "gumbel_sigmoid", mse, DATA, targets=si.targets(TinyMLP((6, 5, 4))), steps=2
        ),
        si.NotFoundError,
        r"'layers.0.weight' was not produced by si.targets\(model\) for this model",
        id="find-targets-of-another-model",
    ),
]


@pytest.mark.parametrize("model_name, action, error, match", TARGETS)
def test_target_selection_refuses(model_name, action, error, match):
    assert_refused(MODELS[model_name](), action, error, match)


# ---------------------------------------------------------------- Subnetwork
def two(first, second):
    return si.Subnetwork({"x": first}), si.Subnetwork({"x": second})


SUBNETWORKS = [
    pytest.param(
        lambda: si.Subnetwork({"layers.0.weight": torch.rand(8, 6)}),
        TypeError,
        r"'layers.0.weight' has dtype torch.float32; a Subnetwork holds binary masks "
        r"\(torch.bool\)\. Threshold a soft mask first, e.g\. `mask > 0.5`",
        id="float-mask",
    ),
    pytest.param(
        lambda: si.Subnetwork({"layers.0.weight": torch.ones(8, 6, dtype=torch.uint8)}),
        TypeError,
        r"dtype torch.uint8; a Subnetwork holds binary masks",
        id="uint8-mask",
    ),
    pytest.param(
        lambda: si.Subnetwork({"layers.0.weight": [True, False]}),
        TypeError,
        typed(r"Mask for 'layers.0.weight' must be a torch.Tensor, got list", "masks"),
        id="list-mask",
    ),
    pytest.param(
        lambda: si.Subnetwork([ones(8, 6)]),
        TypeError,
        typed(r"masks must be a mapping of target name -> bool tensor, got list", "masks"),
        id="masks-not-a-mapping",
    ),
    pytest.param(
        lambda: si.Subnetwork({0: ones(8, 6)}),
        TypeError,
        typed(r"target names must be str, got 0", "masks"),
        id="name-not-a-string",
    ),
    pytest.param(
        lambda: si.Subnetwork({"layers.0.weight": ones(8, 6), "x": ones(2, device="meta")}),
        ValueError,
        r"on one device; 'x' is on meta, earlier masks on cpu\. Move them with `\.to\(device\)`",
        id="masks-on-two-devices",
    ),
    pytest.param(
        lambda: si.Subnetwork(mlp_masks(), {"created": object()}),
        TypeError,
        r"metadata must be JSON-serialisable, got object.*Store plain numbers",
        id="meta-not-json",
    ),
    pytest.param(
        lambda: si.Subnetwork({"x": ones(2)}) & si.Subnetwork({"y": ones(2)}),
        ValueError,
        r"same targets; only in the left: \['x'\], only in the right: \['y'\]\. Restrict both "
        r"with `\.select\(names\)`",
        id="algebra-different-targets",
    ),
    pytest.param(
        lambda: (lambda a, b: a | b)(*two(ones(2, 3), ones(3, 2))),
        ValueError,
        r"'x' has shape \(2, 3\) on the left and \(3, 2\) on the right; were they found on "
        r"different models",
        id="algebra-different-shapes",
    ),
    pytest.param(
        lambda: (lambda a, b: a ^ b)(*two(ones(2), ones(2, device="meta"))),
        ValueError,
        r"masks are on cpu and meta; move one with `\.to\(device\)`",
        id="algebra-different-devices",
    ),
    pytest.param(
        lambda: si.Subnetwork({"x": ones(2)}) - ones(2),
        TypeError,
        r"`a - b` needs two Subnetworks, got Subnetwork and Tensor",
        id="algebra-with-a-tensor",
    ),
    pytest.param(
        lambda: si.Subnetwork({"x": ones(2)}).select(["x", "z"]),
        si.NotFoundError,
        r"\['z'\] are not targets of this subnetwork; it has \['x'\]",
        id="select-unknown-target",
    ),
]


@pytest.mark.parametrize("build, error, match", SUBNETWORKS)
def test_subnetwork_refuses(build, error, match):
    assert_refused(TinyMLP(), lambda m: enter(m, build()), error, match)


# -------------------------------------------------------------------- si.find
def no_grad_loss(model, batch):
    with torch.no_grad():
        return mse(model, batch)


FIND = [
    pytest.param(
        dict(loss_fn=lambda batch: batch),
        TypeError,
        r"`loss_fn` is called as loss_fn\(model, batch\), but .*\(batch\) cannot take those two "
        r"positional arguments\. Give it that signature",
        id="loss-fn-takes-one-argument",
    ),
    pytest.param(
        dict(loss_fn="mse"),
        TypeError,
        typed(r"`loss_fn` must be callable as loss_fn\(model, batch\), got 'mse'", "loss_fn"),
        id="loss-fn-not-callable",
    ),
    pytest.param(
        dict(loss_fn=lambda model, batch: (model(batch[0]) - batch[1]) ** 2),
        TypeError,
        r"must return a scalar tensor; at step 0 it returned Tensor\(16, 4\)\. Reduce it, e\.g\. "
        r"with `\.mean\(\)`",
        id="loss-not-scalar",
    ),
    pytest.param(
        dict(loss_fn=lambda model, batch: 0.5),
        TypeError,
        r"must return a scalar tensor; at step 0 it returned float",
        id="loss-not-a-tensor",
    ),
    pytest.param(
        dict(loss_fn=no_grad_loss),
        ValueError,
        r"does not depend on the masks \(requires_grad is False.*do not wrap it in "
        r"torch.no_grad\(\)",
        id="loss-without-grad",
    ),
    pytest.param(
        dict(data=[]),
        ValueError,
        r"`data` yielded no batches\. Pass an iterable of batches \(a list, a DataLoader\)",
        id="empty-data",
    ),
    pytest.param(
        dict(data=iter(())),
        ValueError,
        r"`data` yielded no batches",
        id="empty-iterator",
    ),
    pytest.param(
        dict(steps=0), ValueError, r"`steps` must be a positive int, got 0", id="steps-zero"
    ),
    pytest.param(
        dict(steps=-3), ValueError, r"`steps` must be a positive int, got -3", id="steps-negative"
    ),
    pytest.param(
        dict(steps=2.5),
        (TypeError, ValueError),
        typed(r"`steps` must be a positive int, got 2.5", "steps"),
        id="steps-float",
    ),
    pytest.param(
        dict(device="meta"),
        ValueError,
        r"device='meta' holds no data.*Pass a device that computes",
        id="device-meta",
    ),
    pytest.param(
        dict(log_every=0),
        ValueError,
        r"`log_every` must be a positive int, got 0",
        id="log-every-zero",
    ),
    pytest.param(
        dict(method="gumbel_sigmoud"),
        si.NotFoundError,
        r"Unknown method 'gumbel_sigmoud'\. Registered: \[.*\]\. Did you mean \['gumbel_sigmoid'\]",
        id="unknown-method",
    ),
    pytest.param(
        dict(method=torch.optim.Adam),
        TypeError,
        typed(r"`method` must be a registered method name or a method instance, got", "method"),
        id="method-not-a-method",
    ),
    pytest.param(
        dict(method=si.methods.get("gumbel_sigmoid")(granularity="layer")),
        ValueError,
        r"Unknown granularity 'layer'; expected 'weight', 'neuron' or 'head'",
        id="unknown-granularity",
    ),
]


@pytest.mark.parametrize("overrides, error, match", FIND)
def test_find_refuses(overrides, error, match):
    arguments = dict(method="gumbel_sigmoid", loss_fn=mse, data=DATA, steps=2) | overrides

    def run(model):
        method = arguments.pop("method")
        loss_fn, data = arguments.pop("loss_fn"), arguments.pop("data")
        si.find(model, method, loss_fn, data, progress=False, **arguments)

    assert_refused(TinyMLP(), run, error, match)


@pytest.mark.parametrize("name", LEARNABLE)
def test_find_needs_steps_for_every_learnable_method(name):
    assert_refused(
        TinyMLP(),
        lambda m: si.find(m, name, mse, DATA, progress=False),
        ValueError,
        rf"Method '{name}' needs `steps`, the number of optimisation steps",
    )


def test_create_refuses_unknown_hyperparameter():
    with pytest.raises(
        TypeError,
        match=r"'gumbel_sigmoid' has no hyper-parameter\(s\) \['learning_rate'\]; it "
        r"takes \[.*'lr'.*\]",
    ):
        si.methods.create("gumbel_sigmoid", learning_rate=0.1)


def test_create_refuses_bad_hyperparameter_before_any_model_is_seen():
    with pytest.raises(ValueError, match=r"`lr` must be > 0, got 0\.0\. Pass a value > 0"):
        si.methods.create("hard_concrete", lr=0.0)


BAD_HPARAMS = [
    ("gumbel_sigmoid", dict(temperature=-1.0), ValueError, r"`temperature` must be > 0, got -1"),
    ("gumbel_sigmoid", dict(lr=0.0), ValueError, r"`lr` must be > 0, got 0\.0"),
    ("gumbel_sigmoid", dict(alpha=-1e-4), ValueError, r"`alpha` must be >= 0, got -0\.0001"),
    ("gumbel_sigmoid", dict(mask_samples=0), ValueError, r"`mask_samples` must be >= 1, got 0"),
    ("gumbel_sigmoid", dict(lr="1e-2"), TypeError, typed(r"`lr` must be a number, got str", "lr")),
    ("gumbel_sigmoid", dict(lr=float("nan")), ValueError, r"`lr` must be finite, got nan"),
    ("hard_concrete", dict(lr=-1e-2), ValueError, r"`lr` must be > 0, got -0\.01"),
    (
        "hard_concrete",
        dict(target_density=0.0),
        ValueError,
        r"target_density`? must be in \(0, 1\]",
    ),
    (
        "hard_concrete",
        dict(target_density=1.5),
        ValueError,
        r"target_density`? must be in \(0, 1\]",
    ),
    ("hard_concrete", dict(l0_lambda=-0.1), ValueError, r"`l0_lambda` must be >= 0, got -0\.1"),
    ("hard_concrete", dict(beta=0.0), ValueError, r"`beta` must be > 0, got 0\.0"),
    ("hard_concrete", dict(dataset_size=0), ValueError, r"`dataset_size` must be >= 1, got 0"),
    ("continuous_sparsification", dict(final_temperature=0.0), ValueError, r"`final_temperature`"),
    ("continuous_sparsification", dict(lr=0.0), ValueError, r"`lr` must be > 0"),
    ("continuous_sparsification", dict(weight_lr=-0.1), ValueError, r"`weight_lr` must be > 0"),
    ("continuous_sparsification", dict(l1_lambda=-1e-8), ValueError, r"`l1_lambda` must be >= 0"),
    ("continuous_sparsification", dict(num_rounds=0), ValueError, r"`num_rounds` must be >= 1"),
    (
        "continuous_sparsification",
        dict(num_rounds=1.5),
        TypeError,
        typed(r"`num_rounds` must be an int, got float 1.5", "num_rounds"),
    ),
    (
        "continuous_sparsification_lepori",
        dict(final_temperature=-200.0),
        ValueError,
        r"`final_temperature` must be > 0, got -200\.0\. Pass a value > 0 \(default 200\.0\)",
    ),
    ("continuous_sparsification_lepori", dict(lr=-1.0), ValueError, r"`lr` must be > 0"),
    (
        "continuous_sparsification_lepori",
        dict(l0_lambda=-1.0),
        ValueError,
        r"`l0_lambda` must be >= 0",
    ),
    ("lottery_ticket", dict(lr=0.0), ValueError, r"`lr` must be > 0, got 0\.0"),
    ("lottery_ticket", dict(target_density=0.0), ValueError, r"target_density`? must be in \(0"),
    ("lottery_ticket", dict(prune_fraction=1.0), ValueError, r"prune_fraction must be in \(0, 1\)"),
    (
        "lottery_ticket",
        dict(target_density=1.5),
        ValueError,
        r"target_density`? must be in \(0, 1\]",
    ),
    ("lt_sft", dict(lr=0.0), ValueError, r"'lt_sft': hyper-parameter `lr` must be > 0"),
    ("lt_sft", dict(density=-0.01), ValueError, r"density must be in \[0, 1\], got -0\.01"),
    ("lt_sft", dict(weight_decay=-0.1), ValueError, r"`weight_decay` must be >= 0"),
]


@pytest.mark.parametrize(
    "name, hparams, error, match",
    [
        pytest.param(*case, id=f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items())}")
        for case in BAD_HPARAMS
    ],
)
def test_find_refuses_bad_hyperparameters(name, hparams, error, match):
    # the instance is built directly (not through `create`), so `si.find` must check it
    def run(model):
        si.find(model, si.methods.get(name)(**hparams), mse, DATA, steps=2, progress=False)

    assert_refused(TinyMLP(), run, error, match)


@pytest.mark.parametrize("method,good_calls", [("gumbel_sigmoid", 4), ("lottery_ticket", 2)])
def test_find_stops_at_a_nan_loss_and_keeps_the_last_good_mask(method, good_calls):
    calls = []

    def nan_later(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * float("nan") if len(calls) > good_calls else loss

    model = TinyMLP()
    before = snapshot(model)
    with pytest.raises(si.NonFiniteLossError, match=r"The loss was nan at step \d") as info:
        si.find(model, method, nan_later, DATA, steps=5, progress=False)
    assert info.value.step >= 1
    assert set(info.value.subnetwork.names) == set(si.targets(model))
    assert_bit_exact(model, before)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


# ------------------------------------------------------------ analysis controls
# with a subnetwork that keeps every weight or none, density-matched random controls equal the
# subnetwork and the chance test has zero variance: a p-value would be 1 by construction


def whole(model, keep: bool):
    return si.Subnetwork({n: torch.full(t.shape, keep) for n, t in si.targets(model).items()})


@pytest.mark.parametrize("keep", [False, True], ids=["density-0", "density-1"])
def test_ablation_effect_refuses_a_degenerate_subnetwork(keep):
    assert_refused(
        TinyMLP(),
        lambda m: ablation_effect(m, whole(m, keep), mse, DATA, higher_is_better=False),
        ValueError,
        r"keeps (every|no) weight",
    )


def test_complement_controls_refuse_a_subnetwork_denser_than_half():
    def dense(model):
        sub = whole(model, True)
        masks = dict(sub.masks)
        masks["layers.1.weight"] = masks["layers.1.weight"].clone()
        masks["layers.1.weight"].view(-1)[0] = False
        return si.Subnetwork(masks)

    assert_refused(
        TinyMLP(),
        lambda m: ablation_effect(
            m, dense(m), mse, DATA, higher_is_better=False, control_kind="complement"
        ),
        ValueError,
        r"Cannot keep 48 weights in 'layers.0.weight': it has 0 of the allowed positions\. "
        r"\(Complement sampling needs the subnetwork to keep at most half of every target",
    )


def test_overlap_test_refuses_a_full_subnetwork():
    model = TinyMLP()
    half = si.find(model, "random", mse, DATA, progress=False).subnetwork
    with pytest.raises(ValueError, match=r"keeps every weight"):
        overlap_test(whole(model, True), half)


# ----------------------------------------------------------------- loading
def header(**fields):
    return {"format_version": 1, "names": ["x"], "meta": {}, **fields}


def write(path, tensors, metadata):
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file(tensors, os.fspath(path), metadata={"subnet_interp": text})


def edited(path, edit):
    """Rewrite a saved subnetwork file with ``edit(header, tensors)`` applied."""
    with safe_open(os.fspath(path), framework="pt") as f:
        stored = json.loads(f.metadata()["subnet_interp"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(stored, tensors)
    write(path, tensors, stored)
    return path


def saved(path, packed=False):
    si.Subnetwork({"x": torch.arange(12).view(3, 4) % 3 == 0}).save(path, packed=packed)
    return path


class _Sentinel:
    """Unpickling this creates a directory: proof that a file was unpickled."""

    def __init__(self, where):
        self.where = where

    def __reduce__(self):
        return (os.mkdir, (self.where,))


def pickled(path):
    path.write_bytes(pickle.dumps(_Sentinel(os.fspath(path.parent / "unpickled"))))
    return path


def truncated(path):
    data = saved(path).read_bytes()
    path.write_bytes(data[: len(data) - 7])
    return path


def padding_set(stored, tensors):
    tensors["x"] = tensors["x"].clone()
    tensors["x"][-1] |= 1  # 12 weights in 2 bytes: the last 4 bits are padding


def flip_first(stored, tensors):
    tensors["x"] = tensors["x"].clone()
    tensors["x"][0, 0] = ~tensors["x"][0, 0]


LOAD = [
    pytest.param(
        lambda p: p,
        FileNotFoundError,
        r"No subnetwork file at '.*sub.safetensors'",
        id="missing-file",
    ),
    pytest.param(
        truncated,
        ValueError,
        r"is not a readable safetensors file \(.*\): it is truncated, damaged, or another format.*"
        r"save it again",
        id="truncated-file",
    ),
    pytest.param(
        pickled,
        ValueError,
        r"not a readable safetensors file.*pickles and torch.save files are never opened",
        id="pickle-file",
    ),
    pytest.param(
        lambda p: torch.save({"x": ones(2)}, p) or p,
        ValueError,
        r"not a readable safetensors file.*never opened",
        id="torch-save-file",
    ),
    pytest.param(
        lambda p: save_file({"x": torch.ones(2)}, os.fspath(p), metadata={"k": "v"}) or p,
        ValueError,
        r"has no 'subnet_interp' metadata; it was not written by `Subnetwork.save` \(found "
        r"metadata keys: \['k'\]\)\. Build a Subnetwork from its tensors",
        id="plain-safetensors",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, "{format_version: 1") or p,
        ValueError,
        r"header is not valid JSON.*damaged or edited; save the subnetwork again",
        id="header-not-json",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, [1, ["x"]]) or p,
        ValueError,
        r"header must be a JSON object, got list",
        id="header-not-an-object",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, {"names": ["x"], "meta": {}}) or p,
        ValueError,
        r"the header has no 'format_version' \(found keys \['meta', 'names'\]\)",
        id="missing-format-version",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(format_version=2)) or p,
        ValueError,
        r"format version 2; this subnet_interp reads versions up to 1\. Upgrade subnet_interp",
        id="newer-format-version",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(format_version="1")) or p,
        ValueError,
        r"'format_version' must be an integer from 1 to 1, got '1'",
        id="format-version-a-string",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(format_version=0)) or p,
        ValueError,
        r"'format_version' must be an integer from 1 to 1, got 0",
        id="format-version-zero",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(encoding="rle")) or p,
        ValueError,
        r"encoding 'rle'; this subnet_interp reads \['bool', 'bitpacked'\]\. Upgrade",
        id="unknown-encoding",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(names=["x", "y"])) or p,
        ValueError,
        r"header lists targets \['x', 'y'\] but the file holds tensors \['x'\]",
        id="header-names-a-missing-tensor",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(names="x")) or p,
        ValueError,
        r"'names' must be a list of target names, got 'x'",
        id="names-not-a-list",
    ),
    pytest.param(
        lambda p: write(p, {"x": ones(2)}, header(meta=["method"])) or p,
        ValueError,
        r"'meta' must be a JSON object, got list",
        id="meta-not-an-object",
    ),
    pytest.param(
        lambda p: write(p, {"x": torch.ones(2)}, header()) or p,
        ValueError,
        r"mask 'x' has dtype torch.float32, expected torch.bool",
        id="float-tensor-in-file",
    ),
    pytest.param(
        lambda p: edited(saved(p), lambda h, t: h["shapes"].update(x=[4, 3])),
        ValueError,
        r"mask 'x' has shape \(3, 4\) but the header records \(4, 3\)",
        id="tampered-shape",
    ),
    pytest.param(
        lambda p: edited(saved(p, packed=True), lambda h, t: h["shapes"].update(x=[5, 4])),
        ValueError,
        r"bit-packed mask 'x' is shape \(2,\), dtype torch.uint8.*shape \(5, 4\) packs into a "
        r"1-D torch.uint8 tensor of 3 bytes",
        id="packed-tampered-shape",
    ),
    pytest.param(
        lambda p: edited(saved(p, packed=True), padding_set),
        ValueError,
        r"'x' has padding bits set beyond its 12 weights",
        id="packed-padding-bits-set",
    ),
    pytest.param(
        lambda p: edited(saved(p, packed=True), lambda h, t: h.pop("shapes")),
        ValueError,
        r"'shapes' must give the shape of every target \['x'\], got None",
        id="packed-without-shapes",
    ),
    pytest.param(
        lambda p: edited(saved(p, packed=True), lambda h, t: h["shapes"].update(x=[3, -4])),
        ValueError,
        r"recorded shape of 'x' must be a list of non-negative integers, got \[3, -4\]",
        id="packed-negative-shape",
    ),
    pytest.param(
        lambda p: edited(saved(p), lambda h, t: h.update(encoding="bitpacked")),
        ValueError,
        r"bit-packed mask 'x' is shape \(3, 4\), dtype torch.bool.*1-D torch.uint8 tensor of 2 "
        r"bytes",
        id="bool-file-claims-packed",
    ),
    pytest.param(
        lambda p: edited(saved(p, packed=True), lambda h, t: h["shapes"].update(x=[4, 3])),
        ValueError,
        r"does not match the digest `Subnetwork.save` wrote into it.*save the subnetwork again",
        id="packed-reshaped-same-size",
    ),
    pytest.param(
        lambda p: edited(saved(p), lambda h, t: h["meta"].update(fingerprint="0" * 16)),
        ValueError,
        r"does not match the digest",
        id="meta-edited",
    ),
    pytest.param(
        lambda p: edited(saved(p), flip_first),
        ValueError,
        r"does not match the digest",
        id="mask-bit-flipped",
    ),
]


@pytest.mark.parametrize("make_file, error, match", LOAD)
def test_load_refuses(tmp_path, make_file, error, match):
    path = make_file(tmp_path / "sub.safetensors")
    assert_refused(TinyMLP(), lambda m: enter(m, si.Subnetwork.load(path)), error, match)
    assert not (tmp_path / "unpickled").exists()
