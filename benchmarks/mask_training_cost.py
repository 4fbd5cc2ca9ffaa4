"""Mask-training step time and peak memory, relative to plain fine-tuning of the same model.

Same model, same batches, dropout off. For each configuration a fresh subprocess measures
steady-state seconds per step (after warm-up steps) and its peak resident memory, so the
figures are side by side in one run. Printed as ratios to plain fine-tuning; absolute times are
not comparable across machines or runs.

    python benchmarks/mask_training_cost.py                 # GPT-2-small config (124M), CPU
    python benchmarks/mask_training_cost.py --model tiny --quick
    python benchmarks/mask_training_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = [
    "gumbel_sigmoid",
    "continuous_sparsification_lepori",
    "hard_concrete",
    "continuous_sparsification",
]


def build(model_name: str, device: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if model_name == "gpt2-small":
        cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        batch, seq = 8, 128
    elif model_name == "gpt2-6x512":  # issue 21's memory setting
        cfg = transformers.GPT2Config(
            n_layer=6, n_head=8, n_embd=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        batch, seq = 4, 64
    elif model_name == "gpt2-4x256":  # the step-time setting
        cfg = transformers.GPT2Config(
            n_layer=4, n_head=4, n_embd=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        batch, seq = 8, 128
    else:
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=512,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        batch, seq = 8, 64
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(4)
    ]
    return model, batches


def next_token_loss(logits, tokens):
    """Mean next-token cross-entropy. The labels are shifted (padded with -100 at the end), not
    the logits, as Hugging Face's own loss does: slicing the logits would copy them, a cost the
    same loss computed inside a model (e.g. NeuroSurgeon's ``labels=`` path) does not pay."""
    import torch

    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100
    )


