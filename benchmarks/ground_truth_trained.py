"""Every method on trained models whose answer is known: induction, Csordás add/mul and IOI.

The trained-model rows of issue 20 (``ground_truth.py`` has the planted MLP and tracr). Each base
model is trained here with ``subnet_interp.tasks.train`` (seeded, a minute or less on one core),
its truth measured, then every method searched for a mask with its defaults and, where
``ground_truth.PRESETS`` has one, with that preset (both reported). Masks are trained and judged
under zero ablation, the ablation the truths are measured with.

- ``induction``: a 2-layer attention-only GPT-2 (4 heads per layer; the MLPs' weights and biases
  are zero and frozen, masks cover the attention weights only) trained on repeated random tokens
  (``tasks.induction``) with a small L1 penalty on its attention weights, so that it solves the
  task with few heads instead of spreading it over redundant ones (without it no layer-1 head's
  ablation costs more than 3% accuracy, see the README). Truth: the heads whose single-head
  ablation (every Q/K/V/O weight of the head zeroed through a mask) drops induction accuracy
  by more than ``--induction-threshold`` (absolute, default 0.1). Each head's attention to the
  previous token and to the induction target is recorded to name the heads.
- ``add_mul``: the FNN of Csordás et al. (``tasks.arithmetic``) trained on both operations;
  one mask per operation (trained on add only / mul only). Truth: separation. Columns: the
  2x2 table of accuracy on each op under each op's mask, the masks' IoU, and each op's
  accuracy on the full model with the weights only the other op's mask keeps removed.
- ``ioi``: a tiny GPT-2 trained on the templated IOI task (``tasks.templates``). Truth: the
  heads whose single-head ablation drops the logit difference (correct - repeated name, on
  held-out prompts) by more than ``--ioi-threshold`` of the full model's (default 0.1).

Head AUC: ROC AUC of ``si.analysis.head_scores(model, sub)`` (kept fraction of each head's
non-zero weights) against the truth's heads; ``head_auc_relative``: the same with
``relative=True`` (each head's kept amount over its layer's rate, comparable across layers). Passes (``passes``): head AUC and accuracy under
the mask >= 0.95; add/mul: each op's accuracy under its own mask >= 0.95, under the other op's
mask <= 0.5, and with the weights only the other op's mask keeps removed >= 0.95.

    python benchmarks/ground_truth_trained.py                 # every method, all three tasks
    python benchmarks/ground_truth_trained.py --tasks ioi --methods gumbel_sigmoid
    python benchmarks/ground_truth_trained.py --quick          # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from ground_truth import method_configurations, print_row  # noqa: E402  (a sibling script)

TASKS = ("induction", "add_mul", "ioi")
PASS = {"head_auc": 0.95, "accuracy": 0.95}
# add/mul separates when each op's mask keeps that op (>= own), not the other (<= other), and
# removing the weights only the other op's mask keeps leaves the op (>= own)
SEPARATION = {"own": 0.95, "other": 0.5}
BASELINES = ("magnitude", "random")
# (full, quick): the base models' sizes and training steps (mask steps: --steps, 3 with --quick)
SIZES = {
    "induction": {"train_steps": (2000, 40), "d_model": (32, 16)},
    "add_mul": {"train_steps": (6000, 40), "hidden": (256, 16)},
    "ioi": {"train_steps": (300, 20), "d_model": (64, 16)},
}


def mean_over(model, fn, batches, subnetwork=None) -> float:
    """Mean of ``fn(model, batch)`` over ``batches``, under ``subnetwork`` if given."""
    import torch

    import subnet_interp as si

    with torch.no_grad():
        if subnetwork is None:
            return float(torch.stack([fn(model, b) for b in batches]).mean())
        with si.masked(model, subnetwork):
            return float(torch.stack([fn(model, b) for b in batches]).mean())


def head_ablation(model, metric, batches) -> list[list[float]]:
    """``metric`` with each head's Q/K/V/O weights zeroed in turn, ``[layer][head]``."""
    import torch

    import subnet_interp as si

    attention = si.targets(model, include="blocks.*.attn.W_*")
    n_layers = 1 + max(t.layer for t in attention.values())
    n_heads = next(iter(attention.values())).shape[0]
    table = []
    for layer in range(n_layers):
        row = []
        for head in range(n_heads):
            masks = {}
            for name, target in attention.items():
                masks[name] = torch.ones(target.shape, dtype=torch.bool)
                if target.layer == layer:
                    masks[name][head] = False  # axis 0 is the head axis of W_Q/K/V/O
            with torch.no_grad(), si.masked(model, si.Subnetwork(masks), strict=False):
                row.append(float(torch.stack([metric(model, b) for b in batches]).mean()))
        table.append(row)
    return table


