"""Where a mask-training step spends its time, next to a fine-tuning step (torch.profiler).

Prints the top operators by self CPU time for plain fine-tuning and for one learnable method on
the same model and batches, and the step-time ratio measured in the same run.

    python benchmarks/profile_mask_step.py --method continuous_sparsification_lepori
    python benchmarks/profile_mask_step.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mask_training_cost import build, lm_loss  # noqa: E402

import subnet_interp as si  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["gpt2-small", "tiny"], default="gpt2-small")
    parser.add_argument("--method", default="continuous_sparsification_lepori")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps = "tiny", 2
    model, batches = build(args.model, "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def finetune(steps):
        for i in range(steps):
            loss = lm_loss(model, batches[i % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def masks(steps):
        si.find(model, args.method, lm_loss, batches, steps=steps, log_every=10**9, progress=False)

    results = {}
    tables = {}
    for label, fn in (("finetune", finetune), (args.method, masks)):
        fn(1)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn(args.steps)
            results[label] = (time.perf_counter() - start) / args.steps
        tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"== {label}: {results[label]:.3f} s/step (under the profiler)\n{tables[label]}")
    ratio = results[args.method] / results["finetune"]
    print(f"step-time ratio {args.method} / finetune = {ratio:.3f} (profiled run)")
    os.makedirs(args.out, exist_ok=True)
    name = f"profile_{args.method}_{args.model}{'_quick' if args.quick else ''}"
    with open(os.path.join(args.out, name + ".txt"), "w") as handle:
        for label, table in tables.items():
            handle.write(f"== {label}: {results[label]:.3f} s/step\n{table}\n")
    with open(os.path.join(args.out, name + ".json"), "w") as handle:
        json.dump(
            {
                "benchmark": "profile_mask_step",
                "model": args.model,
                "method": args.method,
                "rows": [{"config": k, "seconds_per_step": v} for k, v in results.items()],
                "ratio": ratio,
            },
            handle,
            indent=2,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
