"""Step time of every learnable method, its lean layers against the layer-by-layer path, plain
fine-tuning and NeuroSurgeon, interleaved in one process (issue 21, goal 1).

All configurations share one model and its batches and run in turn, round after round; each
figure is the mean of the timed steps after a warm-up step, and the table gives the fastest
round (robust to other jobs on a shared machine) and the median, both as ratios to plain Adam
fine-tuning of the whole model. NeuroSurgeon (if installed) gets a copy: it replaces layers.

    python benchmarks/step_time.py                # GPT-2 4 x 256, batch 8 x 128, 3 rounds
    python benchmarks/step_time.py --quick        # tiny GPT-2, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mask_training_cost import (  # noqa: E402
    _has_neurosurgeon,
    _neurosurgeon,
    build,
    lm_loss,
    seconds_per_step,
    step_marks,
)

WARMUP, STEPS = 1, 3
PREDRAWN = "gumbel_sigmoid (4 samples), noise pre-drawn"
QUICK = ["gumbel_sigmoid (4 samples), lean", "trains weights", "NeuroSurgeon"]
MASKS = [  # (label, method, sample_batching, hyper-parameters)
    ("gumbel_sigmoid (4 samples), lean layers", "gumbel_sigmoid", "auto", {}),
    ("gumbel_sigmoid (4 samples), layer by layer", "gumbel_sigmoid", "sequential", {}),
    ("gumbel_sigmoid (1 sample), lean layers", "gumbel_sigmoid", "auto", {"mask_samples": 1}),
    # analysis, not a configuration a user runs: the same steps with their random draws taken
    # out (each noise shape drawn once, before the timed steps), i.e. the share of the CPU's
    # serial random number generator in the step; on a GPU the draws cost little
    (PREDRAWN, "gumbel_sigmoid", "auto", {}),
    ("continuous_sparsification_lepori, lean", "continuous_sparsification_lepori", "auto", {}),
    (
        "continuous_sparsification_lepori, layer by layer",
        "continuous_sparsification_lepori",
        "sequential",
        {},
    ),
    ("hard_concrete, lean layers", "hard_concrete", "auto", {}),
    ("hard_concrete, layer by layer", "hard_concrete", "sequential", {}),
    ("continuous_sparsification (trains weights)", "continuous_sparsification", "auto", {}),
]


@contextlib.contextmanager
def _predrawn_noise(active: bool):
    """While active, Gumbel-sigmoid's logistic noise of each shape is drawn once and then reused
    (the steps do every other operation as usual)."""
    from subnet_interp.methods import gumbel_sigmoid

    real = gumbel_sigmoid.logistic_noise
    drawn: dict = {}

    def reused(shape, generator, device, eps=1e-10):
        key = (tuple(shape), str(device))
        if key not in drawn:
            drawn[key] = real(shape, generator, device, eps)
        return drawn[key]  # read, never written: gumbel_sigmoid adds it out of place

    if active:
        gumbel_sigmoid.logistic_noise = reused
    try:
        yield
    finally:
        gumbel_sigmoid.logistic_noise = real


def configurations(model, batches) -> dict:
    import subnet_interp as si

    def finetune() -> float:
        tuned = copy.deepcopy(model)
        optimizer = torch.optim.Adam(tuned.parameters(), lr=1e-4)
        times = []
        for i in range(WARMUP + STEPS):
            start = time.perf_counter()
            loss = lm_loss(tuned, batches[i % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return statistics.mean(times[WARMUP:])

    def masks(method, batching, hparams, predrawn=False):
        def run() -> float:
            with step_marks("cpu") as marks, _predrawn_noise(predrawn):  # no logging inside
                si.find(
                    model,
                    si.methods.create(method, **hparams),
                    lm_loss,
                    batches,
                    steps=WARMUP + STEPS + 1,
                    log_every=10**9,
                    progress=False,
                    sample_batching=batching,
                )
            return seconds_per_step(marks, WARMUP, STEPS)

        return run

    found = {"plain fine-tuning (Adam, all weights)": finetune}
    for label, method, batching, hparams in MASKS:
        found[label] = masks(method, batching, hparams, predrawn=label == PREDRAWN)
    if _has_neurosurgeon():
        found["NeuroSurgeon 0.1.0 continuous sparsification"] = lambda: _neurosurgeon(
            copy.deepcopy(model), batches, "cpu", WARMUP, STEPS
        )
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only configurations whose label contains one"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_name = "tiny" if args.quick else "gpt2-4x256"
    rounds = 1 if args.quick else args.rounds
    model, batches = build(model_name, "cpu")
    runs = configurations(model, batches)
    base = "plain fine-tuning (Adam, all weights)"
    # --quick: one configuration per timing path (fused samples, two optimisers, NeuroSurgeon)
    only = args.only or (QUICK if args.quick else None)
    if only:
        runs = {k: v for k, v in runs.items() if k == base or any(o in k for o in only)}
    seconds = {label: [] for label in runs}
    for index in range(rounds):
        for label, run in runs.items():
            seconds[label].append(run())
        print(f"round {index}: " + ", ".join(f"{k}: {v[-1]:.3f}" for k, v in seconds.items()))
    fastest, median = min(seconds[base]), statistics.median(seconds[base])
    print(f"\nmodel={model_name} threads={args.threads} rounds={rounds} (ratios to {base})")
    print(f"{'configuration':52s} {'s/step':>8s} {'fastest':>8s} {'median':>8s}")
    rows = []
    for label, values in seconds.items():
        row = {
            "configuration": label,
            "seconds": values,
            "ratio_fastest": min(values) / fastest,
            "ratio_median": statistics.median(values) / median,
        }
        rows.append(row)
        print(
            f"{label:52s} {min(values):8.3f} {row['ratio_fastest']:8.3f} {row['ratio_median']:8.3f}"
        )
    os.makedirs(args.out, exist_ok=True)
    record = {
        "benchmark": "step_time",
        "model": model_name,
        "threads": args.threads,
        "rounds": rounds,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    name = f"step_time_{model_name}_cpu.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
