"""Ground truth from tracr: a compiled RASP program's known heads are what a mask keeps."""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("tracr")
pytest.importorskip("transformer_lens")

import subnet_interp as si  # noqa: E402
from subnet_interp.analysis import compare_to_circuit, head_node, head_scores, mlp_node  # noqa: E402
from subnet_interp.tasks.tracr import compile_program, demo_program, plant_noise  # noqa: E402
from subnet_interp.tasks.tracr_library import program_names  # noqa: E402


def program():
    return demo_program()


@pytest.fixture(scope="module")
def compiled():
    model = compile_program(program(), {"a", "b", "c"}, max_seq_len=6)
    tokens = model.encode([list(s) for s in itertools.product("abc", repeat=6)])
    with torch.no_grad():
        logits = model.bridge(tokens)
    top2 = logits.topk(2, dim=-1).values
    defined = (top2[..., 0] - top2[..., 1]) > 1e-3  # undefined RASP values tie exactly
    defined[:, 0] = False
    return model, tokens, logits, defined


def test_the_bridge_computes_what_tracr_computes(compiled):
    model, tokens, logits, defined = compiled
    reference = model.reference(tokens)
    assert defined.float().mean() > 0.5
    assert torch.equal(logits.argmax(-1)[defined], reference[defined])
    # three parallel reads in layer 0 and one in layer 1; both MLPs compute a SequenceMap
    expected = {head_node(0, h) for h in range(3)} | {head_node(1, 0), mlp_node(0), mlp_node(1)}
    assert model.circuit.nodes == expected
    assert si.fingerprint(model.bridge)  # the adapters handle the converted model


