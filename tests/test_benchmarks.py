"""Benchmark scripts run in --quick mode (a smoke test; timings are never asserted)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"


# benchmarks/_*.py are helpers the scripts import, not benchmarks
@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("[!_]*.py")))
def test_benchmark_quick_mode_runs(script, tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    written = list(tmp_path.glob("*.json"))
    assert written, "a benchmark writes its results as JSON"
    record = json.loads(written[0].read_text())
    assert record["rows"]
