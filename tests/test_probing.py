"""Subnetwork probing (Cao, Sanh & Rush 2021): the probe finds a label at the layer that
computes it, not at the layer before and not in a random-init model; reading hidden states
works for every family; the model is left bit-exactly unchanged."""

from __future__ import annotations

import pytest
import torch
from _util import assert_bit_exact, snapshot

import subnet_interp as si
from subnet_interp import probing, tasks
from subnet_interp.probing import (
    Probe,
    complexity_curve,
    probe_accuracy,
    probe_baselines,
    read_hidden,
    reinitialized,
    subnetwork_probe,
    train_probe,
)
from subnet_interp.tasks import previous_token_classes

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, CLASSES, D = 16, 12, 4, 32
FIRST_LABEL = 4  # the first positions see too few tokens to be informative either way


def previous_token_batches(n, batch_size, seed):
    """Token-level task: the label of position t is the class (token mod 4) of token t-1."""
    return previous_token_classes(
        n, batch_size, vocab=VOCAB, seq_len=SEQ, classes=CLASSES, first_label=FIRST_LABEL,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


TRAIN = previous_token_batches(16, 32, 0)
TEST = previous_token_batches(4, 64, 1)


def tiny_gpt2():
    return tasks.tiny_gpt2(VOCAB, n_layer=2, n_head=4, d_model=D, n_positions=SEQ)


def previous_token_model():
    """Block 0 stays at its random init (frozen); block 1 learns to output the previous token's
    class, so the label is decodable after block 1 and not after block 0."""
    model = tiny_gpt2()
    frozen = list(model.transformer.h[0].parameters())
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(200):
        tokens, labels = TRAIN[step % len(TRAIN)]
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in frozen:
        p.requires_grad_(True)
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return previous_token_model()


def test_probe_is_accurate_at_the_computing_layer_and_near_chance_on_random_init(trained):
    before = snapshot(trained)
    found = probe_baselines(trained, 1, TRAIN, CLASSES, steps=100, eval_data=TEST, progress=False)
    earlier = subnetwork_probe(
        trained, 0, TRAIN, CLASSES, steps=100, eval_data=TEST, progress=False
    )
    assert_bit_exact(trained, before)
    chance = 1 / CLASSES
    assert found.subnetwork.accuracy > 0.95
    assert found.full_model.accuracy > 0.9
    assert found.random_init.accuracy < chance + 0.1
    assert earlier.accuracy < chance + 0.1
    # a small subnetwork of blocks 0-1 suffices (Cao et al.'s "low complexity")
    sub = found.subnetwork.subnetwork
    assert set(sub.names) == set(si.targets(trained, include=["blocks.0.*", "blocks.1.*"]))
    assert sub.density() < 0.3
    assert found.full_model.subnetwork is None and found.full_model.density == 1.0
    assert found.subnetwork.history["loss"][-1] < found.subnetwork.history["loss"][0]
    # the accuracy is the probe's through the subnetwork, as probe_accuracy measures it
    again = probe_accuracy(trained, sub, found.subnetwork.probe, 1, TEST)
    assert again == found.subnetwork.accuracy


def test_sequence_level_at_a_position_and_a_hidden_layer_probe(trained):
    # one label per sequence: the previous token's class at the last position
    data = [(tokens, labels[:, -1]) for tokens, labels in TRAIN]
    test = [(tokens, labels[:, -1]) for tokens, labels in TEST]
    at_last = subnetwork_probe(
        trained, 1, data, CLASSES, steps=60, level="sequence", position=-1, eval_data=test,
        hidden=16, progress=False,
    )  # fmt: skip
    assert at_last.accuracy > 0.9
    assert at_last.level == "sequence" and at_last.position == -1
    assert [type(m) for m in at_last.probe.net] == [
        torch.nn.Linear,
        torch.nn.ReLU,
        torch.nn.Linear,
    ]
    assert at_last.probe.net[0].out_features == 16
    with pytest.raises(ValueError, match=r"labels must be \[batch, seq\]"):
        subnetwork_probe(trained, 1, data, CLASSES, steps=1, progress=False)


def test_sequence_mean_pools_over_the_attention_mask():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    attention = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = probing.probe_features(hidden, {"attention_mask": attention}, "sequence", None)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    torch.testing.assert_close(
        probing.probe_features(hidden, hidden, "sequence", None), hidden.mean(1)
    )
    torch.testing.assert_close(probing.probe_features(hidden, hidden, "sequence", 0), hidden[:, 0])


def test_sequence_level_mean_with_mapping_inputs(trained):
    """Sequences whose tokens all share one class: the class is in the mean of any layer."""
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(8):
        labels = torch.randint(0, CLASSES, (32,), generator=gen)
        tokens = labels[:, None] + CLASSES * torch.randint(0, 4, (32, SEQ), generator=gen)
        attention = torch.ones(32, SEQ, dtype=torch.long)
        attention[:16, -3:] = 0
        batches.append(({"input_ids": tokens, "attention_mask": attention}, labels))
    result = train_probe(trained, 0, batches, CLASSES, steps=100, level="sequence", lr=1e-2)
    assert result.accuracy > 0.9


def test_token_labels_ignore_minus_100_and_count_only_labelled_tokens(trained):
    probe = Probe(D, CLASSES)
    tokens, labels = TEST[0]
    with torch.no_grad():
        hidden = read_hidden(trained, 1, tokens)
        predicted = probe(hidden).argmax(-1)
    keep = labels != -100
    expected = float((predicted[keep] == labels[keep]).float().mean())
    got = probe_accuracy(trained, None, probe, 1, [(tokens, labels)])
    assert got == pytest.approx(expected)


# ------------------------------------------------------------------ reading hidden states
def _family(kind):
    from _hf_models import BUILDERS, PIXELS, TOKENS, encoder

    if kind in BUILDERS:
        return BUILDERS[kind](), TOKENS
    if kind == "vit":
        return encoder("vit_cls"), PIXELS
    model = encoder({"bert": "bert_mlm", "roberta": "roberta"}[kind])
    return model, {"input_ids": TOKENS % 38 + 2, "attention_mask": torch.ones_like(TOKENS)}


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "bert", "roberta", "vit"])
def test_read_hidden_is_the_hidden_state_after_the_block_also_masked(kind):
    model, inputs = _family(kind)
    before = snapshot(model)

    def reference():
        kwargs = inputs if isinstance(inputs, dict) else {"pixel_values": inputs}
        if kind in ("gpt2", "neox", "llama"):
            kwargs = {"input_ids": inputs}
        return model(**kwargs, output_hidden_states=True).hidden_states[1]

    def run():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    with torch.no_grad():
        expected_full = reference()
        hooks = [len(m._forward_hooks) for m in model.modules()]  # transformers' own, now set
        full_output = run()
        torch.testing.assert_close(read_hidden(model, 0, inputs), expected_full)
        masks = {
            name: torch.rand(t.shape, generator=torch.Generator().manual_seed(1)) < 0.5
            for name, t in si.targets(model).items()
        }
        with si.masked(model, masks):
            got, expected = read_hidden(model, 0, inputs), reference()
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, expected_full)
        # the stopped forward passes leave nothing behind: no hooks, the same outputs
        again = run()
    for left, right in zip(full_output.values(), again.values(), strict=True):
        if isinstance(left, torch.Tensor):
            torch.testing.assert_close(left, right)
    assert [len(m._forward_hooks) for m in model.modules()] == hooks
    assert_bit_exact(model, before)


