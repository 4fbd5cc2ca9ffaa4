"""si.testing: the conformance kit passes a method written outside the package and each
model family, and fails methods and models that break the contract, naming the check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import subnet_interp as si
from subnet_interp.testing import ConformanceError


@dataclass(frozen=True)
class SigmoidL1(si.methods.MaskMethod):
    """A method defined outside the package: one logit per weight, the forward pass uses
    ``sigmoid(logit)`` as a soft gate, an L1 penalty on the gates pushes unneeded ones to zero,
    and the mask keeps ``logit > 0`` (soft-mask pruning in the spirit of Mozer & Smolensky 1989,
    "Skeletonization"; written here as the minimal example of si.methods.MaskMethod)."""

    name = "sigmoid_l1"

    lr: float = 5e-2
    l1_lambda: float = 1e-2
    mask_init: float = 3.0
    granularity: str = "weight"

    def init_parameters(self, target, gate_shape, weight, generator) -> Tensor:
        return torch.full(gate_shape, self.mask_init, device=weight.device)

    def sample(self, params: Tensor, state, generator: torch.Generator) -> Tensor:
        return torch.sigmoid(params)

    def penalty(self, params: Sequence[Tensor], weights: Sequence[int], state) -> Tensor:
        total = sum(w * p.numel() for p, w in zip(params, weights, strict=True))
        kept = sum(w * torch.sigmoid(p.float()).sum() for p, w in zip(params, weights, strict=True))
        return self.l1_lambda * kept / total

    def final_mask(self, params: Tensor) -> Tensor:
        return params > 0

    def optimizer(self, params: Sequence[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr)


def test_a_method_defined_outside_the_package_passes_with_one_call():
    report = si.testing.check_method(SigmoidL1)
    assert report.method == "sigmoid_l1" and report.task == "frozen"
    assert report.passed == (
        "declaration", "bad_hparams", "recovery", "restore", "meta", "result", "save_load",
        "determinism", "checkpoint",
    )  # fmt: skip
    assert report.iou >= 0.9
    assert "sigmoid_l1" not in si.methods.names()  # registration is not needed


@dataclass(frozen=True)
class GlobalNoise(SigmoidL1):
    """SigmoidL1 with noise from torch's global generator instead of the one
    si.find passes: two runs with the same seed differ."""

    name = "global_noise"

    def sample(self, params: Tensor, state, generator: torch.Generator) -> Tensor:
        return super().sample(params + 0.01 * torch.randn(params.shape), state, generator)


@dataclass(frozen=True)
class Ignorant(SigmoidL1):
    """Never learns: gates start where the sigmoid is flat, so no gradient moves them."""

    name = "ignorant"
    mask_init: float = 50.0


def test_a_method_that_ignores_the_seed_fails_determinism():
    with pytest.raises(ConformanceError, match=r"\[determinism\] global_noise: two runs"):
        si.testing.check_method(GlobalNoise)


def test_a_method_that_keeps_everything_fails_recovery():
    with pytest.raises(ConformanceError, match=r"\[recovery\] ignorant: IoU with the planted"):
        si.testing.check_method(Ignorant, steps=20)


def test_a_hyperparameter_without_default_fails_declaration():
    @dataclass(frozen=True)
    class Missing(si.methods.MaskMethod):
        """Missing a default."""

        name = "missing"
        lr: float

    with pytest.raises(ConformanceError, match=r"\[declaration\] missing: hyper-parameters"):
        si.testing.check_method(Missing)
    with pytest.raises(ConformanceError, match="a subclass of si.methods.Method"):
        si.testing.check_method(dict)


def test_a_method_that_coerces_a_bad_hyperparameter_fails_bad_hparams():
    @dataclass(frozen=True)
    class Clamping(SigmoidL1):
        """Coerces its hyper-parameter instead of refusing it."""

        name = "clamping"

        def __post_init__(self):
            object.__setattr__(self, "lr", 5e-2)

    with pytest.raises(ConformanceError, match=r"\[bad_hparams\] clamping: `lr='not a number'`"):
        si.testing.check_method(Clamping)


# ------------------------------------------------------------------------------ adapters


class TwoLayers(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(6, 8), nn.Linear(8, 3)
        if unused:
            self.spare = nn.Linear(8, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


INPUTS = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))


def test_plain_module_passes_check_adapter():
    report = si.testing.check_adapter(TwoLayers(), INPUTS)
    assert report.targets == ("first.weight", "second.weight")
    assert report.passed == (
        "targets", "layouts", "identity", "effect", "by_hand", "restore", "restore_on_error",
        "fingerprint", "find",
    )  # fmt: skip


def test_a_weight_the_forward_never_reads_fails_find():
    with pytest.raises(ConformanceError, match=r"\[find\].*\['spare.weight'\].*include="):
        si.testing.check_adapter(TwoLayers(unused=True), INPUTS)
    report = si.testing.check_adapter(
        TwoLayers(unused=True), INPUTS, include=["first.*", "second.*"]
    )
    assert report.targets == ("first.weight", "second.weight")


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama"])
def test_hf_families_pass_check_adapter(kind):
    pytest.importorskip("transformers")
    from _hf_models import BUILDERS, TOKENS

    report = si.testing.check_adapter(BUILDERS[kind](), TOKENS)
    assert report.adapter and "blocks.1.attn.W_O" in report.targets


def test_bridge_and_nnsight_pass_check_adapter():
    tl_bridge = pytest.importorskip("transformer_lens.model_bridge.sources")
    nnsight = pytest.importorskip("nnsight")
    from _hf_models import TOKENS, gpt2

    hf = gpt2()
    bridge = tl_bridge.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config).eval()
    si.testing.check_adapter(bridge, TOKENS)
    si.testing.check_adapter(nnsight.NNsight(gpt2()), TOKENS)


@pytest.mark.parametrize("include", ["*", ["embed.*", "blocks.0.*"]])
def test_a_tied_embedding_and_unembedding_pass_check_adapter(include):
    # GPT-2 ties lm_head.weight to wte.weight; si.masked masks each module's read with its own
    # target's mask, and the hand reference must too (not both masks on the one tensor, nor the
    # embedding's mask at the untargeted unembedding)
    pytest.importorskip("transformers")
    from _hf_models import TOKENS, gpt2

    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    report = si.testing.check_adapter(model, TOKENS, include=include)
    assert "embed.W_E" in report.targets and report.passed[-1] == "find"
    assert model.lm_head.weight is model.transformer.wte.weight


class Opposed(nn.Module):
    """``out = a(x) - b(x)`` with positive weights and inputs: every gradient of a's mask has
    one sign and every gradient of b's the other."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
            self.b.weight.copy_(torch.tensor([[0.5, 0.25, 0.125]]))

    def forward(self, x):
        return self.a(x) - self.b(x)


def test_targets_whose_gradients_all_share_one_sign_pass_find():
    report = si.testing.check_adapter(Opposed(), torch.ones(1, 3))
    assert report.targets == ("a.weight", "b.weight") and report.passed[-1] == "find"
