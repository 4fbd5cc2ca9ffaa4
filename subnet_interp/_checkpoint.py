"""Checkpoints of a mask-training run (``si.find(..., checkpoint=path)``).

One safetensors file holds every tensor a run needs to continue exactly where it stopped: the
mask parameters, the optimisers' state, the weights and their optimiser for methods that train
weights, the rewound weights, tensors a method keeps between steps (e.g. Lagrange multipliers)
and the state of the generator the per-step mask seeds come from. Its JSON header holds the rest
(step, schedule state, history, optimiser settings) and the identity of the run (method,
hyper-parameters, steps, targets, model fingerprint), so a checkpoint of another run is refused
instead of silently continued. Files are written to a temporary name and renamed: an interrupted
write never leaves a truncated checkpoint. Nothing is pickled.

A mask-training run's state is a :class:`RunState`; :func:`save` and :func:`restore` write and
read it, and a method's own state (``MaskMethod.extra_state``) travels with it. Under FSDP2 each
rank writes its own shard of the mask state (:func:`shard_file`); :func:`resuming` and
:func:`check_same_step` refuse incomplete or foreign sets of files on every rank alike.
``lottery_ticket`` keeps one file per finished round (:func:`round_file`) in the same format.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _distributed

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
    """The ``state_dict`` :func:`flatten_optimizer` split into ``saved`` and ``tensors``."""
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


def read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors (on the CPU) and header of a checkpoint file of this version."""
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
    return tensors, header


def differing(saved: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """The keys in which a checkpoint's identity and this run's differ, sorted."""
    return sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))


def read(path: Path, identity: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and header of a checkpoint, after checking it belongs to this run."""
    tensors, header = read_file(path)
    saved = header.get("identity", {})
    different = differing(saved, identity)
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


def encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """A nest of dicts, lists, tuples, tensors and JSON values as JSON, its tensors put into
    ``tensors`` under names starting with ``name``; :func:`decode` gives it back with the same
    types (dict keys stay ints or strings, tuples stay tuples)."""
    if isinstance(value, Tensor):
        tensors[name] = value.detach()
        return {"tensor": name}
    if isinstance(value, Mapping):
        return {
            "dict": [[k, encode(v, f"{name}/{k}", tensors)] for k, v in value.items()],
        }
    if isinstance(value, (list, tuple)):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    return {"value": value}


def decode(saved: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Any:
    """The value :func:`encode` wrote (tensors as read, on the CPU)."""
    if "tensor" in saved:
        return tensors[saved["tensor"]]
    if "dict" in saved:
        return {k: decode(v, tensors) for k, v in saved["dict"]}
    if "list" in saved:
        return [decode(v, tensors) for v in saved["list"]]
    if "tuple" in saved:
        return tuple(decode(v, tensors) for v in saved["tuple"])
    return saved["value"]


@dataclass
class RunState:
    """Everything a mask-training run needs to continue exactly after a step.

    The loop trains these objects in place; :func:`save` writes them and :func:`restore` loads
    a checkpoint back into them.

    Attributes:
        params: the mask parameters by target name (DTensors when the model is sharded).
        optimizer: the mask parameters' optimiser.
        seed_source: the generator the per-step mask seeds come from.
        state: the method's ``TrainState`` (its schedule fields; ``aux`` is the method's).
        history: the logged values so far, one list of 0-dim tensors per key.
        root: the module whose parameters a method that trains weights trains.
        weight_optimizer: their optimiser; ``None`` for methods that train masks only.
        extras: tensors trained alongside the masks (``extra_parameters``).
        extra_optimizer: their optimiser; ``None`` without extras.
        rewound: a ticket's weights as of its rewind step, once taken.
        extra_state: the method's own state (``MaskMethod.extra_state``), as of ``step``.
        step: the last step completed (-1 before the first).
    """

    params: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    seed_source: torch.Generator
    state: Any
    history: dict[str, list[Tensor]]
    root: nn.Module
    weight_optimizer: torch.optim.Optimizer | None = None
    extras: list[Tensor] = field(default_factory=list)
    extra_optimizer: torch.optim.Optimizer | None = None
    rewound: dict[str, Tensor] | None = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    step: int = -1


def save(path: Path, identity: Mapping[str, Any], run: RunState) -> None:
    """Write ``run`` (as of ``run.step``) to ``path``, atomically."""
    tensors: dict[str, Tensor] = {}
    header: dict[str, Any] = {"identity": identity, "step": run.step}
    for name, value in run.params.items():
        tensors[f"params/{name}"] = _distributed.local(value.detach())
    header["optimizer"] = flatten_optimizer("optimizer", run.optimizer, tensors)
    if run.weight_optimizer is not None:
        for name, value in run.root.named_parameters():
            tensors[f"model/{name}"] = value.detach()
        header["weight_optimizer"] = flatten_optimizer(
            "weight_optimizer", run.weight_optimizer, tensors
        )
    for index, value in enumerate(run.extras):
        tensors[f"extras/{index}"] = value.detach()
    if run.extra_optimizer is not None:
        header["extra_optimizer"] = flatten_optimizer(
            "extra_optimizer", run.extra_optimizer, tensors
        )
    for name, value in (run.rewound or {}).items():
        tensors[f"rewound/{name}"] = value
    tensors["seed_source"] = run.seed_source.get_state()
    header["state"] = {k: v for k, v in vars(run.state).items() if k != "aux"}
    header["extra_state"] = encode(run.extra_state, "extra_state", tensors)
    header["history"] = {k: [float(x) for x in v] for k, v in run.history.items()}
    write(path, tensors, jsonable(header))


def restore(
    path: Path,
    identity: Mapping[str, Any],
    run: RunState,
    device: torch.device,
    remake_optimizer: Callable[[], torch.optim.Optimizer],
) -> None:
    """Load the checkpoint at ``path`` into ``run`` (``run.step`` is then its last step).

    Args:
        remake_optimizer: a new mask optimiser; used when the checkpoint is from a later
            round, whose optimiser was made afresh over the same parameters.
    """
    tensors, header = read(path, identity)
    with torch.no_grad():
        for name, value in run.params.items():
            _distributed.local(value).copy_(tensors[f"params/{name}"])
        if run.weight_optimizer is not None:
            for name, value in run.root.named_parameters():
                if f"model/{name}" in tensors:
                    value.copy_(tensors[f"model/{name}"])
        for index, value in enumerate(run.extras):
            value.copy_(tensors[f"extras/{index}"])
    for key, value in header["state"].items():
        setattr(run.state, key, value)
    run.extra_state = decode(header["extra_state"], tensors)
    if run.state.round != 0:
        run.optimizer = remake_optimizer()
    _load_optimizer(run.optimizer, "optimizer", header, tensors)
    _distributed.shard_optimizer_state(run.optimizer)
    if run.weight_optimizer is not None:
        _load_optimizer(run.weight_optimizer, "weight_optimizer", header, tensors)
    if run.extra_optimizer is not None:
        _load_optimizer(run.extra_optimizer, "extra_optimizer", header, tensors)
    run.seed_source.set_state(tensors["seed_source"])
    for key, values in header["history"].items():
        run.history[key] = [torch.tensor(v, device=device) for v in values]
    rewound = {
        name[len("rewound/") :]: value.to(device)
        for name, value in tensors.items()
        if name.startswith("rewound/")
    }
    run.rewound = rewound or None
    run.step = int(header["step"])


def _load_optimizer(optimizer, prefix: str, header: Mapping[str, Any], tensors) -> None:
    optimizer.load_state_dict(unflatten_optimizer(prefix, header[prefix], tensors))


def shard_file(base: Path, rank: int, processes: int) -> Path:
    """The file of rank ``rank``'s shard of the checkpoint ``base``."""
    return base.with_name(f"{base.name}.rank{rank}-of-{processes}")


