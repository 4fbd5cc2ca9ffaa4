"""FindResult.scores, FindResult.at_density / at_count and Subnetwork.from_scores."""

from __future__ import annotations

import pytest
import torch
from test_methods_conformance import SETTINGS, TASKS

import subnet_interp as si

# Short runs (scores need no convergence): a learnable method's steps and, where its paper
# defaults prune nothing in so few steps, a stronger regulariser so that the cut is not trivial.
SHORT = {
    "gumbel_sigmoid": (20, dict(init_logit=0.1, alpha=1.0, mask_samples=1)),
    "continuous_sparsification_lepori": (40, {}),
    "hard_concrete": (40, {}),
    "continuous_sparsification": (40, {}),
    "lottery_ticket": (20, {}),
    "lt_sft": (20, {}),
    "attribution": (8, {}),
    "magnitude": (None, {}),
    "random": (None, {}),
}
# baselines whose hyper-parameters cut per target: their mask is a per-target cut of the scores
PER_TARGET = {"random"}


_FOUND: dict[str, si.methods.FindResult] = {}


def found(name: str):
    """``find(name)``, run once per test module."""
    if name not in _FOUND:
        _FOUND[name] = find(name)
    return _FOUND[name]


def find(name: str, seed: int = 1, **options):
    steps, extra = SHORT[name]
    setting = SETTINGS[name]
    task = TASKS[setting["task"]](generator=torch.Generator().manual_seed(0))
    method = si.methods.create(name, **{**setting["hparams"], **extra})
    result = si.find(task.model, method, task.loss_fn, task.batches(64), steps=steps,
                     generator=torch.Generator().manual_seed(seed), progress=False, **options)  # fmt: skip
    return result


def assert_threshold_of_scores(result, per_target: bool = False) -> None:
    """The mask keeps the top-scored weights: every kept score is above every removed one,
    and cutting the scores at the mask's own size gives the mask back exactly."""
    sub, scores = result.subnetwork, result.scores
    groups = [[n] for n in sub.names] if per_target else [list(sub.names)]
    for names in groups:
        kept = torch.cat([scores[n][sub[n]] for n in names])
        removed = torch.cat([scores[n][~sub[n]] for n in names])
        if kept.numel() and removed.numel():
            assert kept.min() > removed.max()
    if per_target:
        density = SETTINGS["random"]["hparams"].get("density", 0.2)
        cut = si.Subnetwork.from_scores(scores, density=density, per_target=True)
    else:
        cut = si.Subnetwork.from_scores(scores, count=sub.kept())
    assert cut == sub


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_method_scores_every_weight_and_its_mask_is_their_top(name):
    assert set(SHORT) == set(si.methods.names())
    result = found(name)
    sub = result.subnetwork
    assert list(result.scores) == list(sub.names)
    for target, score in result.scores.items():
        assert score.shape == sub[target].shape
        assert score.dtype == torch.float32 and score.device == sub[target].device
        assert torch.isfinite(score).all()
    assert 0 < sub.kept() < sub.numel() or name == "continuous_sparsification"
    assert_threshold_of_scores(result, per_target=name in PER_TARGET)
    if name == "magnitude":  # per-target scope: the per-target cut of the same scores
        weights = dict(result.scores)
        task = TASKS["frozen"](generator=torch.Generator().manual_seed(0))
        method = si.methods.create("magnitude", scope="per_target")
        per_target = si.find(task.model, method, task.loss_fn, task.batches(8), progress=False)
        assert all(torch.equal(per_target.scores[n], w) for n, w in weights.items())
        assert per_target.subnetwork == si.Subnetwork.from_scores(
            weights, density=0.2, per_target=True
        )


def test_method_specific_scores():
    gumbel = found("gumbel_sigmoid")
    # the keep probability: in (0, 1), above 1/2 exactly where the mask keeps
    for n, s in gumbel.scores.items():
        assert ((s > 0) & (s < 1)).all()
        assert torch.equal(s > 0.5, gumbel.subnetwork[n])
    lepori = found("continuous_sparsification_lepori")
    assert all(torch.equal(s > 0, lepori.subnetwork[n]) for n, s in lepori.scores.items())
    hard = found("hard_concrete")  # P(z > 0) = sigmoid(log_alpha + beta log(zeta / -gamma))
    for n, s in hard.scores.items():
        assert ((s > 0) & (s < 1)).all()
        assert torch.equal(
            s > torch.sigmoid(torch.tensor(2 / 3 * 2.3978952728)), hard.subnetwork[n]
        )
    ticket = found("lottery_ticket")
    for n, s in ticket.scores.items():
        assert (s[ticket.subnetwork[n]] >= 0).all() and (s[~ticket.subnetwork[n]] < 0).all()
        # kept weights score the magnitude of the last round's trained weights (>= 0)
        assert s.min() >= -len(ticket.history["round"])