def test_a_mask_trained_on_the_task_recovers_the_compiled_heads(compiled):
    model, tokens, _, defined = compiled
    reference = model.reference(tokens)
    planted = plant_noise(model, 0.3)
    assert planted.nodes == {head_node(1, 1), head_node(1, 2)}
    target = reference.masked_fill(~defined, -100)

    def loss_fn(bridge, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(bridge(x).flatten(0, 1), y.flatten())

    result = si.find(
        model.bridge,
        si.methods.create("gumbel_sigmoid", per_example_penalty=False),
        loss_fn,
        [(tokens[i : i + 243], target[i : i + 243]) for i in range(0, len(tokens), 243)],
        steps=300,
        progress=False,
    )
    scores = head_scores(model.bridge, result.subnetwork, weighted=True)
    comparison = compare_to_circuit(scores, model.circuit)
    assert comparison.auc == 1.0 and comparison.precision_at_k == 1.0
    with si.masked(model.bridge, result.subnetwork), torch.no_grad():
        predicted = model.bridge(tokens).argmax(-1)
    with torch.no_grad():
        noisy = model.bridge(tokens).argmax(-1)
    accuracy = (predicted[defined] == reference[defined]).float().mean()
    # the mask keeps the program working and drops most of the planted noise that hurts it
    assert accuracy > 0.95 and accuracy > (noisy[defined] == reference[defined]).float().mean()


@pytest.mark.parametrize("name", program_names())
def test_each_library_program_compiles_to_a_bridge_that_computes_what_tracr_computes(name):
    from subnet_interp.tasks.tracr_library import library_task

    # one compile per program (2-4 s each on a free CPU); few inputs per length
    task = library_task(name, noise=0.1, max_per_length=64)
    assert task.batches and all(len(set(b[0].shape[1:])) == 1 for b in task.batches)
    defined = sum(int(b[2].sum()) for b in task.batches)
    total = sum(b[2][:, 1:].numel() for b in task.batches)
    assert defined > 0.5 * total
    # the compiled weights alone are the compiled model: the noise sits where it had zeros
    compiled = si.Subnetwork(task.used_weights)
    with si.masked(task.bridge, compiled), torch.no_grad():
        for tokens, target, keep in task.batches:
            out = task.bridge(tokens)
            if task.numerical:
                assert (out[..., 0][keep] - target[keep]).abs().max() < 1e-4
            else:
                assert torch.equal(out.argmax(-1)[keep], target[keep])
    assert task.evaluate(compiled)["accuracy"] == 1.0
    assert not (task.planted.nodes & task.model.circuit.nodes)
    assert task.model.circuit.nodes and torch.all(task.live_neurons >= task.used_neurons)
    assert task.used_neurons.any()


def test_a_library_task_does_not_depend_on_what_was_compiled_before():
    from subnet_interp.tasks.tracr_library import library_task

    first = library_task("shuffle_dyck2")
    library_task("reverse")  # moves tracr's process-wide label counter on
    again = library_task("shuffle_dyck2")
    assert si.fingerprint(first.model.bridge) == si.fingerprint(again.model.bridge)


def test_inert_noise_leaves_the_program_exact_and_writes_only_spare_dimensions():
    from subnet_interp.tasks.tracr_library import INERT_SPARE_DIMS, library_task

    task = library_task("frac_prevs", noise=1.0, inert=True, max_per_length=32)
    assert task.model.spare_dims == INERT_SPARE_DIMS and task.planted.nodes
    assert task.evaluate()["accuracy"] == 1.0  # noise at the compiled weights' scale, no effect
    d_tracr = task.bridge.cfg.d_model - INERT_SPARE_DIMS
    for name, live in task.live_weights.items():
        noise = live & ~task.used_weights[name]
        if name.endswith(("W_O", "W_out")) and noise.any():
            assert not noise[..., :d_tracr].any() and noise[..., d_tracr:].any()
    # a model with no spare dimensions cannot take inert noise, and is left as it was
    model = compile_program(program(), {"a", "b", "c"}, max_seq_len=6)
    before = si.fingerprint(model.bridge)
    with pytest.raises(ValueError, match="spare_dims"):
        plant_noise(model, 1.0, inert=True)
    assert si.fingerprint(model.bridge) == before
    with pytest.raises(ValueError, match="spare_dims must be >= 0, got -1"):
        compile_program(program(), {"a", "b", "c"}, max_seq_len=6, spare_dims=-1)


def test_needed_truth_refuses_a_model_that_does_not_compute_its_program():
    from subnet_interp.tasks._tracr_truth import needed_truth
    from subnet_interp.tasks.tracr_library import library_task

    task = library_task("frac_prevs", noise=0.1, max_per_length=32)  # noise breaks frac_prevs
    assert task.evaluate()["accuracy"] < 1.0
    before = si.fingerprint(task.bridge)
    with pytest.raises(ValueError, match="does not compute the program.*before planting"):
        needed_truth(task)
    assert si.fingerprint(task.bridge) == before
    assert task.truth()["heads"]  # the task's own truth is taken on the clean weights


def test_needed_truth_is_what_single_ablation_breaks_and_recovery_scores_it():
    from subnet_interp.tasks.tracr_library import library_task

    task = library_task("reverse", noise=1.0, inert=True, max_per_length=32)
    before = si.fingerprint(task.bridge)
    truth = task.truth()
    assert si.fingerprint(task.bridge) == before  # computed on a copy
    assert truth["heads"] <= task.model.circuit.nodes and truth["heads"]
    needed_neurons = int(truth["neurons"].sum())
    assert 0 < needed_neurons < int(task.used_neurons.sum())  # lookup-table rows never used
    assert torch.all(task.used_neurons >= truth["neurons"])
    for name, needed in truth["weights"].items():
        assert torch.all(task.used_weights[name] >= needed)
    # keeping exactly the needed weights keeps the program; dropping one needed weight breaks it
    needed = si.Subnetwork(truth["weights"])
    assert task.evaluate(needed)["accuracy"] == 1.0
    recovery = task.recovery(needed)
    assert recovery == {"head_auc": 1.0, "neuron_auc": 1.0, "weight_auc": 1.0}
    name = next(n for n, w in truth["weights"].items() if w.any())
    broken = {k: v.clone().contiguous() for k, v in truth["weights"].items()}
    broken[name].view(-1)[broken[name].view(-1).nonzero()[0]] = False
    assert task.evaluate(si.Subnetwork(broken))["accuracy"] < 1.0
    # the mask that keeps everything ranks nothing: chance
    everything = si.Subnetwork({k: torch.ones_like(v) for k, v in truth["weights"].items()})
    assert task.recovery(everything)["weight_auc"] == 0.5


def test_a_weight_training_method_copies_a_bridge_holding_a_cached_activation():
    # a bridge block keeps its residual input on the attention while it runs; after a run that
    # diverged (continuous_sparsification on a tracr program) one was left there with its graph,
    # a non-leaf tensor, which deepcopy refuses: the copy then failed for every later run
    model = compile_program(program(), {"a", "b", "c"}, max_seq_len=6)
    tokens = model.encode([list("abcab"), list("cabba")])
    attn = model.bridge.blocks[0]._original_component.attn
    assert hasattr(attn, "_captured_pre_ln_residual")
    attn._captured_pre_ln_residual = model.bridge.embed(tokens) * 2  # what was left: a graph
    before = si.fingerprint(model.bridge)

    def loss_fn(bridge, batch):
        return bridge(batch).pow(2).mean()

    result = si.find(model.bridge, "continuous_sparsification", loss_fn, [tokens], steps=2,
                     progress=False)  # fmt: skip
    assert result.subnetwork.names and si.fingerprint(model.bridge) == before
