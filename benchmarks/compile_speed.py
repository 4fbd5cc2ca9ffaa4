"""Step time under ``torch.compile``: fine-tuning and mask training, eager against compiled.

Same model and batches as ``mask_training_cost.py``, in one process, each configuration after
``--warmup`` untimed steps (the compiled ones compile there). ``si.find`` is given the compiled
model (``torch.compile(model)``): masks attach to the model underneath and are sampled outside
the compiled graph, one mask sample at a time, so the graph compiles once (the first round),
and later runs reuse it. Configurations are interleaved over ``--rounds`` rounds; the fastest round counts (contention
only adds time; the median is in the JSON).
Printed as ratios to eager fine-tuning, with each configuration's compiled/eager speed-up;
absolute times are not comparable across machines or runs.

    python benchmarks/compile_speed.py --model gpt2-4x256            # inductor, CPU
    python benchmarks/compile_speed.py --quick                       # tiny, aot_eager: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mask_training_cost import build, lm_loss, sync, time_steps  # noqa: E402

METHODS = ["gumbel_sigmoid", "continuous_sparsification_lepori", "hard_concrete"]


def finetune(model, batches, device, warmup, steps) -> float:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(i):
        loss = lm_loss(model, batches[i % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return time_steps(step, device, warmup, steps)


def mask_training(model, method, batches, device, warmup, steps) -> float:
    import subnet_interp as si

    times = {}

    def timer(step, record):
        sync(device)
        times[step] = time.perf_counter()

    total = warmup + steps
    si.find(model, method, lm_loss, batches, steps=total, callbacks=[timer], log_every=warmup, progress=False)  # fmt: skip
    return (times[total - 1] - times[warmup]) / (total - 1 - warmup)


def measure(config: str, runners: dict, batches, args) -> float:
    """Seconds per step of one configuration (``kind:mode``) on the eager or compiled model."""
    kind, _, mode = config.partition(":")
    if kind == "finetune":
        return finetune(runners[mode], batches, args.device, args.warmup, args.steps)
    return mask_training(runners[mode], kind, batches, args.device, args.warmup, args.steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=["gpt2-small", "gpt2-4x256", "tiny"], default="gpt2-4x256"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each config (median)")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--quick", action="store_true", help="tiny model, aot_eager, 2 steps")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.backend, args.steps, args.warmup, args.rounds = (
            "tiny",
            "aot_eager",
            2,
            1,
            1,
        )
        args.methods = args.methods[:1]
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    configs = [
        f"{kind}:{mode}" for kind in ["finetune", *args.methods] for mode in ("eager", "compiled")
    ]
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, batches = build(args.model, args.device)
    runners = {"eager": model, "compiled": torch.compile(model, backend=args.backend)}
    # every configuration once per round, rounds interleaved (the machine's load drifts); the
    # first round compiles (in each run's untimed warm-up steps), later ones reuse the graphs
    times = {config: [] for config in configs}
    graphs = {}
    for _ in range(args.rounds):
        for config in configs:
            before = counters["stats"]["unique_graphs"]
            times[config].append(measure(config, runners, batches, args))
            graphs[config] = graphs.get(config, 0) + counters["stats"]["unique_graphs"] - before
    rows = [
        {
            "config": config,
            # the fastest round: on a shared machine contention only ever adds time
            "seconds_per_step": min(times[config]),
            "median_seconds_per_step": statistics.median(times[config]),
            "rounds": times[config],
            "graphs_compiled": graphs[config],
        }
        for config in configs
    ]
    breaks = sum(counters["graph_break"].values())
    base = rows[0]["seconds_per_step"]
    by_config = {row["config"]: row for row in rows}
    print(
        f"model={args.model} device={args.device} backend={args.backend} steps={args.steps} "
        f"rounds={args.rounds} graph breaks={breaks} (fastest round's s/step; graphs compiled per config)"
    )
    print(f"{'config':42s} {'s/step':>9s} {'vs eager FT':>11s} {'speed-up':>9s} {'graphs':>6s}")
    for row in rows:
        kind, _, mode = row["config"].partition(":")
        row["time_ratio"] = row["seconds_per_step"] / base
        eager = by_config[f"{kind}:eager"]["seconds_per_step"]
        row["compile_speedup"] = eager / row["seconds_per_step"]
        print(
            f"{row['config']:42s} {row['seconds_per_step']:9.4f} {row['time_ratio']:11.3f} "
            f"{row['compile_speedup']:9.3f} {row['graphs_compiled']:6d}"
        )
    record = {
        "benchmark": "compile_speed",
        "model": args.model,
        "device": args.device,
        "backend": args.backend,
        "steps": args.steps,
        "rounds": args.rounds,
        "graph_breaks": breaks,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = f"compile_speed_{args.model}_{args.device}.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
