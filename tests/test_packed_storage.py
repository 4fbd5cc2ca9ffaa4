"""Bit-packed subnetwork files: exact round trips, 8x smaller, old files still readable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import subnet_interp as si
from subnet_interp._subnetwork import FORMAT_VERSION

ODD_SHAPES = [(3, 5, 7), (1,), (0,), (2, 0, 3), (), (8,), (9,), (17, 3), (4, 4, 4, 5)]


def random_subnetwork(shapes, seed=0, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    masks = {f"t{i}": torch.rand(shape, generator=gen) < density for i, shape in enumerate(shapes)}
    return si.Subnetwork(masks, {"method": "test", "hparams": {"density": density}})


def stored(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["subnet_interp"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "bool"])
def test_round_trip_is_exact_for_odd_shapes(tmp_path, packed, density):
    sub = random_subnetwork(ODD_SHAPES, seed=1, density=density)
    path = tmp_path / "sub.safetensors"
    sub.save(path, packed=packed)
    loaded = si.Subnetwork.load(path)
    assert loaded == sub
    assert loaded.names == sub.names
    assert dict(loaded.meta) == dict(sub.meta)
    for name in sub:
        assert loaded[name].dtype == torch.bool and loaded[name].shape == sub[name].shape


def test_packed_file_is_eight_times_smaller(tmp_path):
    sub = random_subnetwork([(1000, 1001)], seed=2)
    sub.save(tmp_path / "bool.safetensors")
    sub.save(tmp_path / "packed.safetensors", packed=True)
    ratio = (tmp_path / "bool.safetensors").stat().st_size / (
        tmp_path / "packed.safetensors"
    ).stat().st_size
    assert 7.9 < ratio <= 8.0
    assert si.Subnetwork.load(tmp_path / "packed.safetensors") == sub


def test_packed_bits_are_in_numpy_packbits_order(tmp_path):
    sub = random_subnetwork([(3, 5, 7)], seed=3)
    sub.save(tmp_path / "sub.safetensors", packed=True)
    header, tensors = stored(tmp_path / "sub.safetensors")
    assert header["encoding"] == "bitpacked" and header["shapes"] == {"t0": [3, 5, 7]}
    assert tensors["t0"].dtype == torch.uint8
    assert np.array_equal(tensors["t0"].numpy(), np.packbits(sub["t0"].numpy().ravel()))


def test_unpacked_file_records_encoding_and_shapes(tmp_path):
    sub = random_subnetwork([(2, 3)])
    sub.save(tmp_path / "sub.safetensors")
    header, tensors = stored(tmp_path / "sub.safetensors")
    assert header["format_version"] == FORMAT_VERSION == 1
    assert header["encoding"] == "bool" and header["shapes"] == {"t0": [2, 3]}
    assert tensors["t0"].dtype == torch.bool


def test_version_one_file_without_encoding_or_shapes_still_loads(tmp_path):
    # the layout `Subnetwork.save` wrote before packing existed
    masks = {"a": torch.tensor([True, False, True]), "b": torch.zeros(2, 2, dtype=torch.bool)}
    header = {"format_version": 1, "names": ["b", "a"], "meta": {"method": "old"}}
    save_file(
        masks, str(tmp_path / "old.safetensors"), metadata={"subnet_interp": json.dumps(header)}
    )
    loaded = si.Subnetwork.load(tmp_path / "old.safetensors")
    assert loaded.names == ("b", "a")
    assert loaded == si.Subnetwork({"b": masks["b"], "a": masks["a"]})
    assert loaded.meta["method"] == "old"


def test_load_onto_a_device_unpacks_there(tmp_path):
    sub = random_subnetwork([(5, 3)])
    sub.save(tmp_path / "sub.safetensors", packed=True)
    loaded = si.Subnetwork.load(tmp_path / "sub.safetensors", device="meta")
    assert loaded.device == torch.device("meta") and loaded["t0"].shape == (5, 3)
