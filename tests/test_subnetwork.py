import json

import pytest
import torch
from safetensors.torch import save_file

import subnet_interp as si
from subnet_interp._subnetwork import FORMAT_VERSION


def make(seed=0, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    return si.Subnetwork(
        {
            "a.weight": torch.rand(4, 5, generator=gen) < density,
            "b.weight": torch.rand(3, 2, 2, generator=gen) < density,
        },
        {"method": "test", "hparams": {"x": 1}},
    )


def test_set_algebra_matches_elementwise_logic():
    a, b = make(0), make(1)
    for name in a:
        assert torch.equal((a & b)[name], a[name] & b[name])
        assert torch.equal((a | b)[name], a[name] | b[name])
        assert torch.equal((a - b)[name], a[name] & ~b[name])
        assert torch.equal((~a)[name], ~a[name])
    assert (a & ~a).kept() == 0
    assert (a | ~a).density() == 1.0


def test_density_and_densities_count_kept_weights():
    sub = si.Subnetwork(
        {"x": torch.tensor([True, False, False, False]), "y": torch.ones(2, 3, dtype=torch.bool)}
    )
    assert sub.densities() == {"x": 0.25, "y": 1.0}
    assert sub.density() == pytest.approx(7 / 10)
    assert sub.kept() == 7 and sub.numel() == 10


def test_masks_are_copied_and_read_only():
    source = torch.zeros(3, dtype=torch.bool)
    sub = si.Subnetwork({"x": source})
    source[0] = True
    assert sub["x"].sum() == 0
    with pytest.raises(TypeError):
        sub.masks["y"] = source  # type: ignore[index]


def test_equality_compares_masks():
    assert make(0) == make(0)
    assert make(0) != make(1)
    a = make(0)
    reordered = si.Subnetwork({n: a[n] for n in reversed(a.names)})
    assert list(reordered.names) != list(a.names) and reordered == a
    assert si.Subnetwork({"a.weight": a["a.weight"]}) != a


def test_repr_shows_density_and_targets():
    text = repr(make(0))
    assert "density=" in text and "a.weight" in text and "method=test" in text


def test_save_load_round_trip(tmp_path):
    sub = make(3)
    path = tmp_path / "sub.safetensors"
    sub.save(path)
    loaded = si.Subnetwork.load(path)
    assert loaded == sub
    assert dict(loaded.meta) == dict(sub.meta)
    assert loaded.names == sub.names


def test_load_rejects_newer_format(tmp_path):
    path = tmp_path / "future.safetensors"
    header = {"format_version": FORMAT_VERSION + 1, "names": ["x"], "meta": {}}
    save_file(
        {"x": torch.ones(2, dtype=torch.bool)},
        str(path),
        metadata={"subnet_interp": json.dumps(header)},
    )
    with pytest.raises(ValueError, match=r"format version 2.*up to 1.*Upgrade"):
        si.Subnetwork.load(path)


def test_load_rejects_foreign_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not written by `Subnetwork.save`"):
        si.Subnetwork.load(path)


def test_load_rejects_non_bool_masks(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = {"format_version": FORMAT_VERSION, "names": ["x"], "meta": {}}
    save_file({"x": torch.ones(2)}, str(path), metadata={"subnet_interp": json.dumps(header)})
    with pytest.raises(ValueError, match="dtype torch.float32, expected torch.bool"):
        si.Subnetwork.load(path)


def test_load_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="No subnetwork file"):
        si.Subnetwork.load(tmp_path / "nope.safetensors")


def test_constructor_rejects_float_masks():
    with pytest.raises(TypeError, match=r"dtype torch.float32.*torch.bool.*mask > 0.5"):
        si.Subnetwork({"x": torch.rand(3)})


def test_set_algebra_needs_same_targets():
    a = si.Subnetwork({"x": torch.ones(2, dtype=torch.bool)})
    b = si.Subnetwork({"y": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"only in the left: \['x'\].*only in the right: \['y'\]"):
        _ = a & b


def test_set_algebra_rejects_shape_mismatch():
    a = si.Subnetwork({"x": torch.ones(2, dtype=torch.bool)})
    b = si.Subnetwork({"x": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"shape \(2,\) on the left and \(3,\)"):
        _ = a | b


def test_meta_must_be_json():
    with pytest.raises(TypeError, match="JSON-serialisable"):
        si.Subnetwork({"x": torch.ones(2, dtype=torch.bool)}, {"bad": object()})


def test_fingerprint_survives_set_algebra_when_shared():
    a = si.Subnetwork({"x": torch.ones(2, dtype=torch.bool)}, {"fingerprint": "abc"})
    assert (a & a).meta["fingerprint"] == "abc"
    assert (~a).meta["fingerprint"] == "abc"


def test_set_algebra_refuses_subnetworks_of_different_models():
    """Subnetworks found on models with different weights do not combine (the result would
    apply to neither); a hand-made mask, with no fingerprint, restricts a found one and the
    result keeps the found one's fingerprint."""
    masks = {"x": torch.tensor([True, False, True])}
    a = si.Subnetwork(masks, {"fingerprint": "abc"})
    b = si.Subnetwork(masks, {"fingerprint": "def"})
    for op in (lambda: a & b, lambda: a | b, lambda: a - b, lambda: a ^ b):
        with pytest.raises(ValueError, match="different weights.*si.analysis.overlap"):
            op()
    hand = si.Subnetwork({"x": torch.tensor([True, True, False])})
    assert (a & hand).meta["fingerprint"] == "abc" and (hand | a).meta["fingerprint"] == "abc"
    assert (a & si.Subnetwork(b.masks)).kept() == 2
