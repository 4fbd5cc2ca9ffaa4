"""Analysis speed: overlap_test on GPT-2-small-sized masks, and N control masks evaluated by
ablation_effect (one attachment, masks swapped) against a naive loop of `si.masked` blocks.

    python benchmarks/analysis_speed.py            # 124M-weight masks, tiny GPT-2 for controls
    python benchmarks/analysis_speed.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

import subnet_interp as si
from subnet_interp.analysis import ablation_effect, kl_to_full, overlap_test

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_SHAPES = (
    [(768, 2304)] * 12
    + [(768, 768)] * 12
    + [(768, 3072)] * 12
    + [(3072, 768)] * 12
    + [(50257, 768)]
)


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--controls", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(s[0] // 16, s[1] // 16) for s in GPT2_SHAPES] if args.quick else GPT2_SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    a = si.Subnetwork(
        {f"t{i}": torch.rand(s, generator=gen, device=device) < 0.1 for i, s in enumerate(shapes)}
    )
    b = si.Subnetwork(
        {f"t{i}": torch.rand(s, generator=gen, device=device) < 0.2 for i, s in enumerate(shapes)}
    )
    rows = [
        {
            "what": f"overlap_test, {a.numel():,} weights",
            "seconds": timed(lambda: overlap_test(a, b)),
        }
    ]

    from subnet_interp.tasks import repeated_tokens, tiny_gpt2

    model = tiny_gpt2().to(device)
    data = [t.to(device) for t in repeated_tokens(2, 32)]
    sub = si.Subnetwork(
        {
            n: torch.rand(t.shape, generator=gen, device=device) < 0.5
            for n, t in si.targets(model).items()
        }
    )
    controls = 3 if args.quick else args.controls
    metric = kl_to_full(lambda m, batch: m(batch).logits)

    def batched():
        ablation_effect(model, sub, metric, data, controls=controls, strict=False)

    def naive():
        references = [model(batch).logits.detach() for batch in data]
        for config in [sub, ~sub] + [
            si.random_like(sub, torch.Generator().manual_seed(i)) for i in range(controls)
        ]:
            with torch.no_grad(), si.masked(model, config):
                for batch, ref in zip(data, references, strict=True):
                    metric.fn(model, batch, ref)

    with torch.no_grad():
        t_batched, t_naive = timed(batched), timed(naive)
    rows.append(
        {"what": f"ablation_effect, {controls} controls, one attachment", "seconds": t_batched}
    )
    rows.append(
        {
            "what": f"naive loop of si.masked blocks, same {controls + 2} masks",
            "seconds": t_naive,
            "ratio_to_ablation_effect": t_naive / t_batched,
        }
    )
    for row in rows:
        extra = (
            f"  ({row['ratio_to_ablation_effect']:.2f}x ablation_effect)"
            if "ratio_to_ablation_effect" in row
            else ""
        )
        print(f"{row['what']:60s} {row['seconds']:8.3f} s{extra}")
    os.makedirs(args.out, exist_ok=True)
    record = {
        "benchmark": "analysis_speed",
        "device": args.device,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(
        os.path.join(
            args.out, f"analysis_speed_{args.device}{'_quick' if args.quick else ''}.json"
        ),
        "w",
    ) as handle:
        json.dump(record, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
