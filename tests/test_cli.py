"""The subnet-interp command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import subnet_interp as si
from subnet_interp.cli import main


def test_methods_lists_every_method_with_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in si.methods.names():
        assert name in out
    assert "init_logit=2.0" in out and "Csordás" in out


def test_show_summarises_a_file(tmp_path, capsys):
    path = tmp_path / "s.safetensors"
    si.Subnetwork(
        {"a.weight": torch.tensor([True, False, True, True])},
        {"method": "magnitude", "fingerprint": "abc"},
    ).save(path)
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "abc" in out and "0.7500" in out


def test_show_missing_file_fails_cleanly(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope.safetensors")]) == 2
    assert "No subnetwork file" in capsys.readouterr().err


def test_help_and_unknown_command():
    result = subprocess.run(
        [sys.executable, "-m", "subnet_interp.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "demo" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "subnet_interp.cli", "frobnicate"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_demo_without_matplotlib_names_only_files_it_wrote(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "install subnet_interp[plots]" in out
    wrote = next(line for line in out.splitlines() if "wrote" in line)
    assert "induction_subnetwork.safetensors" in wrote and ".png" not in wrote
    assert "report.html" in wrote and (tmp_path / "report.html").exists()  # needs no matplotlib
    assert not list(tmp_path.glob("*.png"))


def test_demo_fast_mode_writes_its_files(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["demo", "--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "faithfulness" in out and "heads the subnetwork keeps" in out
    assert (tmp_path / "induction_subnetwork.safetensors").exists()
    loaded = si.Subnetwork.load(tmp_path / "induction_subnetwork.safetensors")
    assert loaded.meta["method"] == "gumbel_sigmoid"
