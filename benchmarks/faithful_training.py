"""Masks trained under zero vs mean vs patching ablation, all judged under patching (and mean).

On a tracr-compiled program (ground truth: the heads and MLPs the compiler used; random noise
planted in the unused ones, ``plant_noise``): the same method and steps, trained under each
ablation, then cut to the same density (the zero-trained mask's, ``FindResult.at_density``) and
judged under patching ablation with paired counterfactuals (each sequence paired with another
random sequence), and under mean ablation. Reports the accuracy of the masked model (positions
where the program's value is defined), faithfulness of the loss (``ablation_effect``), CPR / CMD
of the faithfulness curve, and the |W|-weighted head AUC against the compiled circuit.

    python benchmarks/faithful_training.py            # 300 steps per mask, noise 0.2
    python benchmarks/faithful_training.py --quick    # smoke test (a few steps)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def program():
    from subnet_interp.tasks.tracr import demo_program

    return demo_program()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", default="gumbel_sigmoid")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    steps = 4 if args.quick else args.steps

    import torch

    import subnet_interp as si
    from subnet_interp.analysis import (
        ablation_effect,
        compare_to_circuit,
        faithfulness_curve,
        head_scores,
        loss,
    )
    from subnet_interp.tasks.tracr import compile_program, plant_noise

    model = compile_program(program(), {"a", "b", "c"}, max_seq_len=6)
    tokens = model.encode([list(s) for s in itertools.product("abc", repeat=6)])
    reference = model.reference(tokens)
    with torch.no_grad():
        logits = model.bridge(tokens)
    top2 = logits.topk(2, dim=-1).values
    defined = (top2[..., 0] - top2[..., 1]) > 1e-3
    defined[:, 0] = False
    plant_noise(model, args.noise)
    target = reference.masked_fill(~defined, -100)
    gen = torch.Generator().manual_seed(0)
    twin = tokens[torch.randperm(len(tokens), generator=gen)]  # a random other sequence
    size = 243
    batches = [
        (tokens[i : i + size], target[i : i + size], twin[i : i + size])
        for i in range(0, len(tokens), size)
    ]

    def task_loss(bridge, batch):
        x, y, _ = batch
        return torch.nn.functional.cross_entropy(bridge(x).flatten(0, 1), y.flatten())

    def accuracy(bridge, batch):
        x, y, _ = batch
        keep = y != -100
        return (bridge(x).argmax(-1)[keep] == y[keep]).float().mean()

    def patch():
        return si.PatchAblation(lambda bridge, batch: bridge(batch[2]))

    def mean():
        return si.MeanAblation([b[0] for b in batches])

    method = si.methods.create(args.method, **({"per_example_penalty": False}
                                               if args.method == "gumbel_sigmoid" else {}))  # fmt: skip
    results = {}
    for name, make in (("zero", lambda: "zero"), ("mean", mean), ("patch", patch)):
        results[name] = si.find(model.bridge, method, task_loss, batches, steps=steps,
                                progress=False, ablation=make())  # fmt: skip
    density = results["zero"].subnetwork.density()
    density = min(max(density, 1e-3), 1.0)
    rows = []
    with torch.no_grad():
        noisy_acc = float(torch.stack([accuracy(model.bridge, b) for b in batches]).mean())
    for trained, result in results.items():
        cut = result.at_density(density)
        row = {"trained_under": trained, "density": cut.density(),
               "found_density": result.subnetwork.density()}  # fmt: skip
        auc = compare_to_circuit(head_scores(model.bridge, cut, weighted=True), model.circuit).auc
        row["head_auc"] = auc
        for judged, make in (("patch", patch), ("mean", mean), ("zero", lambda: "zero")):
            report = ablation_effect(model.bridge, cut, loss(task_loss), batches, controls=0,
                                     ablation=make())  # fmt: skip
            acc = ablation_effect(model.bridge, cut, si.analysis.Metric(accuracy, True,
                                  "accuracy"), batches, controls=0, ablation=make())  # fmt: skip
            row[f"faithfulness_{judged}"] = report.faithfulness
            row[f"accuracy_{judged}"] = acc.kept
        curve = faithfulness_curve(model.bridge, result, batches, loss(task_loss),
                                   densities=DENSITIES, ablation=patch())  # fmt: skip
        row["cpr_patch"], row["cmd_patch"] = curve.cpr, curve.cmd
        rows.append(row)

    print(f"tracr program, noise {args.noise} planted in unused components; {args.method}, "
          f"{steps} steps; every mask cut to density {density:.4f}; unmasked noisy accuracy "
          f"{noisy_acc:.3f}")  # fmt: skip
    columns = ["trained_under", "found_density", "head_auc", "accuracy_patch", "faithfulness_patch",
               "accuracy_mean", "faithfulness_mean", "accuracy_zero", "faithfulness_zero",
               "cpr_patch", "cmd_patch"]  # fmt: skip
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                         for c in columns))  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    name = f"faithful_training_{args.method}{'_quick' if args.quick else ''}.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "steps": steps, "noise": args.noise, "density": density,
                   "noisy_accuracy": noisy_acc, "rows": rows}, handle, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