def resuming(base: Path, path: Path, mesh, processes: int, world, device) -> bool:
    """Whether to resume from ``path`` (``base`` itself, or this rank's shard of it). Refuses,
    on every rank alike, shard files missing on some ranks and checkpoint files written by
    another number of processes or without sharding, rather than silently starting over."""
    exists = path.exists()
    expected = {path.name} | (
        {shard_file(base, r, processes).name for r in range(processes)}
        if mesh is not None
        else set()
    )
    found = [base.name] if base.exists() else []
    found += [p.name for p in base.parent.glob(glob.escape(base.name) + ".rank*-of-*")]
    foreign = sorted(set(found) - expected)
    flags = [int(exists), int(bool(foreign))]
    if world is not None:
        import torch.distributed as dist

        counts = torch.tensor(flags, device=device)
        dist.all_reduce(counts)
        flags = [int(c) for c in counts.tolist()]
    if flags[1] and not flags[0]:
        layout = f"{processes} FSDP shards" if mesh is not None else "one file"
        raise ValueError(
            f"The checkpoint {str(base)!r} was written in another layout than this run's "
            f"({layout}): found {foreign[:4] or 'them on another rank'}. Resume with the number "
            "of processes and the sharding it was written with, or delete those files (or pass "
            "another `checkpoint=` path) to start over."
        )
    if mesh is None and 0 < flags[0] < processes:
        raise ValueError(
            f"The checkpoint {str(base)!r} exists for {flags[0]} of the {processes} processes: "
            "rank 0 writes it and every rank reads it, so put it on a file system all of them "
            "share (or copy it to each machine) before resuming."
        )
    if mesh is not None and 0 < flags[0] < processes:
        raise ValueError(
            f"Only {flags[0]} of the {processes} shards of the checkpoint {str(base)!r} exist "
            f"(this rank's: {'found' if exists else 'missing'}). Resume with the same number of "
            "processes and all shard files, or delete them to start over."
        )
    return bool(exists)


def check_same_step(start: int, base: Path, world, device) -> None:
    """Refuse shards of one checkpoint saved at different steps (an interrupted save)."""
    import torch.distributed as dist

    steps = torch.tensor([start, -start], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if int(steps[0]) != -int(steps[1]):
        raise ValueError(
            f"The shards of the checkpoint {str(base)!r} are from different steps "
            f"({-int(steps[1])} to {int(steps[0])}): a save was interrupted. Delete the shard "
            "files to start over."
        )


def round_file(folder: str | os.PathLike, index: int) -> Path:
    """The checkpoint of ``lottery_ticket`` after ``index`` finished rounds."""
    return Path(folder) / f"round_{index:03d}.safetensors"


def last_round_file(folder: str | os.PathLike) -> Path | None:
    """The checkpoint of the most rounds in ``folder``; ``None`` if there is none."""
    if not os.path.isdir(folder):
        return None
    files = sorted(Path(folder).glob("round_*.safetensors"))
    return files[-1] if files else None


__all__ = [
    "RunState",
    "check_same_step",
    "decode",
    "differing",
    "encode",
    "flatten_optimizer",
    "jsonable",
    "last_round_file",
    "read",
    "read_file",
    "restore",
    "resuming",
    "round_file",
    "save",
    "shard_file",
    "unflatten_optimizer",
    "write",
]