def test_scores_survive_recomputation_and_low_precision_masks():
    plain = found("hard_concrete")
    recomputed = find("hard_concrete", recompute_masks=True)
    assert recomputed.subnetwork == plain.subnetwork
    assert all(torch.equal(recomputed.scores[n], s) for n, s in plain.scores.items())
    for name in ("hard_concrete", "gumbel_sigmoid"):
        low = find(name, mask_dtype=torch.bfloat16)
        assert all(s.dtype == torch.float32 for s in low.scores.values())
        assert_threshold_of_scores(low)


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_per_gate_scores_are_expanded_to_every_weight(granularity):
    task = TASKS["frozen"](generator=torch.Generator().manual_seed(0))
    method = si.methods.create("hard_concrete", granularity=granularity, droprate_init=0.5)
    result = si.find(task.model, method, task.loss_fn, task.batches(64), steps=5,
                     generator=torch.Generator().manual_seed(1), progress=False)  # fmt: skip
    for n, target in si.targets(task.model).items():
        score = result.scores[n]
        assert score.shape == target.shape == result.subnetwork[n].shape
        gate = target.gate_shape(granularity)
        # one value per gate: reducing to the gate shape and expanding back changes nothing
        reduced = score.amax(dim=[d for d, s in enumerate(gate) if s == 1], keepdim=True)
        assert torch.equal(reduced.expand(target.shape), score)
    assert_threshold_of_scores(result)


def test_head_scores_on_a_transformer():
    from _hf_models import VOCAB, gpt2

    tokens = torch.randint(VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))

    def loss(m, batch):
        logits = m(batch).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )

    method = si.methods.create("hard_concrete", granularity="head")
    result = si.find(gpt2(), method, loss, [tokens], targets="blocks.*.attn.W_Q", steps=2,
                     progress=False)  # fmt: skip
    for score in result.scores.values():
        per_head = score.flatten(1)
        assert torch.equal(per_head, per_head[:, :1].expand_as(per_head))
        assert len(set(per_head[:, 0].tolist())) == per_head.shape[0]  # the heads differ
    assert_threshold_of_scores(result)


# ------------------------------------------------------------- exact sizes


def scores_of(*shapes, fill=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        f"t{i}": torch.full(s, float(fill)) if fill is not None else torch.rand(s, generator=gen)
        for i, s in enumerate(shapes)
    }


@pytest.mark.parametrize("fill", [None, 1.0])  # distinct scores, then all tied
def test_from_scores_keeps_exactly_the_requested_number(fill):
    scores = scores_of((3, 5), (7,), (2, 2, 2), fill=fill)  # 15 + 7 + 8 = 30 weights
    for density in (0.0, 0.01, 0.05, 1 / 3, 0.5, 0.99, 1.0):
        sub = si.Subnetwork.from_scores(scores, density=density)
        assert sub.kept() == round(density * 30)
        per = si.Subnetwork.from_scores(scores, density=density, per_target=True)
        assert [int(per[n].sum()) for n in per] == [round(density * n) for n in (15, 7, 8)]
    for count in range(31):
        assert si.Subnetwork.from_scores(scores, count=count).kept() == count
    if fill is not None:  # ties: the first weights by position, deterministically
        sub = si.Subnetwork.from_scores(scores, count=17)
        assert sub["t0"].all() and int(sub["t1"].sum()) == 2 and sub["t1"][:2].all()
        assert not sub["t2"].any()
        assert sub == si.Subnetwork.from_scores(scores, count=17)


def test_from_scores_keeps_the_highest_scores():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([[0.7, -1.0], [0.2, 0.95]])}
    sub = si.Subnetwork.from_scores(scores, count=3)
    assert sub["a"].tolist() == [False, True, False]
    assert sub["b"].tolist() == [[True, False], [False, True]]
    assert sub.meta["cut_from_scores"] is True and sub.meta["count_requested"] == 3
    per = si.Subnetwork.from_scores(scores, density=0.5, per_target=True, meta={"note": "x"})
    assert per["a"].tolist() == [False, True, True]  # round(0.5 * 3) = 2
    assert per["b"].tolist() == [[True, False], [False, True]]
    assert dict(per.meta) == {
        "note": "x",
        "cut_from_scores": True,
        "density_requested": 0.5,
        "count_requested": None,
        "per_target": True,
    }


