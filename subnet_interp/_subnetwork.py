"""`Subnetwork`: a frozen set of binary weight masks keyed by canonical target name."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from ._types import NotFoundError, describe_tensor

FORMAT_VERSION = 1
_METADATA_KEY = "subnet_interp"


def _freeze_meta(meta: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(meta or {}))


def _jsonable(value: Any) -> Any:
    """Convert metadata to plain JSON types, failing clearly on anything else."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(
        f"Subnetwork metadata must be JSON-serialisable, got {type(value).__name__}: {value!r}. "
        "Store plain numbers, strings, lists and dicts in `meta`."
    )


class Subnetwork:
    """A binary mask over some of a model's weights.

    ``masks`` maps canonical target names (see ``si.targets``) to boolean tensors in the
    canonical layout: ``True`` keeps the weight. ``meta`` records how the subnetwork was made
    (method, hyper-parameters, model fingerprint, ...).

    Subnetworks are immutable: masks are copied on construction and exposed read-only.
    Set algebra (``&``, ``|``, ``-``, ``~``) works between subnetworks over the same targets;
    ``~a`` is the complement within ``a``'s targets.
    """

    __slots__ = ("_masks", "_meta")
    __hash__ = None  # type: ignore[assignment]  # tensors are mutable, equality is by value

    def __init__(self, masks: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None):
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"Subnetwork masks must be a mapping of target name -> bool tensor, got "
                f"{type(masks).__name__}."
            )
        frozen: dict[str, Tensor] = {}
        device = None
        for name, mask in masks.items():
            if not isinstance(name, str):
                raise TypeError(f"Subnetwork target names must be str, got {name!r}.")
            if not isinstance(mask, Tensor):
                raise TypeError(
                    f"Mask for {name!r} must be a torch.Tensor, got {type(mask).__name__}."
                )
            if mask.dtype != torch.bool:
                raise TypeError(
                    f"Mask for {name!r} has dtype {mask.dtype}; a Subnetwork holds binary "
                    "masks (torch.bool). Threshold a soft mask first, e.g. `mask > 0.5`, or "
                    "pass a float mask straight to `si.masked`."
                )
            if device is not None and mask.device != device:
                raise ValueError(
                    f"All masks of a Subnetwork must be on one device; {name!r} is on "
                    f"{mask.device}, earlier masks on {device}. Move them with `.to(device)` first."
                )
            device = mask.device
            frozen[name] = mask.detach().clone().contiguous()
        self._masks = MappingProxyType(frozen)
        self._meta = _freeze_meta(_jsonable(dict(meta or {})))

    # ------------------------------------------------------------------ data
    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Canonical target name -> boolean mask (read-only); ``True`` keeps the weight."""
        return self._masks

    @property
    def meta(self) -> Mapping[str, Any]:
        """How the subnetwork was made (read-only): method, hyper-parameters, fingerprint, ..."""
        return self._meta

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical names of the targets the subnetwork covers, in order."""
        return tuple(self._masks)

    @property
    def device(self) -> torch.device:
        """The device of the masks (CPU for a subnetwork without targets)."""
        for mask in self._masks.values():
            return mask.device
        return torch.device("cpu")

    def __len__(self) -> int:
        return len(self._masks)

    def __iter__(self):
        return iter(self._masks)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._masks[name]
        except KeyError:
            raise NotFoundError(
                f"{name!r} is not a target of this subnetwork; it has {list(self._masks)}."
            ) from None

    def numel(self) -> int:
        """Number of weights the subnetwork covers (kept or not)."""
        return sum(m.numel() for m in self._masks.values())

    def kept(self) -> int:
        """Number of kept weights."""
        if not self._masks:
            return 0
        return int(torch.stack([m.sum() for m in self._masks.values()]).sum().item())

    def density(self) -> float:
        """Fraction of covered weights that are kept."""
        total = self.numel()
        return self.kept() / total if total else 0.0

    def densities(self) -> dict[str, float]:
        """Kept fraction per target."""
        if not self._masks:
            return {}
        counts = torch.stack([m.sum() for m in self._masks.values()]).tolist()
        return {
            name: count / mask.numel() if mask.numel() else 0.0
            for (name, mask), count in zip(self._masks.items(), counts, strict=True)
        }

    def to(self, device: torch.device | str) -> Subnetwork:
        """The same subnetwork with masks on ``device``."""
        return Subnetwork({n: m.to(device) for n, m in self._masks.items()}, self._meta)

    def with_meta(self, **updates: Any) -> Subnetwork:
        """A copy with ``meta`` updated by ``updates``."""
        return Subnetwork(self._masks, {**self._meta, **updates})

    # ----------------------------------------------------------- set algebra
    def _check_compatible(self, other: object, op: str) -> Subnetwork:
        if not isinstance(other, Subnetwork):
            raise TypeError(
                f"`{op}` needs two Subnetworks, got Subnetwork and {type(other).__name__}."
            )
        if set(self._masks) != set(other._masks):
            only_left = sorted(set(self._masks) - set(other._masks))
            only_right = sorted(set(other._masks) - set(self._masks))
            raise ValueError(
                f"`{op}` needs subnetworks over the same targets; only in the left: {only_left}, "
                f"only in the right: {only_right}. Restrict both with `.select(names)` first."
            )
        for name, mask in self._masks.items():
            if mask.shape != other._masks[name].shape:
                raise ValueError(
                    f"`{op}`: target {name!r} has shape {tuple(mask.shape)} on the left and "
                    f"{tuple(other._masks[name].shape)} on the right; were they found on "
                    "different models?"
                )
            if mask.device != other._masks[name].device:
                raise ValueError(
                    f"`{op}`: masks are on {mask.device} and {other._masks[name].device}; "
                    "move one with `.to(device)`."
                )
        return other

    def _check_same_model(self, other: Subnetwork, op: str) -> None:
        """Set algebra combines masks of one model (overlap statistics may compare two)."""
        prints = (self._meta.get("fingerprint"), other._meta.get("fingerprint"))
        if None not in prints and prints[0] != prints[1]:
            raise ValueError(
                f"`{op}` needs subnetworks of one model, but these were found on models with "
                f"different weights (fingerprints {str(prints[0])[:12]}... and "
                f"{str(prints[1])[:12]}...), so the result would apply to neither. To compare "
                "them, use si.analysis.overlap(a, b); to combine them anyway, drop one's "
                "fingerprint: si.Subnetwork(b.masks)."
            )

    def _derived_meta(self, other: Subnetwork | None, op: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"derived": op}
        fingerprints = {self._meta.get("fingerprint")}
        if other is not None:
            fingerprints.add(other._meta.get("fingerprint"))
        fingerprints.discard(None)  # a hand-made mask restricts a found one to its model
        if len(fingerprints) == 1:
            meta["fingerprint"] = fingerprints.pop()
        return meta

    def _binary(self, other: object, op: str, fn) -> Subnetwork:
        right = self._check_compatible(other, op)
        self._check_same_model(right, op)
        masks = {n: fn(m, right._masks[n]) for n, m in self._masks.items()}
        return Subnetwork(masks, self._derived_meta(right, op))

    def __and__(self, other: object) -> Subnetwork:
        return self._binary(other, "a & b", torch.logical_and)

    def __or__(self, other: object) -> Subnetwork:
        return self._binary(other, "a | b", torch.logical_or)

    def __sub__(self, other: object) -> Subnetwork:
        return self._binary(other, "a - b", lambda a, b: a & ~b)

    def __xor__(self, other: object) -> Subnetwork:
        return self._binary(other, "a ^ b", torch.logical_xor)

    def __invert__(self) -> Subnetwork:
        return Subnetwork({n: ~m for n, m in self._masks.items()}, self._derived_meta(None, "~a"))

    def select(self, names) -> Subnetwork:
        """The subnetwork restricted to the targets in ``names`` (an iterable of names)."""
        names = list(names)
        missing = [n for n in names if n not in self._masks]
        if missing:
            raise NotFoundError(
                f"{missing} are not targets of this subnetwork; it has {list(self._masks)}."
            )
        return Subnetwork({n: self._masks[n] for n in names}, self._meta)

    @classmethod
    def full(cls, shapes: Mapping[str, tuple[int, ...]], *, device=None, meta=None) -> Subnetwork:
        """A subnetwork that keeps every weight of the given targets (name -> shape)."""
        return cls(
            {n: torch.ones(s, dtype=torch.bool, device=device) for n, s in shapes.items()}, meta
        )

    @classmethod
    def from_scores(
        cls,
        scores: Mapping[str, Tensor],
        *,
        density: float | None = None,
        count: int | None = None,
        per_target: bool = False,
        meta: Mapping[str, Any] | None = None,
    ) -> Subnetwork:
        """The subnetwork of the top-scored weights, of an exact size (as Edge Pruning cuts
        its masks at a searched threshold rather than at 0.5; Bhaskar et al. 2024).

        Args:
            scores: target name -> float tensor (e.g. ``FindResult.scores``); higher keeps.
            density: keep exactly ``round(density * N)`` weights of all ``N``; with
                ``per_target``, ``round(density * n)`` of each target's ``n``.
            count: keep exactly ``count`` weights over all targets (not with ``per_target``:
                targets differ in size, so a per-target size is a density).
            per_target: rank within each target instead of across all of them.
            meta: recorded in ``meta``, plus ``cut_from_scores=True``, ``density_requested``,
                ``count_requested`` and ``per_target``.

        Exactly one of ``density`` and ``count``. Ties are broken by position (targets in
        the mapping's order, then row-major), so equal scores always give the same mask.
        """
        from ._ranking import top_masks

        masks = top_masks(scores, density=density, count=count, per_target=per_target)
        cut = {"cut_from_scores": True, "density_requested": density}
        cut |= {"count_requested": count, "per_target": per_target}
        return cls(masks, {**dict(meta or {}), **cut})

    def __eq__(self, other: object) -> bool:
        """Equal when the two cover the same targets with identical masks (meta and the order
        of the targets are ignored)."""
        if not isinstance(other, Subnetwork):
            return NotImplemented
        if set(self._masks) != set(other._masks):
            return False
        return all(
            mask.shape == other._masks[name].shape
            and torch.equal(mask.cpu(), other._masks[name].cpu())
            for name, mask in self._masks.items()
        )

    def __repr__(self) -> str:
        method = self._meta.get("method", self._meta.get("derived", "?"))
        header = (
            f"Subnetwork(method={method}, targets={len(self)}, "
            f"kept={self.kept():,}/{self.numel():,}, density={self.density():.4f}"
        )
        if not self._masks:
            return header + ")"
        dens = self.densities()
        shown = list(dens.items())
        lines = [f"  {n}: {tuple(self._masks[n].shape)} density={d:.4f}" for n, d in shown[:8]]
        if len(shown) > 8:
            lines.append(f"  ... {len(shown) - 8} more targets")
        return header + ",\n" + "\n".join(lines) + "\n)"

    # --------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike, *, packed: bool = False) -> None:
        """Write the masks as a safetensors file with JSON metadata (no pickle).

        Args:
            packed: store each mask bit-packed (``uint8``, eight weights per byte, first
                weight in the high bit as ``numpy.packbits`` does), 8x smaller than
                ``torch.bool``; its shape goes into the JSON metadata. :meth:`load` reads both.
        """
        from safetensors.torch import save_file

        header = {
            "format_version": FORMAT_VERSION,
            "encoding": _PACKED if packed else _BOOL,
            "names": list(self._masks),
            "shapes": {n: list(m.shape) for n, m in self._masks.items()},
            "meta": dict(self._meta),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        header["digest"] = _digest(header["names"], header["shapes"], header["meta"], self._masks)
        encode = _pack_bits if packed else (lambda m: m.detach().cpu().contiguous())
        tensors = {n: encode(m) for n, m in self._masks.items()}
        save_file(tensors, os.fspath(path), metadata={_METADATA_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Subnetwork:
        """Read a subnetwork written by :meth:`save` (packed or not). Never unpickles."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No subnetwork file at {path!r}.")
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"{path!r} is not a readable safetensors file ({error}): it is truncated, "
                "damaged, or another format (pickles and torch.save files are never opened). "
                "Subnetworks are saved with `Subnetwork.save`; save it again."
            ) from error
        with handle as f:
            header = _read_header(path, f.metadata() or {})
            stored = set(f.keys())
            names = header.get("names", sorted(stored))
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"{path!r}: header field 'names' must be a list of target names, got "
                    f"{names!r}. {_DAMAGED}"
                )
            if set(names) != stored or len(set(names)) != len(names):
                raise ValueError(
                    f"{path!r} is inconsistent: its header lists targets {sorted(names)} but "
                    f"the file holds tensors {sorted(stored)}. {_DAMAGED}"
                )
            encoding = header.get("encoding", _BOOL)
            shapes = _read_shapes(path, header, names, required=encoding == _PACKED)
            masks = {}
            for name in names:
                tensor = f.get_tensor(name)
                if encoding == _PACKED:
                    mask = _unpack_bits(path, name, tensor, shapes[name])
                else:
                    mask = _check_bool(path, name, tensor, shapes.get(name))
                masks[name] = mask  # on the CPU until the digest is checked
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(
                f"{path!r}: header field 'meta' must be a JSON object, got "
                f"{type(meta).__name__}. {_DAMAGED}"
            )
        if "digest" in header:  # files saved before digests have none
            shapes_now = {n: list(m.shape) for n, m in masks.items()}
            if header["digest"] != _digest(names, shapes_now, meta, masks):
                raise ValueError(
                    f"{path!r} does not match the digest `Subnetwork.save` wrote into it: its "
                    f"masks, their shapes or its meta were changed after saving. {_DAMAGED}"
                )
        return cls({name: mask.to(device) for name, mask in masks.items()}, meta)


_BOOL, _PACKED = "bool", "bitpacked"
_BIT_VALUES = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits order: first weight in the high bit
_DAMAGED = "The file was damaged or edited; save the subnetwork again with `Subnetwork.save`."


def _digest(
    names: list[str], shapes: Mapping[str, list[int]], meta: Mapping[str, Any], masks
) -> str:
    """SHA-256 of a subnetwork's names, shapes, meta and mask bits, as :meth:`Subnetwork.save`
    records it (``load`` refuses a file that no longer matches)."""
    described = json.dumps([names, shapes, meta], sort_keys=True).encode()
    hasher = hashlib.sha256(described)
    for name in names:
        hasher.update(masks[name].detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + hasher.hexdigest()


def _pack_bits(mask: Tensor) -> Tensor:
    """A bool mask as a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes, zero-padded."""
    flat = mask.detach().cpu().flatten()
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    values = torch.tensor(_BIT_VALUES, dtype=torch.uint8)
    return (padded.view(-1, 8) * values).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(path: str, name: str, packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Invert :func:`_pack_bits`, refusing anything it could not have written."""
    numel = math.prod(shape)
    expected = -(-numel // 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{path!r}: bit-packed mask {name!r} is {describe_tensor(packed)}, but shape "
            f"{shape} packs into a 1-D torch.uint8 tensor of {expected} bytes. {_DAMAGED}"
        )
    bits = (packed.unsqueeze(1) & torch.tensor(_BIT_VALUES, dtype=torch.uint8)) != 0
    bits = bits.flatten()
    if bits[numel:].any():
        raise ValueError(
            f"{path!r}: bit-packed mask {name!r} has padding bits set beyond its "
            f"{numel} weights (shape {shape}); `Subnetwork.save` writes them as 0. {_DAMAGED}"
        )
    return bits[:numel].view(shape)


def _check_bool(path: str, name: str, tensor: Tensor, shape: tuple[int, ...] | None) -> Tensor:
    if tensor.dtype != torch.bool:
        raise ValueError(
            f"{path!r}: mask {name!r} has dtype {tensor.dtype}, expected torch.bool. {_DAMAGED}"
        )
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(
            f"{path!r}: mask {name!r} has shape {tuple(tensor.shape)} but the header records "
            f"{shape}. {_DAMAGED}"
        )
    return tensor


def _read_header(path: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The JSON header of a subnetwork file, with its format version and encoding checked."""
    if _METADATA_KEY not in metadata:
        raise ValueError(
            f"{path!r} is a safetensors file but has no {_METADATA_KEY!r} metadata; it was "
            f"not written by `Subnetwork.save` (found metadata keys: {sorted(metadata)}). "
            "Build a Subnetwork from its tensors with `si.Subnetwork({name: mask > 0.5})`."
        )
    try:
        header = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path!r}: the {_METADATA_KEY!r} header is not valid JSON ({error}). {_DAMAGED}"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(
            f"{path!r}: the {_METADATA_KEY!r} header must be a JSON object, got "
            f"{type(header).__name__}. {_DAMAGED}"
        )
    if "format_version" not in header:
        raise ValueError(
            f"{path!r}: the header has no 'format_version' (found keys {sorted(header)}). "
            f"{_DAMAGED}"
        )
    version = header["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"{path!r}: 'format_version' must be an integer from 1 to {FORMAT_VERSION}, got "
            f"{version!r}. {_DAMAGED}"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} uses subnetwork format version {version!r}; this subnet_interp "
            f"reads versions up to {FORMAT_VERSION}. Upgrade subnet_interp to load it."
        )
    encoding = header.get("encoding", _BOOL)
    if encoding not in (_BOOL, _PACKED):
        raise ValueError(
            f"{path!r} stores masks with encoding {encoding!r}; this subnet_interp reads "
            f"{[_BOOL, _PACKED]}. Upgrade subnet_interp to load it."
        )
    return header


def _read_shapes(
    path: str, header: Mapping[str, Any], names: list[str], *, required: bool
) -> dict[str, tuple[int, ...]]:
    """The per-target shapes recorded in the header (files before bit-packing have none)."""
    shapes = header.get("shapes")
    if shapes is None and not required:
        return {}
    if not isinstance(shapes, dict) or set(shapes) != set(names):
        recorded = sorted(shapes) if isinstance(shapes, dict) else shapes
        raise ValueError(
            f"{path!r}: header field 'shapes' must give the shape of every target "
            f"{sorted(names)}, got {recorded!r}. {_DAMAGED}"
        )
    checked = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise ValueError(
                f"{path!r}: the recorded shape of {name!r} must be a list of non-negative "
                f"integers, got {shape!r}. {_DAMAGED}"
            )
        checked[name] = tuple(shape)
    return checked


__all__ = ["FORMAT_VERSION", "Subnetwork"]