def find(model, method_name, hp, loss_fn, data, steps, seed, targets=None):
    """``si.find`` with the weights restored afterwards (should a method that trains them do so
    in place); returns the result and the seconds it took."""
    import torch

    import subnet_interp as si

    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = si.find(model, si.methods.create(method_name, **hp), loss_fn, data, steps=steps,
                     targets=targets, progress=False,
                     generator=torch.Generator().manual_seed(seed))  # fmt: skip
    seconds = time.perf_counter() - start
    model.load_state_dict(state)
    return result, seconds


def head_aucs(model, sub, heads, relative=False) -> tuple[float, float]:
    """ROC AUC of ``head_scores`` (with ``relative``) for the truth's heads over all heads, and
    the mean of the AUCs within each layer that has heads in and out of the truth (nan where
    none; the same for both scores, which order a layer's heads alike)."""
    import torch

    from subnet_interp.analysis import head_scores
    from subnet_interp.analysis.circuits import roc_auc

    scores = head_scores(model, sub, relative=relative)
    scores = torch.nan_to_num(scores, nan=-1.0)  # uncovered heads rank lowest
    labels = torch.zeros(scores.shape, dtype=torch.bool)
    for layer, head in heads:
        labels[layer, head] = True
    within = [roc_auc(s, t) for s, t in zip(scores, labels, strict=True) if 0 < t.sum() < t.numel()]
    return roc_auc(scores, labels), sum(within) / len(within) if within else float("nan")


def truth_heads(drops, threshold) -> list[tuple[int, int]]:
    return [(layer, head) for layer, row in enumerate(drops) for head, drop in enumerate(row)
            if drop > threshold]  # fmt: skip


def attention_roles(model, batch) -> dict[str, list[list[float]]]:
    """Mean attention of the repeated half's queries to the previous token and to the token
    after the query token's first occurrence (the induction target), ``[layer][head]``."""
    import torch

    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    with torch.no_grad():
        patterns = model(batch, output_attentions=True).attentions
    half = (batch.shape[1] - 1) // 2
    queries = torch.arange(half + 1, batch.shape[1])
    return {
        "previous_token": [p[:, :, queries, queries - 1].mean((0, 2)).tolist() for p in patterns],
        "induction": [p[:, :, queries, queries - half + 1].mean((0, 2)).tolist() for p in patterns],
    }


def setup_induction(quick, seed, threshold, l1):
    import torch

    from subnet_interp.tasks import (
        induction_accuracy,
        induction_loss,
        repeated_tokens,
        tiny_gpt2,
        train,
    )

    size = {k: v[quick] for k, v in SIZES["induction"].items()}
    model = tiny_gpt2(32, n_head=4, d_model=size["d_model"], n_positions=32, seed=seed)
    for block in model.transformer.h:  # attention-only: MLPs are zero (GELU(0) = 0) and frozen
        for parameter in block.mlp.parameters():
            parameter.data.zero_()
            parameter.requires_grad_(False)
    attention = [p for name, p in model.named_parameters() if ".attn." in name and "weight" in name]

    def sparse_loss(model, batch):
        return induction_loss(model, batch) + l1 * sum(w.abs().sum() for w in attention)

    def tokens(n, batch_size, data_seed):
        return repeated_tokens(n, batch_size, half_length=(4, 10), vocab=32,
                               generator=torch.Generator().manual_seed(data_seed))  # fmt: skip

    start = time.perf_counter()
    train(model, sparse_loss, tokens(size["train_steps"], 32, seed), steps=size["train_steps"],
          lr=3e-3)  # fmt: skip
    trained_in = time.perf_counter() - start
    held_out = tokens(2 if quick else 8, 64, seed + 1)
    full = mean_over(model, induction_accuracy, held_out)
    ablated = head_ablation(model, induction_accuracy, held_out)
    drops = [[full - a for a in row] for row in ablated]
    truth = {"metric": "induction accuracy", "full": full, "drop": drops,
             "threshold": threshold, "heads": truth_heads(drops, threshold), "l1": l1,
             "attention": attention_roles(model, held_out[0]), "train_seconds": trained_in}  # fmt: skip
    task = {"model": model, "loss_fn": induction_loss, "data": tokens(64, 32, seed + 2),
            "metric": induction_accuracy, "held_out": held_out, "targets": "blocks.*.attn.*"}  # fmt: skip
    return task, truth


