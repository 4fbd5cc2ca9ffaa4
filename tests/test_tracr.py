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
