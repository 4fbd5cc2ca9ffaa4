"""The HTML pages in a real browser (headless Chromium): they load with no console message at
all (so no error), their script runs to the end, the graph's nodes and edges are in the DOM,
hovering shows a tooltip and highlights a node's edges, the wheel zooms, dragging pans, a
double-click resets the view, and a screenshot is not blank.

Skipped when no Chromium is installed (Debian: ``apt-get install chromium``; CI installs it in
``.ci/run`` where apt is available)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from subnet_interp.analysis import Circuit, html_report, plot_circuit

BROWSER = next(
    (
        shutil.which(name)
        for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
        if shutil.which(name)
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium binary (chromium, chromium-browser, google-chrome) on PATH; install it "
    "with `apt-get install chromium` to run the browser tests",
)
FLAGS = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio"]

# Appended to a copy of a page: hover the first edge and node, turn the wheel over the graph,
# drag it, double-click it, and record what happened as attributes of <body> (read back from
# the dumped DOM).
PROBE = """<script>
(function () {
  var body = document.body;
  var edge = document.querySelector('svg.si-graph path.edge');
  var tip = document.querySelector('.si-tip');
  if (edge) {
    edge.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 20, clientY: 20}));
    body.setAttribute('data-probe-tip', tip.textContent);
    body.setAttribute('data-probe-tip-shown', tip.style.display);
  }
  var node = document.querySelector('svg.si-graph g.node');
  node.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 20, clientY: 20}));
  body.setAttribute('data-probe-node-tip', tip.textContent);
  var svg = document.querySelector('svg.si-zoom');
  var before = svg.getAttribute('viewBox');
  svg.dispatchEvent(new WheelEvent('wheel',
    {deltaY: -120, clientX: 200, clientY: 200, bubbles: true, cancelable: true}));
  body.setAttribute('data-probe-zoomed', String(svg.getAttribute('viewBox') !== before));
  var zoomed = svg.getAttribute('viewBox');
  svg.dispatchEvent(new MouseEvent('mousedown', {bubbles: true, clientX: 100, clientY: 100}));
  window.dispatchEvent(new MouseEvent('mousemove', {clientX: 160, clientY: 130}));
  window.dispatchEvent(new MouseEvent('mouseup', {}));
  body.setAttribute('data-probe-panned', String(svg.getAttribute('viewBox') !== zoomed));
  svg.dispatchEvent(new MouseEvent('dblclick', {bubbles: true}));
  body.setAttribute('data-probe-reset', String(svg.getAttribute('viewBox') === before));
})();
</script>"""


def browse(page_path, tmp_path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message Chromium logged."""
    result = subprocess.run(
        [BROWSER, *FLAGS, "--enable-logging=stderr", "--v=0", "--dump-dom", page_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def non_white_fraction(page_path, tmp_path, size=(1200, 900)) -> float:
    png = tmp_path / f"{page_path.stem}.png"
    subprocess.run(
        [
            BROWSER,
            *FLAGS,
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={png}",
            page_path.as_uri(),
        ],
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
        check=True,
    )
    image = pytest.importorskip("matplotlib.image").imread(png)  # floats in [0, 1]
    assert image.shape[:2] == (size[1], size[0])
    return float((image[..., :3].min(axis=-1) < 0.9).mean())


def check_page(page_path, tmp_path, nodes, edges) -> str:
    """Open a copy of the page with :data:`PROBE` appended (one browser start): no console
    message, the page's script ran to the end, the graph's nodes and edges are in the DOM,
    hover and zoom work. Returns the DOM."""
    probe = page_path.with_name(f"probe_{page_path.name}")
    probe.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    dom, console = browse(probe, tmp_path)
    assert console == [], console  # the page logs nothing: no error, no warning
    assert 'data-si-ready="1"' in dom  # its script ran to the end
    drawn_nodes = re.findall(r'<g class="node" data-name="([^"]+)"', dom)
    drawn_edges = re.findall(
        r'<path class="edge[^"]*"[^>]* data-src="([^"]+)" data-dst="([^"]+)"', dom
    )
    assert sorted(drawn_nodes) == sorted(nodes) and sorted(drawn_edges) == sorted(edges)
    for action in ("zoomed", "panned", "reset"):  # wheel, drag, double-click
        assert f'data-probe-{action}="true"' in dom, action
    return dom


def test_the_harness_sees_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    _, console = browse(page, tmp_path)
    assert len(console) == 2 and "boom" in console[0] and "missing is not defined" in console[1]


def test_circuit_page_in_chromium(tmp_path):
    from test_circuit_plot import eap_file

    circuit = Circuit.load(eap_file(tmp_path))
    plot = plot_circuit(circuit, path=tmp_path / "circuit.html")
    dom = check_page(tmp_path / "circuit.html", tmp_path, plot.nodes, list(plot.edges))
    # hovering a node dims the edges that do not touch it
    classes = re.findall(r'<path class="(edge[^"]*)"[^>]* data-src="([^"]+)"', dom)
    assert {c for c, src in classes if src == "embed"} == {"edge"}
    assert "edge dim" in {c for c, src in classes if src != "embed"}
    first = re.search(r'<path class="edge[^"]*"[^>]* data-src="([^"]+)" data-dst="([^"]+)"', dom)
    assert f'data-probe-tip="{first.group(1)} -&gt; {first.group(2)}' in dom
    assert 'data-probe-tip-shown="block"' in dom and 'data-probe-node-tip="embed' in dom
    assert non_white_fraction(tmp_path / "circuit.html", tmp_path) > 0.01


def test_report_page_in_chromium(tmp_path):
    pytest.importorskip("transformers")
    from _hf_models import gpt2
    from test_report import batches, lm_loss, subnetwork

    from subnet_interp.analysis import graph_edge_scores

    model = gpt2()
    sub = subnetwork(model)
    page = tmp_path / "report.html"
    html_report(model, sub, path=page, data=batches(), metric=lm_loss, controls=3, top_k=12)
    best = plot_circuit(graph_edge_scores(model, sub), top_k=12)
    dom = check_page(page, tmp_path, best.nodes, list(best.edges))
    assert dom.count('class="cell"') >= 12 and 'class="control"' in dom
    assert non_white_fraction(page, tmp_path, size=(1200, 1600)) > 0.03