def setup_ioi(quick, seed, threshold):
    import torch

    from subnet_interp.tasks import (
        VOCAB,
        ioi_batches,
        ioi_loss,
        ioi_pair_accuracy,
        ioi_pair_logit_diff,
        ioi_pair_loss,
        ioi_pairs,
        tiny_gpt2,
        train,
    )

    size = {k: v[quick] for k, v in SIZES["ioi"].items()}
    model = tiny_gpt2(len(VOCAB), d_model=size["d_model"], n_positions=16, seed=seed)
    start = time.perf_counter()
    train(model, ioi_loss, ioi_batches(size["train_steps"], 64,
          generator=torch.Generator().manual_seed(seed)), steps=size["train_steps"], lr=3e-3)  # fmt: skip
    trained_in = time.perf_counter() - start
    held_out = ioi_pairs(2 if quick else 4, 64, generator=torch.Generator().manual_seed(seed + 3))
    full = mean_over(model, ioi_pair_logit_diff, held_out)
    ablated = head_ablation(model, ioi_pair_logit_diff, held_out)
    drops = [[(full - ld) / full for ld in row] for row in ablated]  # fraction of the full LD
    truth = {"metric": "logit difference (fraction of the full model's lost)", "full": full,
             "full_accuracy": mean_over(model, ioi_pair_accuracy, held_out), "drop": drops,
             "threshold": threshold, "heads": truth_heads(drops, threshold),
             "train_seconds": trained_in}  # fmt: skip
    task = {"model": model, "loss_fn": ioi_pair_loss, "metric": ioi_pair_accuracy,
            "data": ioi_pairs(8 if quick else 32, 32, generator=torch.Generator().manual_seed(seed + 2)),
            "held_out": held_out, "targets": None, "logit_diff": ioi_pair_logit_diff}  # fmt: skip
    return task, truth


def head_row(task, truth, name, method, hp, steps, seed):
    """One method on the induction or IOI task: head AUC and the task metric under the mask."""
    model = task["model"]
    result, seconds = find(model, method, hp, task["loss_fn"], task["data"], steps, seed,
                           task["targets"])  # fmt: skip
    sub = result.subnetwork
    row = {"task": name, "method": method, "hp": hp, "steps": steps, "seconds": seconds,
           "density": sub.density()}  # fmt: skip
    row["head_auc"], row["head_auc_within_layers"] = head_aucs(model, sub, truth["heads"])
    row["head_auc_relative"] = head_aucs(model, sub, truth["heads"], relative=True)[0]
    row["accuracy"] = mean_over(model, task["metric"], task["held_out"], sub)
    if "logit_diff" in task:
        row["logit_diff"] = mean_over(model, task["logit_diff"], task["held_out"], sub)
        row["full_logit_diff"] = truth["full"]
    else:
        row["full_accuracy"] = truth["full"]
    return row


def setup_add_mul(quick, seed):
    import torch

    from subnet_interp.tasks import (
        add_mul_batches,
        add_mul_network,
        digit_loss,
        exact_accuracy,
        train,
    )

    size = {k: v[quick] for k, v in SIZES["add_mul"].items()}
    model = add_mul_network((size["hidden"],) * 3, seed=seed)
    start = time.perf_counter()
    train(model, digit_loss, add_mul_batches(size["train_steps"],
          generator=torch.Generator().manual_seed(seed)), steps=size["train_steps"], lr=1e-3)  # fmt: skip
    trained_in = time.perf_counter() - start
    held_out = {op: add_mul_batches(2 if quick else 8, 256, ops=(op,),
                                    generator=torch.Generator().manual_seed(seed + 1))
                for op in ("add", "mul")}  # fmt: skip
    data = {op: add_mul_batches(8 if quick else 64, ops=(op,),
                                generator=torch.Generator().manual_seed(seed + 2))
            for op in ("add", "mul")}  # fmt: skip
    full = {op: mean_over(model, exact_accuracy, held_out[op]) for op in held_out}
    truth = {"metric": "exact accuracy", "full": full, "train_seconds": trained_in}
    return {"model": model, "loss_fn": digit_loss, "metric": exact_accuracy, "data": data,
            "held_out": held_out}, truth  # fmt: skip