def test_at_density_and_at_count():
    result = found("hard_concrete")
    total = result.subnetwork.numel()
    for density in (0.0, 0.05, 0.5, 1.0):
        sub = result.at_density(density)
        assert sub.kept() == round(density * total)
        assert sub.meta["density_requested"] == density and sub.meta["cut_from_scores"] is True
        assert sub.meta["fingerprint"] == result.subnetwork.meta["fingerprint"]
        assert sub.meta["method"] == "hard_concrete"
    assert result.at_count(result.subnetwork.kept()) == result.subnetwork
    assert result.at_count(7).kept() == 7 and result.at_count(7).meta["count_requested"] == 7
    per = result.at_density(0.25, per_target=True)
    assert [int(m.sum()) for m in per.masks.values()] == [
        round(0.25 * m.numel()) for m in per.masks.values()
    ]
    smaller = result.at_density(0.05)
    assert (smaller - result.at_density(0.5)).kept() == 0  # nested: the top of one ranking
    with si.masked(TASKS["frozen"](generator=torch.Generator().manual_seed(0)).model, smaller):
        pass  # the copied fingerprint is accepted
    bare = si.methods.FindResult(result.subnetwork, {})
    with pytest.raises(ValueError, match="has no `scores`"):
        bare.at_density(0.5)


def typed(match: str, parameter: str) -> str:
    """``match``, or the runtime type checker's message naming ``parameter`` (the test suite
    checks annotations, see conftest.py, and may refuse a wrong type before the library does;
    the library's own message is checked where the annotation lets the value through)."""
    return rf"(?s)(?:{match})|(?:Type-check error whilst checking .*Called with .*'{parameter}':)"


def test_from_scores_errors_say_what_was_given_and_how_to_fix():
    scores = scores_of((4,))
    cases = [
        (dict(), ValueError, "Pass the size of the mask: density=.* or count=.*got neither"),
        (dict(density=0.5, count=2), ValueError, r"density=0\.5 and count=2; drop one"),
        (dict(count=2, per_target=True), ValueError, "got count=2.*pass density="),
        (dict(density=1.5), ValueError, r"`density` must be a number in \[0, 1\], got 1\.5"),
        (dict(count=True), ValueError, r"`count` must be an int in \[0, 4\], got True"),
        (dict(count=5), ValueError, r"\[0, 4\], got 5"),
        (dict(count=-1), ValueError, r"\[0, 4\], got -1"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            si.Subnetwork.from_scores(scores, **kwargs)
    wrong_types = [  # the library's message, or the type checker's where it runs first
        (dict(density="0.5"), r"`density` must be a number in \[0, 1\], got '0\.5'", "density"),
        (dict(count=2.5), r"`count` must be an int in \[0, 4\], got 2\.5", "count"),
        (
            dict(density=0.5, per_target="yes"),
            "`per_target` must be True or False, got 'yes'",
            "per_target",
        ),  # fmt: skip
    ]
    for kwargs, message, parameter in wrong_types:
        with pytest.raises((TypeError, ValueError), match=typed(message, parameter)):
            si.Subnetwork.from_scores(scores, **kwargs)
    with pytest.raises(TypeError, match=r"must be a float tensor, got torch\.bool"):
        si.Subnetwork.from_scores({"a": torch.ones(3, dtype=torch.bool)}, count=1)
    with pytest.raises(
        (TypeError, ValueError), match=typed("non-empty mapping .* got list", "scores")
    ):
        si.Subnetwork.from_scores([torch.ones(3)], count=1)
    with pytest.raises(ValueError, match="NaN"):
        si.Subnetwork.from_scores({"a": torch.tensor([0.0, float("nan")])}, count=1)


def test_lottery_ticket_scores_resume_from_its_checkpoints(tmp_path):
    from subnet_interp import _checkpoint

    def run(folder):
        task = TASKS["teacher"](generator=torch.Generator().manual_seed(0))
        method = si.methods.create(
            "lottery_ticket", lr=1e-2, rounds=3, target_density=None, retrain_final=False,
            checkpoint_dir=str(folder),
        )  # fmt: skip
        return si.find(task.model, method, task.loss_fn, task.batches(64), steps=8,
                       progress=False)  # fmt: skip

    full = run(tmp_path / "full")
    first = _checkpoint.round_file(tmp_path / "full", 1)
    tensors, header = _checkpoint.read_file(first)
    _checkpoint.write(_checkpoint.round_file(tmp_path / "resumed", 1), tensors, header)
    resumed = run(tmp_path / "resumed")  # rounds 2 and 3 after the saved round 1
    assert resumed.subnetwork == full.subnetwork
    assert all(torch.equal(resumed.scores[n], s) for n, s in full.scores.items())
    # a checkpoint written before scores existed: the mask is unchanged, still their top
    old = {k: v for k, v in tensors.items() if k.startswith(("keep/", "rewind/"))}
    _checkpoint.write(_checkpoint.round_file(tmp_path / "old", 1), old, header)
    from_old = run(tmp_path / "old")
    assert from_old.subnetwork == full.subnetwork
    assert_threshold_of_scores(from_old)
