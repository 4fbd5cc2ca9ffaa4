"""html_report and ``subnet-interp report``: one self-contained page with the sections its
inputs allow (metadata and densities always; heads, neurons and a circuit graph with a model;
the ablation against controls with data and a metric)."""

from __future__ import annotations

import re

import pytest
import torch

import subnet_interp as si
from subnet_interp.analysis import FaithfulnessCurve, ablation_effect, html_report, loss
from subnet_interp.cli import main

pytest.importorskip("transformers")
from _hf_models import HEADS, LAYERS, VOCAB, gpt2, random_masks  # noqa: E402


def batches():
    """Evaluation batches for the CLI's --data (token ids of the tiny GPT-2)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (4, 8), generator=gen) for _ in range(2)]


def lm_loss(model, batch):
    """The CLI's --metric: next-token loss (lower is better)."""
    logits = model(batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def subnetwork(model, seed=1):
    meta = {
        "method": "magnitude",
        "hparams": {"density": 0.6},
        "fingerprint": si.fingerprint(model),
    }
    return si.Subnetwork(random_masks(model, seed=seed), meta)


def fetches_nothing(page: str) -> bool:
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    external = re.search(r"<(?:script|link|img)[^>]+(?:src|href)=\"(?!data:)", page)
    return urls <= {"http://www.w3.org/2000/svg"} and external is None


def test_without_a_model_metadata_and_densities():
    model = gpt2()
    page = html_report(None, subnetwork(model))
    assert "<h2>Subnetwork</h2>" in page and "<h2>Densities</h2>" in page
    assert "magnitude" in page and "density=0.6" in page and si.fingerprint(model) in page
    assert "Heads and neurons" not in page and "Circuit graph" not in page
    assert page.count('class="cell"') == LAYERS * 6  # layers x (W_Q, W_K, W_V, W_O, W_in, W_out)
    assert fetches_nothing(page)


def test_with_model_data_metric_comparison_and_curve(tmp_path):
    model = gpt2()
    sub = subnetwork(model)
    curve = FaithfulnessCurve(
        "loss", False, "zero", (0.01, 0.1, 1.0), (1, 10, 100), 100, (3.0, 2.0, 1.0),
        (0.2, 0.7, 1.0), 1.0, 4.0,
    )  # fmt: skip
    page = html_report(
        model,
        sub,
        path=tmp_path / "r.html",
        data=batches(),
        metric=loss(lm_loss),
        controls=3,
        compare=subnetwork(model, seed=2),
        faithfulness=curve,
        top_k=15,
    )
    assert (tmp_path / "r.html").read_text() == page and fetches_nothing(page)
    for section in ("Heads and neurons", "Ablation against random controls", "Faithfulness curve"):
        assert f"<h2>{section}</h2>" in page
    assert "Compared with another subnetwork" in page and "Circuit graph" in page
    assert page.count('class="control"') == 3 and page.count('class="point"') == 3
    assert page.count('<path class="edge"') == 15
    assert 'class="pixelated si-neurons"' in page and "data:image/png;base64," in page
    # heads: one heatmap for the subnetwork, three for the comparison
    assert page.count('class="cell"') == LAYERS * 6 + 4 * LAYERS * HEADS


def test_an_ablation_report_already_measured_is_shown_not_remeasured():
    model = gpt2()
    sub = subnetwork(model)
    measured = ablation_effect(model, sub, loss(lm_loss), batches(), controls=2)
    page = html_report(model, sub, ablation_report=measured)
    assert str(measured).splitlines()[1].strip() in page and page.count('class="control"') == 2
    with pytest.raises(ValueError, match="not both"):
        html_report(model, sub, data=batches(), metric=lm_loss, ablation_report=measured)


def test_errors_say_what_to_pass():
    model = gpt2()
    with pytest.raises(ValueError, match="needs both data=.*and metric="):
        html_report(model, subnetwork(model), data=batches())
    with pytest.raises(ValueError, match="pass the model as well"):
        html_report(None, subnetwork(model), data=batches(), metric=lm_loss)
    with pytest.raises(TypeError, match="si.Subnetwork second, got dict|Type-check error"):
        html_report(model, {"a": torch.ones(2, dtype=torch.bool)})


def test_the_report_command(tmp_path, capsys):
    model = gpt2()
    path, out = tmp_path / "sub.safetensors", tmp_path / "report.html"
    subnetwork(model).save(path)
    argv = ["report", str(path), "--model", "_hf_models:gpt2", "-o", str(out)]
    ablate = ["--data", "test_report:batches", "--metric", "test_report:lm_loss"]
    assert main(argv + ablate + ["--controls", "2", "--top-k", "9"]) == 0
    page = out.read_text()
    assert "sub.safetensors" in page and page.count('class="control"') == 2
    assert page.count('<path class="edge"') == 9 and f"wrote {out}" in capsys.readouterr().out
    # a circuit file (EAP-IG) instead of the weight-based graph, and a second subnetwork
    from test_circuit_plot import eap_file

    other = tmp_path / "other.safetensors"
    subnetwork(model, seed=2).save(other)
    extra = ["--circuit", eap_file(tmp_path), "--compare", str(other)]
    assert main(argv + extra) == 0
    page = out.read_text()
    assert page.count('<path class="edge"') == 9 and "The circuit given with the report" in page
    assert "Compared with another subnetwork" in page and 'class="control"' not in page
    assert main(argv + ablate[:2]) == 2
    assert "--data and --metric go together" in capsys.readouterr().err
    assert main(["report", str(path), "--model", "nowhere", "-o", str(out)]) == 2
    assert "option '--model' must look like 'package.module:function'" in capsys.readouterr().err


def test_a_model_without_heads_gets_notes_instead_of_views():
    from subnet_interp.analysis import graph_edge_scores
    from subnet_interp.tasks import planted_mlp

    task = planted_mlp()
    page = html_report(
        task.model, task.planted, data=task.batches(64), metric=loss(task.loss_fn), controls=2
    )
    notes = re.findall(r'class="note">([^<]*)', page)
    assert "No head view: the subnetwork covers no attention weights." in notes
    assert any(
        n.startswith("No graph: Edge scores need canonical attention weights") for n in notes
    )
    assert page.count('class="control"') == 2 and "every target" in page
    with pytest.raises(ValueError, match="this model has none, its weights are"):
        graph_edge_scores(task.model, None)