def add_mul_row(task, truth, method, hp, steps, seed):
    """One mask per operation; the 2x2 table, IoU and removal of the other op's own weights."""
    model, ops = task["model"], ("add", "mul")
    masks, seconds = {}, 0.0
    for op in ops:
        result, took = find(model, method, hp, task["loss_fn"], task["data"][op], steps, seed)
        masks[op], seconds = result.subnetwork, seconds + took
    row = {"task": "add_mul", "method": method, "hp": hp, "steps": steps, "seconds": seconds,
           "density": {op: masks[op].density() for op in ops}}  # fmt: skip
    for mask_op in ops:
        for data_op in ops:  # accuracy on data_op under mask_op's mask
            row[f"{data_op}_under_{mask_op}"] = mean_over(
                model, task["metric"], task["held_out"][data_op], masks[mask_op]
            )
    inter = sum(int((masks["add"][n] & masks["mul"][n]).sum()) for n in masks["add"].names)
    union = sum(int((masks["add"][n] | masks["mul"][n]).sum()) for n in masks["add"].names)
    row["iou"] = inter / max(union, 1)
    for op, other in (("add", "mul"), ("mul", "add")):  # remove what only the other op keeps
        row[f"{op}_without_{other}_only"] = mean_over(
            model, task["metric"], task["held_out"][op], ~(masks[other] - masks[op])
        )
    row["accuracy"] = min(row["add_under_add"], row["mul_under_mul"])
    row["full_accuracy"] = truth["full"]
    return row


def passes(row) -> bool:
    """Head AUC and accuracy >= PASS; add/mul: separation (see ``SEPARATION``)."""
    if "error" in row:
        return False
    if row["task"] == "add_mul":
        return all(
            row[f"{op}_under_{op}"] >= SEPARATION["own"]
            and row[f"{op}_under_{other}"] <= SEPARATION["other"]
            and row[f"{op}_without_{other}_only"] >= SEPARATION["own"]
            for op, other in (("add", "mul"), ("mul", "add"))
        )
    return all(row.get(k, 1.0) >= v for k, v in PASS.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="mask steps (LT: per round)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="default: every method that learns from the loss, and baselines")  # fmt: skip
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--induction-threshold", type=float, default=0.1)
    parser.add_argument("--ioi-threshold", type=float, default=0.1)
    parser.add_argument(
        "--induction-l1",
        type=float,
        default=1e-3,
        help="L1 penalty on the induction model's attention weights in training",
    )
    parser.add_argument("--no-presets", action="store_true", help="defaults only")
    parser.add_argument(
        "--hp",
        action="append",
        default=None,
        metavar="JSON",
        help="a configuration to run instead of defaults + preset, as a JSON "
        "dict (repeatable), e.g. --hp '{\"per_example_penalty\": false}'",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    import torch

    import subnet_interp as si

    torch.set_num_threads(1)  # models this small run fastest on one thread
    learnable = [n for n in si.methods.names() if si.methods.create(n).learns_from_loss]
    methods = args.methods or learnable + [b for b in BASELINES if b in si.methods.names()]
    steps = args.steps
    if args.quick:
        methods, steps = ["magnitude", "gumbel_sigmoid", "hard_concrete"], 3
    rows, truths = [], {}

    def record(row):
        row["passes"] = passes(row)
        rows.append(row)
        print_row(row)

    def configurations(method):
        return method_configurations(method, args.hp, args.no_presets)

    for name in args.tasks:
        if name == "add_mul":
            task, truth = setup_add_mul(args.quick, args.seed)
        elif name == "induction":
            task, truth = setup_induction(
                args.quick, args.seed, args.induction_threshold, args.induction_l1
            )
        else:
            task, truth = setup_ioi(args.quick, args.seed, args.ioi_threshold)
        truths[name] = truth
        print(f"{name}: truth {json.dumps(truth, default=str)}", flush=True)
        for method in methods:
            for hp in configurations(method):
                try:
                    if name == "add_mul":
                        row = add_mul_row(task, truth, method, hp, steps, args.seed)
                    else:
                        row = head_row(task, truth, name, method, hp, steps, args.seed)
                except si.NonFiniteLossError as error:  # a default that diverges is a result
                    row = {"task": name, "method": method, "hp": hp, "steps": steps,
                           "error": f"non-finite loss at step {error.step}"}  # fmt: skip
                record(row)
    os.makedirs(args.out, exist_ok=True)
    suffix = (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    with open(os.path.join(args.out, f"ground_truth_trained{suffix}.json"), "w") as handle:
        json.dump({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "steps": steps, "seed": args.seed, "ablation": "zero", "pass": PASS,
                   "separation": SEPARATION, "sizes": SIZES, "truth": truths, "rows": rows},
                  handle, indent=1, default=str)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
