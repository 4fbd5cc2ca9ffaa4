"""Step time over a whole continuous-sparsification run, early against late (issue 21).

As the temperature ``T`` of ``sigmoid(T * s)`` grows to 200, gates whose ``T * s`` falls in
roughly (-104, -64) scale their weights to subnormal floats (under 1.2e-38). CPU matrix products
with a fraction of a percent of subnormal operands run many times slower, so a run can slow
down as it goes. ``continuous_sparsification_lepori`` sets gates of at most ``2**-63`` to exactly
0 (``soft_gate``); this script times, in one process on one model and the same batches:

- ``continuous_sparsification_lepori`` as shipped (the cut);
- the same run with the plain ``sigmoid(T * s)`` gate (the arithmetic NeuroSurgeon's layers do);
- NeuroSurgeon 0.1.0 (if installed), its temperature raised each step on the same geometric
  schedule (1 to 200 over the run, as its documented callback does per epoch), Adam at
  ``lr = 1e-2``, the same loss plus its L0 term.

Printed: milliseconds per step in each fifth of the run and the last fifth over the first; for
the plain gate, the fraction of masked weights that are subnormal at the end.

    python benchmarks/long_run_gates.py            # GPT-2 2 x 128, batch 8 x 32, 1000 steps
    python benchmarks/long_run_gates.py --quick    # 40 steps: a smoke test
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mask_training_cost import _has_neurosurgeon, next_token_loss, step_marks  # noqa: E402

FIFTHS = 5


def build(seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=128, vocab_size=512, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [torch.randint(0, 512, (8, 32)) for _ in range(8)]
    return model, batches


def loss_fn(model, batch):
    return next_token_loss(model(batch).logits, batch)


def by_fifth(ends: list[float], steps: int) -> list[float]:
    """Milliseconds per step in each fifth of the run, from the time each step ended."""
    size = max(1, (steps - 1) // FIFTHS)
    return [(ends[(i + 1) * size] - ends[i * size]) / size * 1000 for i in range(FIFTHS)]


def ours(model, batches, steps: int, plain_gate: bool) -> dict:
    import subnet_interp as si
    import subnet_interp.methods.continuous_sparsification_lepori as lepori
    from subnet_interp._fingerprint import read_canonical

    shipped = lepori.soft_gate
    if plain_gate:
        lepori.soft_gate = lambda params, temperature: torch.sigmoid(temperature * params)
    try:
        with step_marks("cpu") as marks:
            found = si.find(
                model, "continuous_sparsification_lepori", loss_fn, batches,
                steps=steps, log_every=10**9, progress=False,
            )  # fmt: skip
    finally:
        lepori.soft_gate = shipped
    per_step = len(marks) // steps  # the masks may step once per target inside backward
    row = {"fifths_ms": by_fifth(marks[per_step - 1 :: per_step], steps)}
    if plain_gate:  # what the plain gate multiplies the weights by at the end
        tiny, subnormal, total = torch.finfo(torch.float32).tiny, 0, 0
        targets = si.targets(model)
        for name, s in found.scores.items():
            masked = read_canonical(model, targets[name]).detach() * torch.sigmoid(200.0 * s)
            subnormal += int(((masked != 0) & (masked.abs() < tiny)).sum())
            total += masked.numel()
        row["subnormal_fraction_at_end"] = subnormal / total
    return row


def neurosurgeon(model, batches, steps: int) -> dict:
    import copy

    from _neurosurgeon import circuit_model, trainer

    from subnet_interp.methods.continuous_sparsification import geometric_temperature

    wrapped = circuit_model(copy.deepcopy(model))
    train = trainer(wrapped)
    ends = []
    for step in range(steps):
        wrapped.temperature = geometric_temperature(200.0, step, steps)
        train(batches[step % len(batches)])
        ends.append(time.perf_counter())
    return {"fifths_ms": by_fifth(ends, steps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 40 if args.quick else args.steps
    model, batches = build()
    runs = {
        "continuous_sparsification_lepori (gates <= 2**-63 cut to 0, shipped)": lambda: ours(
            model, batches, steps, plain_gate=False
        ),
        "continuous_sparsification_lepori, plain sigmoid(T * s) gate": lambda: ours(
            model, batches, steps, plain_gate=True
        ),
    }
    if _has_neurosurgeon():
        runs["NeuroSurgeon 0.1.0, temperature annealed per step"] = lambda: neurosurgeon(
            model, batches, steps
        )
    rows = []
    print(f"steps={steps} threads={args.threads}: ms / step in each fifth of the run")
    for label, run in runs.items():
        row = {"configuration": label, **run()}
        row["last_over_first"] = row["fifths_ms"][-1] / row["fifths_ms"][0]
        rows.append(row)
        fifths = " ".join(f"{v:7.1f}" for v in row["fifths_ms"])
        extra = row.get("subnormal_fraction_at_end")
        extra = f"  subnormal at end: {extra:.2%}" if extra is not None else ""
        print(f"{label:70s} {fifths}  last/first {row['last_over_first']:.2f}{extra}")
    os.makedirs(args.out, exist_ok=True)
    record = {
        "benchmark": "long_run_gates",
        "steps": steps,
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    with open(os.path.join(args.out, f"long_run_gates_{steps}steps_cpu.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
