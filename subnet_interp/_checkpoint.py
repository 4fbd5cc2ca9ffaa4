"""Checkpoints of a mask-training run (``si.find(..., checkpoint=path)``).

One safetensors file holds every tensor a run needs to continue exactly where it stopped: the
mask parameters, the optimisers' state, the weights and their optimiser for methods that train
weights, the rewound weights, tensors a method keeps between steps (e.g. Lagrange multipliers)
and the state of the generator the per-step mask seeds come from. Its JSON header holds the rest
(step, schedule state, history, optimiser settings) and the identity of the run (method,
hyper-parameters, steps, targets, model fingerprint), so a checkpoint of another run is refused
instead of silently continued. Files are written to a temporary name and renamed: an interrupted
write never leaves a truncated checkpoint. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

KEY = "subnet_interp_checkpoint"
VERSION = 1


def flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict) -> dict:
    """Put an optimiser's tensors into ``tensors``; return the JSON-able rest of its state."""
    state_dict = optimizer.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                if hasattr(value, "to_local"):  # a sharded parameter's state: this rank's part
                    value = value.to_local()
                tensors[f"{prefix}/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "plain": plain}


def unflatten_optimizer(prefix: str, saved: Mapping[str, Any], tensors: Mapping[str, Tensor]):
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "/"):
            index, key = name[len(prefix) + 1 :].split("/", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entry in saved["plain"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": saved["param_groups"]}


def write(path: Path, tensors: Mapping[str, Tensor], header: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={KEY: json.dumps({"version": VERSION, **header})},
    )
    os.replace(tmp, path)


def read(path: Path, identity: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and header of a checkpoint, after checking it belongs to this run."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own types for truncated files
        raise ValueError(
            f"{str(path)!r} is not a readable checkpoint ({error}). Delete it to start over, "
            "or pass another `checkpoint=` path."
        ) from None
    if KEY not in metadata:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a subnet_interp checkpoint. Pass a "
            "new path for `checkpoint=` (it is created), or the checkpoint of this run."
        )
    header = json.loads(metadata[KEY])
    if header.get("version") != VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint version {header.get('version')!r}; this "
            f"subnet_interp reads version {VERSION}."
        )
    saved = header.get("identity", {})
    different = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
    if different:
        raise ValueError(
            f"{str(path)!r} is the checkpoint of another run: it differs in {different} "
            f"(checkpoint: {[saved.get(k) for k in different]}, this run: "
            f"{[identity.get(k) for k in different]}). Resume with the same method, "
            "hyper-parameters, steps, targets and model, or pass a new `checkpoint=` path."
        )
    return tensors, header


def jsonable(value: Any) -> Any:
    """Hyper-parameters and the like as JSON-comparable values (tuples -> lists)."""
    return json.loads(json.dumps(value, default=str))


__all__ = ["flatten_optimizer", "jsonable", "read", "unflatten_optimizer", "write"]