def test_read_hidden_through_transformer_bridge_and_nnsight():
    tl_sources = pytest.importorskip("transformer_lens.model_bridge.sources")
    nnsight = pytest.importorskip("nnsight")
    from _hf_models import BUILDERS, TOKENS

    hf = BUILDERS["gpt2"]()
    with torch.no_grad():
        expected = hf(TOKENS, output_hidden_states=True).hidden_states[1]
    bridge = tl_sources.build_bridge_from_module(
        BUILDERS["gpt2"](), "GPT2LMHeadModel", hf_config=hf.config
    ).eval()
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS)
        hidden = read_hidden(bridge, 0, TOKENS)
        torch.testing.assert_close(hidden, cache["blocks.0.hook_resid_post"])
        torch.testing.assert_close(hidden, expected)
        torch.testing.assert_close(bridge(TOKENS), logits)  # the stopped pass left no trace
    wrapped = nnsight.NNsight(BUILDERS["gpt2"]())
    with torch.no_grad():
        torch.testing.assert_close(read_hidden(wrapped, 0, TOKENS), expected)
    # the random-init control re-initialises the transformers model inside either wrapper
    for model in (bridge, wrapped):
        fresh = reinitialized(model)
        assert type(fresh) is type(model) and si.fingerprint(fresh) != si.fingerprint(model)
    # a short subnetwork probe through the bridge trains and restores it
    labels = TOKENS % 2
    before = snapshot(bridge)
    result = subnetwork_probe(bridge, 1, [(TOKENS, labels)], 2, steps=3, progress=False)
    assert result.subnetwork.meta["family"] == "transformer_lens.TransformerBridge"
    assert_bit_exact(bridge, before)


