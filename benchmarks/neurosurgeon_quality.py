"""What the masks are worth after the same number of steps: subnet_interp's
``continuous_sparsification_lepori`` next to NeuroSurgeon 0.1.0's continuous-sparsification
masks (the implementation Lepori et al. 2023 released), on the same model, data and recipe.

A tiny GPT-2 is trained on repeated random tokens (induction), then both tools train a mask over
every attention and MLP matrix for the same steps with the same recipe: mask parameters at 0,
Adam at lr 1e-2, temperature ramped geometrically from 1 to 200, L0 penalty ``lambda *
sum(sigmoid(T * s))`` with NeuroSurgeon's default ``lambda = 1e-8`` and a sparsifying 1e-4, the
model's own next-token loss. Reported: density of the final binary mask, and next-token loss and
induction accuracy with that mask applied (NeuroSurgeon: its eval-mode hard mask; ours:
``si.masked``), plus seconds per step.

    python benchmarks/neurosurgeon_quality.py            # 300 mask steps
    python benchmarks/neurosurgeon_quality.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch

import subnet_interp as si
from subnet_interp.methods.continuous_sparsification import geometric_temperature
from subnet_interp.tasks import induction_accuracy, repeated_tokens, tiny_gpt2, train

HERE = os.path.dirname(os.path.abspath(__file__))


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def evaluate(model, batches) -> tuple[float, float]:
    with torch.no_grad():
        loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    accuracy = sum(float(induction_accuracy(model, b)) for b in batches) / len(batches)
    return loss, accuracy


def ours(model, batches, steps, l0_lambda, held_out):
    start = time.perf_counter()
    result = si.find(
        model,
        si.methods.create("continuous_sparsification_lepori", l0_lambda=l0_lambda),
        lm_loss,
        batches,
        steps=steps,
        progress=False,
    )
    seconds = (time.perf_counter() - start) / steps
    with si.masked(model, result.subnetwork):
        loss, accuracy = evaluate(model, held_out)
    return {
        "density": result.subnetwork.density(),
        "loss": loss,
        "accuracy": accuracy,
        "s_per_step": seconds,
    }


def neurosurgeon(model, batches, steps, l0_lambda, held_out):
    from _neurosurgeon import circuit_model

    wrapped = circuit_model(copy.deepcopy(model), l0_lambda)
    wrapped.train()
    masks = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(masks, lr=1e-2)
    start = time.perf_counter()
    for step in range(steps):
        wrapped.temperature = geometric_temperature(200.0, step, steps)
        batch = batches[step % len(batches)]
        loss = wrapped(input_ids=batch, labels=batch).loss  # includes its L0 term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = (time.perf_counter() - start) / steps
    wrapped.eval()  # hard masks (mask_param > 0)
    kept = sum(int((p > 0).sum()) for p in masks)
    total = sum(p.numel() for p in masks)

    class Forward(torch.nn.Module):  # the task helpers call model(input_ids) -> .logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, labels=None):
            return self.inner(input_ids=input_ids, labels=labels)

    loss, accuracy = evaluate(Forward(wrapped), held_out)
    return {"density": kept / total, "loss": loss, "accuracy": accuracy, "s_per_step": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    train_steps, mask_steps = (40, 10) if args.quick else (1500, 300)
    torch.manual_seed(0)
    model = tiny_gpt2()
    gen = torch.Generator().manual_seed(0)
    data = repeated_tokens(train_steps, 32, generator=gen)
    train(model, lm_loss, data, steps=train_steps, lr=1e-3)
    batches = data[:64]
    held_out = repeated_tokens(8, 32, generator=torch.Generator().manual_seed(1))
    full_loss, full_accuracy = evaluate(model, held_out)
    print(f"full model: loss {full_loss:.3f}, induction accuracy {full_accuracy:.3f}")
    rows = []
    try:
        import NeuroSurgeon  # noqa: F401

        tools = {"subnet_interp": ours, "NeuroSurgeon 0.1.0": neurosurgeon}
    except ImportError:
        tools = {"subnet_interp": ours}
        print("NeuroSurgeon is not installed: measuring subnet_interp alone")
    for l0_lambda in (1e-8, 1e-4):
        for tool, run in tools.items():
            row = {"tool": tool, "l0_lambda": l0_lambda, "steps": mask_steps}
            row.update(run(model, batches, mask_steps, l0_lambda, held_out))
            rows.append(row)
            print(
                f"{tool:20s} lambda={l0_lambda:g}: density {row['density']:.3f}  loss "
                f"{row['loss']:.3f}  induction accuracy {row['accuracy']:.3f}  "
                f"{row['s_per_step'] * 1e3:.1f} ms/step",
                flush=True,
            )
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "full_model": {"loss": full_loss, "accuracy": full_accuracy},
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = "neurosurgeon_quality_quick.json" if args.quick else "neurosurgeon_quality.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
