"""Memory per masked weight of mask training on one process vs sharded with FSDP2 over 2
processes (CPU, gloo): what sharding the mask parameters saves, measured; and the per-GPU
memory plan for 1B and 7B models sharded over N GPUs that follows from it.

The models are bias-free ReLU MLPs with fp32 weights (batch 8), every Linear wrapped with
``fully_shard`` (one FSDP unit per layer) and then the root. Two shapes with the same 16.8M
masked weights, 4 x 2048^2 and 16 x 1024^2, separate what scales with the shard from what
scales with one FSDP unit (the gathered weight, mask and gradient of the layer being computed).
Each configuration runs in fresh processes with glibc's mmap threshold fixed at 1 MiB (see
``mask_memory.py``); ``peak`` = (peak RSS during ``si.find`` - RSS before it) / masked weights
of the whole model, per process; ``state`` = the persistent mask state each process holds
(parameters + gradients + Adam moments of its shard).

Per process, ``peak - state = a + b * unit / total`` (``state`` per process): fitted on the two
shapes, ``a`` are
temporaries the size of the shard (the optimiser's), ``b`` bytes per weight of the unit being
computed. The plan assumes ``a`` shrinks as 1/N, like the shard, and adds the frozen bf16
weights' shard (2 bytes per parameter / N); activations come on top.

    python benchmarks/fsdp_memory.py            # both shapes, fit, plan (about 2 minutes)
    python benchmarks/fsdp_memory.py --quick    # small MLPs, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mask_memory import peak_bytes, rss_bytes, write_record  # noqa: E402

SHAPES = [(4, 2048), (16, 1024)]  # (layers, width): the same 16.8M masked weights
GPUS = (1, 2, 4, 8)
CONFIGS = {
    "1 process, fp32 + Adam, recompute": dict(world=1, dtype="float32", checkpointing=False),
    "FSDP 2 processes, fp32 + Adam": dict(world=2, dtype="float32", checkpointing=False),
    "FSDP 2 processes, fp32 + Adam, activation checkpointing": dict(
        world=2, dtype="float32", checkpointing=True
    ),
    "1 process, bf16 + Adam, recompute": dict(world=1, dtype="bfloat16", checkpointing=False),
    "FSDP 2 processes, bf16 + Adam, activation checkpointing": dict(
        world=2, dtype="bfloat16", checkpointing=True
    ),
}
METHOD = "continuous_sparsification_lepori"


def child(config: dict) -> dict:
    import torch.distributed as dist

    import subnet_interp as si

    world = config["world"]
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    width, layers = config["width"], config["layers"]
    torch.manual_seed(0)
    linears = [torch.nn.Linear(width, width, bias=False) for _ in range(layers)]
    model = torch.nn.Sequential(*[m for lin in linears for m in (lin, torch.nn.ReLU())])
    masked = sum(t.numel for t in si.targets(model).values())
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, width, generator=generator), torch.randn(8, width, generator=generator)
    batches = [(x.chunk(world)[rank], y.chunk(world)[rank])]

    def loss_fn(net, batch):
        return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

    # warm up on a tiny copy (lazy imports, thread pools, allocator arenas) before measuring
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    si.find(tiny, METHOD, loss_fn, [(torch.randn(8, 8), torch.randn(8, 8))], steps=2,
            progress=False)  # fmt: skip
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for lin in linears:
            if config["checkpointing"]:
                from torch.distributed._composable import checkpoint

                checkpoint(lin)
            fully_shard(lin, mesh=mesh)
        fully_shard(model, mesh=mesh)
    before = rss_bytes()
    si.find(
        model, METHOD, loss_fn, batches, steps=3, progress=False,
        mask_dtype=getattr(torch, config["dtype"]), recompute_masks=True,
    )  # fmt: skip
    peak = (peak_bytes() - before) / masked
    element = torch.finfo(getattr(torch, config["dtype"])).bits // 8
    state = 4 * element / world  # values, grads and Adam's two moments, each rank its shard
    if world > 1:
        dist.destroy_process_group()
    result = {"rank": rank, "masked": masked, "peak": peak, "state": state}
    with open(f"{config['report']}.{rank}.json", "w") as f:
        json.dump(result, f)
    return result


def run(config: dict) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    with tempfile.TemporaryDirectory() as folder:
        config = {**config, "report": os.path.join(folder, "rank")}
        arguments = [__file__, "--child", json.dumps(config)]
        if config["world"] > 1:
            arguments = ["-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={config['world']}", *arguments]  # fmt: skip
        subprocess.run(
            [sys.executable, *arguments], capture_output=True, text=True, check=True, env=env
        )
        reports = []
        for rank in range(config["world"]):
            with open(f"{config['report']}.{rank}.json") as f:
                reports.append(json.load(f))
        return reports


def fit(rows: list[dict], shapes, configs) -> dict[str, tuple[float, float]]:
    """``peak - state = a + b * unit/total`` per sharded configuration, from the two shapes."""
    fits = {}
    for label, config in configs.items():
        if config["world"] == 1:
            continue
        points = [
            (1 / layers, r["peak"] - r["state"])
            for layers, width in shapes
            for r in rows
            if r["config"] == label and r["layers"] == layers
        ]
        (x0, y0), (x1, y1) = points
        b = (y0 - y1) / (x0 - x1)
        fits[label] = (y1 - b * x1, b)
    return fits


def plan(fits: dict[str, tuple[float, float]]) -> list[dict]:
    """Per-GPU GiB for Llama-shaped models, one FSDP unit per decoder layer."""
    import transformers
    from mask_memory import PLAN_MODELS

    import subnet_interp as si

    options = {  # mask state bytes per weight (values, grads, 2 Adam moments) and the fit used
        "fp32 + Adam": (16, "FSDP 2 processes, fp32 + Adam, activation checkpointing"),
        "bf16 + Adam": (8, "FSDP 2 processes, bf16 + Adam, activation checkpointing"),
    }
    rows = []
    for model_label, shape in PLAN_MODELS.items():
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
        params = sum(p.numel() for p in model.parameters())
        targets = si.targets(model)
        masked = sum(t.numel for t in targets.values())
        unit = sum(t.numel for n, t in targets.items() if n.startswith("blocks.0."))
        for option, (state, fitted) in options.items():
            if fitted not in fits:  # --quick measures one of them
                continue
            a, b = fits[fitted]
            row = {"model": model_label, "option": option, "parameters": params,
                   "masked": masked, "unit": unit}  # fmt: skip
            for n in GPUS:
                total = 2 * params / n + (state / n + a * 2 / n) * masked + b * unit
                row[str(n)] = total / 2**30
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    shapes = [(2, 512), (8, 256)] if args.quick else SHAPES
    # quick: only one configuration the plan is fitted on
    quick = "FSDP 2 processes, fp32 + Adam, activation checkpointing"
    configs = {k: v for k, v in CONFIGS.items() if k == quick or not args.quick}
    rows = []
    for layers, width in shapes:
        for label, config in configs.items():
            ranks = run({**config, "width": width, "layers": layers})
            peak = max(r["peak"] for r in ranks)
            rows.append({"config": label, **config, "layers": layers, "width": width,
                         "state": ranks[0]["state"], "peak": peak})  # fmt: skip
            print(f"{layers:2d} x {width:4d}  {label:58s} state {ranks[0]['state']:5.2f} B/w   "
                  f"peak per process {peak:6.2f} B/w", flush=True)  # fmt: skip
    fits = fit(rows, shapes, configs)
    table = plan(fits)
    print("\nFit per process at N=2: peak = state (per process) + a + b * unit/total")
    for label, (a, b) in fits.items():
        print(f"  {label:58s} a {a:5.2f} B/w   b {b:5.1f} B per unit weight")
    print("\nPer-GPU plan (GiB; weights bf16, activations not included):")
    for row in table:
        cells = "  ".join(f"N={n}: {row[str(n)]:.1f}" for n in GPUS)
        print(f"  {row['model']:30s} {row['option']:14s} {cells}")
    name = "fsdp_memory_quick.json" if args.quick else "fsdp_memory.json"
    write_record(args.out, name, {
        "method": METHOD,
        "shapes": [{"layers": layers, "width": width} for layers, width in shapes],
        "rows": rows,
        "fit": {k: {"a": a, "b": b} for k, (a, b) in fits.items()},
        "plan": table,
    })  # fmt: skip


if __name__ == "__main__":
    main()
