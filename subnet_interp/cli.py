"""The ``subnet-interp`` command: ``demo``, ``methods``, ``show``, ``find``, ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    import subnet_interp as si
    from subnet_interp.analysis import ablation_effect, accuracy, head_scores, top_heads
    from subnet_interp.tasks import (
        induction_accuracy,
        induction_loss,
        next_token_loss,
        predictable_positions,
        repeated_tokens,
        tiny_gpt2,
        train,
    )

    fast = args.fast or os.environ.get("SUBNET_INTERP_FAST") == "1"
    train_steps, mask_steps, controls = (150, 60, 5) if fast else (1500, 400, 20)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    print(
        f"subnet-interp demo: induction heads in a 2-layer GPT-2 ({'fast' if fast else 'full'} mode, {device})"
    )
    torch.manual_seed(0)
    model = tiny_gpt2().to(device)
    # fresh sequences every step: with few, the model memorises them instead of learning induction
    data = [
        b.to(device)
        for b in repeated_tokens(train_steps, 32, generator=torch.Generator().manual_seed(0))
    ]
    held_out = [
        b.to(device) for b in repeated_tokens(8, 64, generator=torch.Generator().manual_seed(1))
    ]
    losses = train(model, next_token_loss, data, steps=train_steps, lr=1e-3)
    with torch.no_grad():
        full_acc = float(torch.stack([induction_accuracy(model, b) for b in held_out]).mean())
    print(
        f"1. trained {train_steps} steps: final loss {losses[-1]:.3f}, accuracy on repeated tokens {full_acc:.3f}"
    )

    # Csordás et al. 2021; they train 10-20k mask steps with the penalty divided by the batch
    # size, we leave the division out to sparsify within a few hundred steps
    # (fast mode, a smoke test of 60 steps, also raises the learning rate so that logits
    # starting at 2 can cross 0 at all)
    method = si.methods.create(
        "gumbel_sigmoid", per_example_penalty=False, **({"lr": 5e-2} if fast else {})
    )
    result = si.find(
        model,
        method,
        induction_loss,
        data[:64],
        targets="blocks.*.attn.*",
        steps=mask_steps,
        progress=not fast,
    )
    sub = result.subnetwork
    print(
        f"2. {method.name} over the attention weights, {mask_steps} steps: density {sub.density():.3f}"
    )
    for name, density in sub.densities().items():
        print(f"     {name:22s} {density:.3f}")

    metric = accuracy(predictable_positions)
    report = ablation_effect(
        model, sub, metric, held_out, controls=controls, generator=torch.Generator().manual_seed(0)
    )
    print("3. induction accuracy, subnetwork vs density-matched random controls")
    for line in str(report).splitlines():
        print("     " + line)
    scores = head_scores(model, sub)
    print("4. heads the subnetwork keeps most of (layer.head: fraction of Q/K/V/O weights kept)")
    print(
        "     "
        + ", ".join(f"{layer}.{head}: {score:.2f}" for layer, head, score in top_heads(scores, 4))
    )

    path = os.path.join(args.out, "induction_subnetwork.safetensors")
    sub.save(path)
    written = [path]
    try:
        from subnet_interp.analysis import plot_ablation, plot_densities

        heads, ablation = (
            os.path.join(args.out, "heads.png"),
            os.path.join(args.out, "ablation.png"),
        )
        plot_densities(model, sub, by="head", path=heads)
        written.append(heads)  # only once it exists: the plot raises without matplotlib
        plot_ablation(report, path=ablation)
        written.append(ablation)
    except ImportError:
        print("   (install subnet_interp[plots] for the figures)")
    from subnet_interp.analysis import html_report

    page = os.path.join(args.out, "report.html")
    html_report(model, sub, path=page, ablation_report=report, title="induction subnetwork (demo)")
    written.append(page)
    print("5. wrote " + ", ".join(written))
    print(f"done in {time.time() - start:.0f} s")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import subnet_interp as si

    for name in si.methods.names():
        cls = si.methods.get(name)
        doc = inspect.getdoc(cls) or ""
        print(f"{name}")
        print("  " + doc.splitlines()[0] if doc else "")
        defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"  defaults: {defaults}")
        if args.verbose:
            print("\n".join("    " + line for line in doc.splitlines()[1:]))
        print()
    return 0


def _show(args: argparse.Namespace) -> int:
    import subnet_interp as si

    sub = si.Subnetwork.load(args.file)
    meta = dict(sub.meta)
    print(f"{args.file}")
    print(
        f"  method: {meta.get('method', '?')}   steps: {meta.get('steps', '?')}   fingerprint: {meta.get('fingerprint', '?')}"
    )
    if meta.get("hparams"):
        print("  hparams: " + ", ".join(f"{k}={v}" for k, v in meta["hparams"].items()))
    print(
        f"  targets: {len(sub)}   kept {sub.kept():,} of {sub.numel():,} weights (density {sub.density():.4f})"
    )
    for name, density in sub.densities().items():
        print(f"    {name:40s} {tuple(sub[name].shape)!s:22s} {density:.4f}")
    return 0


CONFIG_KEYS = {
    "model": "import path 'package.module:function' returning the model (called with no args)",
    "data": "import path of a function (rank, world_size) -> iterable of batches (this rank's shard)",
    "loss": "import path of loss_fn(model, batch) -> scalar tensor",
    "method": "registered method name",
    "steps": "number of steps",
    "out": "path of the .safetensors file to write (rank 0 only)",
}
CONFIG_OPTIONAL = {
    "hparams": {},
    "targets": None,
    "seed": 0,
    "device": None,
    "checkpoint": None,
    "checkpoint_every": 100,
    "log_every": 10,
    "recompute_masks": False,
    "mask_dtype": "float32",
    "shard": None,
}
SHARD_HELP = (
    "glob of module paths (e.g. 'transformer.h.*'): under torchrun, FSDP2's fully_shard is "
    "applied to each matching module with parameters, then to the whole model, so weights and "
    "mask parameters are sharded over the ranks"
)


def _load_object(path: str, key: str, kind: str = "config"):
    import importlib

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{kind} {key!r} must look like 'package.module:function', got {path!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"{kind} {key!r}: cannot import {module_name!r} ({error}).") from error
    if not hasattr(module, attribute):
        raise ValueError(f"{kind} {key!r}: {module_name!r} has no {attribute!r}.")
    return getattr(module, attribute)


def _report(args: argparse.Namespace) -> int:
    """Write one self-contained HTML page about a saved subnetwork (si.analysis.html_report)."""
    import subnet_interp as si
    from subnet_interp.analysis import Circuit, html_report

    if (args.data is None) != (args.metric is None):
        raise ValueError(
            "--data and --metric go together: the ablation section measures the metric on the "
            "data. Pass both (and --model), or neither."
        )
    if args.data is not None and args.model is None:
        raise ValueError("--data and --metric measure the model: pass --model as well.")
    sub = si.Subnetwork.load(args.file)
    model = None if args.model is None else _load_object(args.model, "--model", "option")()
    data = None if args.data is None else list(_load_object(args.data, "--data", "option")())
    metric = None if args.metric is None else _load_object(args.metric, "--metric", "option")
    html_report(
        model,
        sub,
        path=args.out,
        data=data,
        metric=metric,
        controls=args.controls,
        circuit=None if args.circuit is None else Circuit.load(args.circuit),
        compare=None if args.compare is None else si.Subnetwork.load(args.compare),
        top_k=args.top_k,
        source=os.path.basename(args.file),
    )
    print(f"wrote {args.out}")
    return 0


def _find(args: argparse.Namespace) -> int:
    """Run si.find from a JSON config; under torchrun, one process per rank (gloo on CPU, nccl on
    GPUs): the masks train data-parallel and rank 0 writes the result."""
    import json

    import torch
    import torch.distributed as dist

    import subnet_interp as si
    from subnet_interp import adapters

    with open(args.config) as f:
        config = json.load(f)
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = [k for k in config if k not in CONFIG_KEYS and k not in CONFIG_OPTIONAL]
    if missing or unknown:
        described = "; ".join(f"{k}: {v}" for k, v in CONFIG_KEYS.items())
        raise ValueError(
            f"config {args.config!r}: missing keys {missing}, unknown keys {unknown}. Required: "
            f"{described}. Optional: {sorted(CONFIG_OPTIONAL)}."
        )
    config = {**CONFIG_OPTIONAL, **config}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        device = config["device"]
        if device is None and torch.cuda.is_available() and world_size > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        model = _load_object(config["model"], "model")()
        if config["shard"] is not None:
            sharded = _shard(model, config["shard"], world_size)
            if rank == 0:
                print(f"sharded {sharded} over {world_size} processes with FSDP2", flush=True)
        root = adapters.resolve(model).root(model)
        if adapters.fsdp_mesh(model, root) is not None:
            device = None  # FSDP placed the shards (the model factory may shard it, too)
        data = _load_object(config["data"], "data")(rank, world_size)
        loss_fn = _load_object(config["loss"], "loss")
        result = si.find(
            model,
            si.methods.create(config["method"], **config["hparams"]),
            loss_fn,
            data,
            steps=config["steps"],
            targets=config["targets"],
            device=device,
            generator=torch.Generator().manual_seed(int(config["seed"])),
            progress=rank == 0,
            log_every=config["log_every"],
            checkpoint=config["checkpoint"],
            checkpoint_every=config["checkpoint_every"],
            recompute_masks=config["recompute_masks"],
            mask_dtype=getattr(torch, config["mask_dtype"]),
        )
        if rank == 0:
            result.subnetwork.save(config["out"])
            print(
                f"wrote {config['out']}: density {result.subnetwork.density():.4f} after "
                f"{config['steps']} steps on {world_size} process(es)"
            )
        if started:
            dist.barrier()  # no process tears the group down while another still writes
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _shard(model, pattern: str, world_size: int) -> str:
    import fnmatch

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from subnet_interp import adapters

    if not isinstance(pattern, str):
        raise ValueError(f"config 'shard' must be a glob string ({SHARD_HELP}); got {pattern!r}.")
    if world_size < 2:
        raise ValueError(
            "config 'shard' needs several processes: start the command with torchrun "
            "--nproc_per_node N (N >= 2)."
        )
    root = adapters.resolve(model).root(model)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        mesh = init_device_mesh("cuda", (world_size,))
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    blocks, chosen = [], []
    for path, module in root.named_modules():  # parents come before their children
        if not path or not fnmatch.fnmatchcase(path, pattern):
            continue
        if any(path.startswith(parent + ".") for parent in chosen):
            continue  # `*` also matches dots: inside a block already chosen
        if any(True for _ in module.parameters()):
            chosen.append(path)
            blocks.append(module)
    if not blocks:
        paths = [path for path, _ in root.named_modules() if path][:12]
        raise ValueError(
            f"config 'shard' {pattern!r} matches no module with parameters; module paths look "
            f"like {paths}."
        )
    for module in blocks:
        fully_shard(module, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return f"{len(chosen)} module(s) matching {pattern!r} ({', '.join(chosen[:3])}{', ...' if len(chosen) > 3 else ''}) and the model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subnet-interp", description="Find, attach and analyse weight-level subnetworks."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a tiny model, find its induction subnetwork, report and plot"
    )
    demo.add_argument(
        "--out", default="subnet_interp_demo", help="folder for the subnetwork file and plots"
    )
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--fast", action="store_true", help="a few seconds, for smoke tests")
    demo.set_defaults(run=_demo)
    methods = commands.add_parser(
        "methods", help="list the registered methods, their defaults and citations"
    )
    methods.add_argument("-v", "--verbose", action="store_true", help="full docstrings")
    methods.set_defaults(run=_methods)
    show = commands.add_parser("show", help="summarise a saved subnetwork file")
    show.add_argument("file")
    show.set_defaults(run=_show)
    find = commands.add_parser(
        "find",
        help="run si.find from a JSON config (start it with torchrun for data-parallel or FSDP2 "
        "training)",
    )
    find.add_argument("config", help="JSON file; keys: " + ", ".join(CONFIG_KEYS))
    find.set_defaults(run=_find)
    report = commands.add_parser(
        "report",
        help="write one self-contained HTML page about a saved subnetwork: metadata, densities, "
        "heads and neurons, ablation against random controls and a circuit graph",
    )
    report.add_argument("file", help="the subnetwork's .safetensors file")
    report.add_argument("-o", "--out", default="report.html", help="the HTML file to write")
    report.add_argument(
        "--model",
        help="'package.module:function' returning the model (called with no arguments), for the "
        "head, neuron and circuit-graph sections",
    )
    report.add_argument(
        "--data",
        help="'package.module:function' returning evaluation batches (called with no arguments), "
        "for the ablation section (needs --model and --metric)",
    )
    report.add_argument(
        "--metric",
        help="'package.module:name' of a si.analysis.Metric or of fn(model, batch) -> loss "
        "(lower is better)",
    )
    report.add_argument("--controls", type=int, default=20, help="random controls (default 20)")
    report.add_argument(
        "--circuit", help="a circuit JSON file (Circuit.save, EAP-IG / MIB) to draw instead"
    )
    report.add_argument("--compare", help="another subnetwork file of the same targets")
    report.add_argument(
        "--top-k", type=int, default=40, help="edges in the circuit graph (default 40)"
    )
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError) as error:
        print(f"subnet-interp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