def test_capture_hidden_records_during_your_own_forward(trained):
    tokens = TEST[0][0]
    with torch.no_grad(), probing.capture_hidden(trained, 1) as captured:
        logits = trained(tokens).logits
    assert logits.shape[-1] == VOCAB  # the whole forward ran
    torch.testing.assert_close(captured.value, read_hidden(trained, 1, tokens).detach())


def test_plain_module_is_probed_by_module_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        x = torch.randn(64, 4, generator=gen)
        data.append((x, (x[:, 0] > 0).long()))
    before = snapshot(model)
    result = subnetwork_probe(model, "1", data, 2, steps=150, level="sequence", progress=False)
    assert result.accuracy > 0.85
    assert set(result.subnetwork.names) == {"0.weight", "2.weight"}
    assert_bit_exact(model, before)
    with pytest.raises(TypeError, match="Pass the path of the module"):
        read_hidden(model, 0, data[0][0])


# ------------------------------------------------------------------ baselines and curve
def test_reinitialized_uses_the_model_init_and_leaves_model_and_rng_alone(trained):
    before = snapshot(trained)
    rng = torch.random.get_rng_state()
    fresh = reinitialized(trained, torch.Generator().manual_seed(5))
    same = reinitialized(trained, torch.Generator().manual_seed(5))
    other = reinitialized(trained, torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_bit_exact(trained, before)
    assert_bit_exact(same, snapshot(fresh))
    assert not torch.equal(fresh.transformer.wte.weight, other.transformer.wte.weight)
    assert not torch.equal(fresh.transformer.wte.weight, trained.transformer.wte.weight)
    # transformers' GPT-2 init: N(0, 0.02), norms at 1, biases at 0, tied unembedding
    assert fresh.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(fresh.transformer.ln_f.weight, torch.ones(D))
    assert torch.equal(fresh.transformer.h[1].attn.c_attn.bias, torch.zeros(3 * D))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
    assert not torch.equal(reinitialized(plain)[0].weight, plain[0].weight)


def test_complexity_curve_trades_density_for_strength(trained):
    points = complexity_curve(
        trained, 1, TRAIN, CLASSES, strengths=(0.01, 30.0), steps=60, eval_data=TEST[:1],
        progress=False,
    )  # fmt: skip
    (dense, dense_accuracy), (sparse, _) = points
    assert dense > sparse
    assert dense_accuracy > 0.9


# ------------------------------------------------------------------ errors
def test_errors_say_what_was_given_and_what_is_expected(trained):
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        subnetwork_probe(trained, 1, TRAIN, CLASSES, steps=1, level="word")
    with pytest.raises(ValueError, match="level='sequence'"):
        subnetwork_probe(trained, 1, TRAIN, CLASSES, steps=1, position=0)
    with pytest.raises(IndexError, match="has 2 blocks"):
        read_hidden(trained, 2, TEST[0][0])
    with pytest.raises(IndexError, match=r"\(0 \.\. 1\)"):
        subnetwork_probe(trained, -1, TRAIN, CLASSES, steps=1)
    with pytest.raises(ValueError, match="learnable-mask method"):
        subnetwork_probe(trained, 1, TRAIN, CLASSES, steps=1, method="magnitude")
    with pytest.raises(si.NotFoundError, match="Unknown method"):
        subnetwork_probe(trained, 1, TRAIN, CLASSES, steps=1, method="hard_concret")
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pairs"):
        subnetwork_probe(trained, 1, [TEST[0][0]], CLASSES, steps=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        Probe(D, 1)
    with pytest.raises(si.NotFoundError, match="not a sub-module"):
        read_hidden(trained, "transformer.h.7", TEST[0][0])