def lm_loss(model, batch):
    return next_token_loss(model(batch).logits, batch)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def step_marks(device: str):
    """A list that fills with the time after every optimiser step taken inside the block (a
    global optimiser hook), so a timed run needs no per-step logging or callbacks."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    marks: list[float] = []

    def mark(optimizer, args, kwargs):
        sync(device)
        marks.append(time.perf_counter())

    hook = register_optimizer_step_post_hook(mark)
    try:
        yield marks
    finally:
        hook.remove()


def seconds_per_step(marks: list[float], warmup: int, steps: int) -> float:
    """Mean seconds of steps ``warmup + 1 .. warmup + steps`` from :func:`step_marks` of a run
    of ``warmup + steps + 1`` steps. A method that trains weights steps two optimisers per step
    (and may renew them between rounds): a step ends at its last optimiser step."""
    per_step = len(marks) // (warmup + steps + 1)
    ends = marks[per_step - 1 :: per_step]
    return (ends[warmup + steps] - ends[warmup]) / steps


def time_steps(step, device: str, warmup: int, steps: int) -> float:
    """Seconds per call of ``step(i)`` after ``warmup`` untimed calls."""
    for i in range(warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return (time.perf_counter() - start) / steps


def run_one(config: str, model_name: str, device: str, warmup: int, steps: int) -> dict:
    """Seconds per step of one configuration (runs in its own process)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, batches = build(model_name, device)
    baseline = _rss_bytes()  # the model and its batches: what every configuration holds
    if config == "finetune":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(i):
            loss = lm_loss(model, batches[i % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        per_step = time_steps(step, device, warmup, steps)
    elif config == "neurosurgeon":
        per_step = _neurosurgeon(model, batches, device, warmup, steps)
    else:
        import subnet_interp as si

        method, _, variant = config.partition(":")
        variants = set(variant.split("+")) if variant else set()
        hparams = {"mask_samples": 1} if "1sample" in variants else {}
        total = warmup + steps
        loss_fn, data, ablation = lm_loss, batches, "zero"
        if "patch" in variants:  # each batch paired with a counterfactual twin (another batch)
            data = [(b, batches[(i + 1) % len(batches)]) for i, b in enumerate(batches)]
            loss_fn = lambda model, pair: lm_loss(model, pair[0])  # noqa: E731
            ablation = si.PatchAblation(lambda model, pair: model(pair[1]))
        elif "mean" in variants:
            ablation = si.MeanAblation(batches[:1])
        with step_marks(device) as marks:  # no logging inside the timed steps
            si.find(
                model,
                si.methods.create(method, **hparams),
                loss_fn,
                data,
                ablation=ablation,
                steps=total + 1,
                log_every=10**9,
                progress=False,
                recompute_masks="recompute" in variants,
                memory="lean" if "lean" in variants else "default",
                sample_batching="sequential" if "sequential" in variants else "auto",
                inplace="inplace" in variants,  # a method that trains weights: no restore copy
            )
        per_step = seconds_per_step(marks, warmup, steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {
        "config": config,
        "seconds_per_step": per_step,
        "peak_rss_bytes": peak,
        "peak_extra_rss_bytes": peak - baseline,
        "cuda_peak_bytes": cuda_peak,
    }


def _neurosurgeon(model, batches, device, warmup, steps) -> float:
    """NeuroSurgeon 0.1.0's continuous-sparsification masks on the same model and batches."""
    from _neurosurgeon import circuit_model, trainer

    train = trainer(circuit_model(model).to(device))

    def step(i):
        train(batches[i % len(batches)])

    return time_steps(step, device, warmup, steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=["gpt2-small", "gpt2-6x512", "gpt2-4x256", "tiny"], default="gpt2-small"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps: a smoke test")
    parser.add_argument("--configs", nargs="*", default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.warmup = "tiny", 1
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    steps = args.steps or (3 if args.quick else (6 if args.model == "gpt2-small" else 30))
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.device, args.warmup, steps)))
        return 0
    if args.configs:
        configs = args.configs
    elif args.quick:
        configs = ["finetune", "continuous_sparsification_lepori:patch"]  # one process each
    else:
        configs = ["finetune", *METHODS, "gumbel_sigmoid:sequential", "gumbel_sigmoid:1sample"]
        configs += [
            "continuous_sparsification_lepori:recompute",
            "gumbel_sigmoid:1sample+recompute",
        ]
        configs += [  # training under patching / mean ablation (one extra no-grad forward)
            "continuous_sparsification_lepori:patch",
            "gumbel_sigmoid:1sample+patch",
            "continuous_sparsification_lepori:mean",
        ]
        configs += ["continuous_sparsification:inplace"]  # trains the model's own weights
        configs += ["neurosurgeon"] if _has_neurosurgeon() else []
    rows = []
    for config in configs:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                config,
                "--model",
                args.model,
                "--device",
                args.device,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"model={args.model} device={args.device} steps={steps} (ratios to {base['config']})")
    print(
        f"{'config':42s} {'s/step':>9s} {'time ratio':>10s} {'peak RSS ratio':>15s} "
        f"{'extra RSS ratio':>16s}"
    )
    for row in rows:
        row["time_ratio"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["memory_ratio"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["extra_memory_ratio"] = row["peak_extra_rss_bytes"] / base["peak_extra_rss_bytes"]
        if row["cuda_peak_bytes"]:
            row["cuda_memory_ratio"] = row["cuda_peak_bytes"] / base["cuda_peak_bytes"]
        print(
            f"{row['config']:42s} {row['seconds_per_step']:9.4f} {row['time_ratio']:10.3f} "
            f"{row['memory_ratio']:15.3f} {row['extra_memory_ratio']:16.3f}"
        )
    by_config = {row["config"]: row for row in rows}
    for row in rows:  # an ablation variant against the same method under zero ablation
        method, _, variant = row["config"].partition(":")
        parts = set(variant.split("+")) if variant else set()
        for kind in ("patch", "mean"):
            if kind in parts:
                rest = "+".join(sorted(parts - {kind}))
                zero = by_config.get(f"{method}:{rest}" if rest else method)
                if zero is not None:
                    row[f"{kind}_vs_zero"] = row["seconds_per_step"] / zero["seconds_per_step"]
                    print(
                        f"{row['config']:42s} step time / zero ablation: {row[f'{kind}_vs_zero']:.3f}"
                    )
    os.makedirs(args.out, exist_ok=True)
    record = {
        "benchmark": "mask_training_cost",
        "model": args.model,
        "device": args.device,
        "steps": steps,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "rows": rows,
    }
    name = f"mask_training_cost_{args.model}_{args.device}{'_quick' if args.quick else ''}.json"
    with open(os.path.join(args.out, name), "w") as handle:
        json.dump(record, handle, indent=2)
    return 0


def _has_neurosurgeon() -> bool:
    try:
        import NeuroSurgeon  # noqa: F401
    except Exception:
        return False
    return True


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "subnet_interp", "NeuroSurgeon"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
