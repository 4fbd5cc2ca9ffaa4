"""Sections 1-3 of ``gpu_check.py`` (a helper: not a benchmark of its own).

Each section is ``section(ctx, out)``: ``ctx`` says the device, whether the run is ``--quick``
and how much time the section has left (``ctx.left()``); ``out`` is the section's record, whose
``rows`` it fills as it goes (so a section cut short by an error or the deadline keeps what it
measured) and whose ``skipped`` lists what it left out and why.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
import warnings

import torch
from _gpu_models import (
    GPT2_SMALL,
    LLAMA_1B,
    TINY_GPT2,
    TINY_LLAMA,
    PeakMemory,
    adapters,
    find_timer,
    finetune_timer,
    free_device_memory,
    gib,
    has_module,
    hf_model,
    lm_loss,
    median,
    neurosurgeon_timer,
    next_token_loss,
    sync,
    tokens,
)

import subnet_interp as si
from subnet_interp.methods._base import MaskMethod

HERE = os.path.dirname(os.path.abspath(__file__))
# a few steps must finish for every method: bound the rounds of the round-based methods
SHORT_RUN = {"lottery_ticket": {"rounds": 2}, "continuous_sparsification": {"num_rounds": 2}}
# --quick: every method on these adapters, one learnable method and one baseline on the others
QUICK_ALL_METHODS = ("hf_gpt2", "plain_module")
QUICK_METHODS = ("continuous_sparsification_lepori", "magnitude")
ONE_ROUND = {"continuous_sparsification": {"num_rounds": 1}}  # no round boundary in the count
NEEDS = {  # adapter -> the module it needs
    "transformer_bridge": "transformer_lens.model_bridge",
    "nnsight": "nnsight",
    "hooked_transformer_legacy": "transformer_lens",
}


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:400]}"


# --- 1: every registered method through every adapter -------------------------------------


def methods_by_adapter(ctx, out) -> None:
    """``si.find`` with every registered method, a few steps, on each adapter's tiny model on
    the device: ok / error, seconds, density, and whether the weights came back unchanged."""
    steps = 2 if ctx.quick else 4
    out.update(steps=steps, hparams=SHORT_RUN)
    for label, (build, loss_fn, data) in adapters().items():
        if label in NEEDS and not has_module(NEEDS[label]):
            out["skipped"].append(f"{label}: {NEEDS[label]} is not installed")
            continue
        if ctx.left() <= 0:
            out["skipped"].append(f"{label} and after: section budget spent")
            break
        try:
            model, batches = build(ctx.device), data(ctx.device)
        except Exception as error:  # e.g. transformer-lens >= 4 has no HookedTransformer
            out["skipped"].append(f"{label}: cannot build the model ({error_text(error)})")
            continue
        names = si.methods.names()
        if ctx.quick and label not in QUICK_ALL_METHODS:
            names = [n for n in names if n in QUICK_METHODS]
        for name in names:
            if ctx.left() <= 0:
                out["skipped"].append(f"{label}: {name!r} and after: section budget spent")
                break
            row = {"adapter": label, "method": name, "device": str(ctx.device)}
            out["rows"].append(row)
            method = si.methods.create(name, **SHORT_RUN.get(name, {}))
            needs_steps = getattr(method, "needs_steps", True)
            before = si.fingerprint(model)
            start = time.perf_counter()
            try:
                result = si.find(
                    model, method, loss_fn, batches, steps=steps if needs_steps else None,
                    progress=False,
                )  # fmt: skip
                sync(ctx.device)
                row.update(
                    ok=True,
                    seconds=time.perf_counter() - start,
                    density=result.subnetwork.density(),
                    mask_device=str(result.subnetwork.device),
                    weights_restored=si.fingerprint(model) == before,
                )
            except Exception as error:
                row.update(ok=False, error=error_text(error), trace=traceback.format_exc()[-1500:])
        del model, batches
        free_device_memory(ctx.device)
    if ctx.device.type == "cuda":
        host_syncs(ctx, out)
    else:
        out["skipped"].append("host syncs per step: needs cuda (set_sync_debug_mode)")


def host_syncs(ctx, out) -> None:
    """Host-device syncs per training step of each learnable method (issue 21, goal 3), on the
    HF GPT-2: ``torch.cuda.set_sync_debug_mode("warn")`` warnings counted over a run of 3 and of
    8 steps, logging only at the first and last step; the difference / 5 is per inner step."""
    build, loss_fn, data = adapters()["hf_gpt2"]
    model, batches = build(ctx.device), data(ctx.device)
    for name in si.methods.names():
        if not issubclass(si.methods.get(name), MaskMethod) or ctx.left() <= 0:
            continue
        counts, messages = {}, set()
        try:
            for steps in (3, 8):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        method = si.methods.create(name, **ONE_ROUND.get(name, {}))
                        si.find(model, method, loss_fn, batches, steps=steps, log_every=1000,
                                progress=False)  # fmt: skip
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                syncs = [w for w in caught if "synchroniz" in str(w.message)]
                counts[steps] = len(syncs)
                messages |= {f"{w.filename}:{w.lineno}" for w in syncs}
            per_step = (counts[8] - counts[3]) / 5
            out["rows"].append({"adapter": "hf_gpt2", "method": name, "check": "host_syncs",
                                "syncs_3_steps": counts[3], "syncs_8_steps": counts[8],
                                "syncs_per_step": per_step, "ok": per_step == 0,
                                "where": sorted(messages)[:20]})  # fmt: skip
        except Exception as error:
            out["rows"].append({"adapter": "hf_gpt2", "method": name, "check": "host_syncs",
                                "ok": False, "error": error_text(error)})  # fmt: skip


# --- 2: step time vs fine-tuning and NeuroSurgeon ------------------------------------------

STEP_CONFIGS = {  # label -> (method, hyper-parameters); None: the reference loops
    "finetune": None,
    "gumbel_sigmoid": ("gumbel_sigmoid", {}),
    "gumbel_sigmoid:1sample": ("gumbel_sigmoid", {"mask_samples": 1}),
    "continuous_sparsification_lepori": ("continuous_sparsification_lepori", {}),
    "hard_concrete": ("hard_concrete", {}),
    "continuous_sparsification": ("continuous_sparsification", {"num_rounds": 1}),
    "neurosurgeon": None,
}


def step_ratios(ctx, out) -> None:
    """Seconds per step of each learnable method, plain Adam fine-tuning and NeuroSurgeon on a
    GPT-2-small configuration (random init, batch 8 x 128), in fp32 and under bf16 autocast;
    repeats interleaved (every configuration once per round), median per configuration, ratios
    to fine-tuning and to NeuroSurgeon at the same precision. cuda: extra peak memory too."""
    import transformers

    shape, (batch, seq) = (TINY_GPT2, (4, 32)) if ctx.quick else (GPT2_SMALL, (8, 128))
    warmup = 2 if ctx.quick else 10
    total, repeats = 2 * warmup, (1 if ctx.quick else 5)
    model = hf_model("gpt2", ctx.device, **shape)
    batches = tokens(model.config.vocab_size, batch, seq, 4, ctx.device)
    out.update(model="tiny GPT-2" if ctx.quick else "GPT-2-small config (124M)",
               parameters=sum(p.numel() for p in model.parameters()), batch=[batch, seq],
               warmup_steps=warmup, timed_steps=total - 1 - warmup, repeats=repeats,
               note="time ratios of medians; seconds are for this machine only")  # fmt: skip
    labels = list(STEP_CONFIGS)
    if ctx.quick:  # one sampled and one deterministic mask, and a method that trains weights
        labels = ["finetune", "gumbel_sigmoid:1sample", "continuous_sparsification_lepori",
                  "continuous_sparsification", "neurosurgeon"]  # fmt: skip
    if not has_module("NeuroSurgeon"):
        labels.remove("neurosurgeon")
        out["skipped"].append("neurosurgeon: NeuroSurgeon is not installed")
    precisions = ["fp32", "bf16"]
    if ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
        out["skipped"].append("bf16 autocast: this GPU has no bf16")
    times = {(c, p): [] for c in labels for p in precisions}
    out["raw"] = []  # every timing as it is taken (kept if the deadline stops the section)
    peaks, errors, longest = {}, {}, 0.0
    transformers.logging.set_verbosity_error()
    for repeat, precision, label in itertools.product(range(repeats), precisions, labels):
        if (label, precision) in errors:
            continue
        if ctx.left() < 1.5 * longest:
            out["skipped"].append(f"repeat {repeat + 1}/{repeats} and after: budget spent")
            break
        start = time.perf_counter()
        loss_fn = lm_loss(precision)
        try:
            with PeakMemory(ctx.device) as peak:
                if label == "finetune":
                    seconds = finetune_timer(model, loss_fn, batches, ctx.device, warmup, total)
                elif label == "neurosurgeon":
                    seconds = neurosurgeon_timer(model, precision, batches, ctx.device, warmup,
                                                 total)  # fmt: skip
                else:
                    name, hparams = STEP_CONFIGS[label]
                    method = si.methods.create(name, **hparams)
                    seconds = find_timer(model, method, loss_fn, batches, ctx.device, warmup,
                                         total)  # fmt: skip
            times[label, precision].append(seconds)
            out["raw"].append({"config": label, "precision": precision, "seconds": seconds})
            if peak.extra is not None:  # the least over repeats: not the first run's warm-up
                peaks[label, precision] = min(peak.extra, peaks.get((label, precision), 1 << 62))
        except Exception as error:
            errors[label, precision] = error_text(error)
        free_device_memory(ctx.device)
        longest = max(longest, time.perf_counter() - start)
    for precision in precisions:
        base = median(times["finetune", precision])
        surgeon = median(times.get(("neurosurgeon", precision), []))
        base_peak = peaks.get(("finetune", precision))
        for label in labels:
            seconds = median(times[label, precision])
            peak = peaks.get((label, precision))
            row = {"config": label, "precision": precision, "seconds_per_step": seconds,
                   "all_seconds": times[label, precision], "ok": seconds is not None}  # fmt: skip
            if (label, precision) in errors:
                row["error"] = errors[label, precision]
            elif seconds is None:
                row["skipped"] = "not measured: section budget spent"
            if seconds and base:
                row["time_vs_finetune"] = seconds / base
            if seconds and surgeon:
                row["time_vs_neurosurgeon"] = seconds / surgeon
            row["cuda_extra_peak_gib"] = gib(peak)
            if peak and base_peak:
                row["memory_vs_finetune"] = peak / base_peak
            out["rows"].append(row)
    del model, batches


# --- 3: peak memory on a ~1B Llama against the memory plan ---------------------------------

PLAN_CONFIGS = {  # label -> (method, mask_memory.py's option, find keyword arguments)
    "lepori fp32 + Adam (paper)": (
        "continuous_sparsification_lepori", "fp32 + Adam (paper)",
        dict(mask_dtype=torch.float32, recompute_masks=False),
    ),
    "lepori bf16 + Adam, recompute": (
        "continuous_sparsification_lepori", "bf16 + Adam, recompute",
        dict(mask_dtype=torch.bfloat16, recompute_masks=True),
    ),
    "lepori bf16 + Adafactor, recompute": (
        "continuous_sparsification_lepori", "bf16 + Adafactor, recompute",
        dict(mask_dtype=torch.bfloat16, recompute_masks=True, mask_optimizer="adafactor"),
    ),
    "gumbel_sigmoid (1 sample) bf16 + Adam, recompute": (
        "gumbel_sigmoid", "bf16 + Adam, recompute",
        dict(mask_dtype=torch.bfloat16, recompute_masks=True),
    ),
    "hard_concrete bf16 + Adam, recompute": (
        "hard_concrete", "bf16 + Adam, recompute",
        dict(mask_dtype=torch.bfloat16, recompute_masks=True),
    ),
}  # fmt: skip
HPARAMS = {"gumbel_sigmoid": {"mask_samples": 1}}  # as mask_memory.py measured it


def measured_peaks() -> dict[tuple[str, str], float]:
    """(method, option) -> peak bytes per masked weight, from ``results/mask_memory.json``."""
    with open(os.path.join(HERE, "results", "mask_memory.json")) as f:
        return {(r["method"], r["option"]): r["peak"] for r in json.load(f)["rows"]}


def memory_plan(ctx, out) -> None:
    """``torch.cuda.max_memory_allocated`` of ``si.find`` on a TinyLlama-shaped (1.1B) model
    with bf16 weights and random init, per method and memory option, against the plan of
    ``mask_memory.py``: 2 B per parameter (frozen bf16 weights) + that method and option's
    measured peak bytes per masked weight x masked weights. Activations come on top of the
    plan; they are measured alone (a frozen forward + backward to the input embeddings).
    Plain Adam fine-tuning of the same model is measured last (it changes the weights)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = ctx.device.type == "cuda"
    shape, seq = (LLAMA_1B, 256) if cuda and not ctx.quick else (TINY_LLAMA, 16)
    steps = 2 if ctx.quick else 3
    try:
        per_weight = measured_peaks()
    except (OSError, KeyError, ValueError) as error:
        per_weight = {}
        out["skipped"].append(f"plan: results/mask_memory.json unreadable ({error_text(error)})")
    config = transformers.LlamaConfig(**shape)
    if cuda:  # built in fp32, then cast: 6 B per parameter at the start
        with torch.device("meta"):
            count = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
        free, _ = torch.cuda.mem_get_info(ctx.device)
        if 6.6 * count > free:
            out["skipped"].append(f"the {count / 1e9:.2f}B model does not fit: "
                                  f"{gib(free):.1f} GiB free")  # fmt: skip
            return
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = transformers.LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    masked = sum(t.numel for t in si.targets(model).values())
    batches = tokens(shape["vocab_size"], 1, seq, 2, ctx.device)
    loss_fn = lm_loss()
    weights = torch.cuda.memory_allocated(ctx.device) if cuda else None
    out.update(model="TinyLlama shape" if shape is LLAMA_1B else "tiny Llama", parameters=params,
               masked=masked, weights_gib=gib(weights), batch=[1, seq], steps=steps,
               plan="2 B/parameter + mask_memory.json peak B/w x masked weights; "
                    "activations on top")  # fmt: skip
    if not cuda:
        out["skipped"].append(
            "the 1.1B model and measured peaks: torch.cuda.max_memory_allocated needs cuda (the "
            "code path ran on a tiny Llama)"
        )

    def activations():
        embeds = model.get_input_embeddings()(batches[0]).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits
        next_token_loss(logits, batches[0]).backward()

    def finetune():
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        for step in range(steps):
            loss_fn(model, batches[step % 2]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    runs = {"activations (frozen forward + backward)": (activations, None)}
    for label, (method, option, kwargs) in PLAN_CONFIGS.items():
        plan = per_weight.get((method, option))

        def find(method=method, kwargs=kwargs):
            hparams = HPARAMS.get(method, {})
            si.find(model, si.methods.create(method, **hparams), loss_fn, batches, steps=steps,
                    progress=False, **kwargs)  # fmt: skip

        runs[label] = (find, None if plan is None else 2 * params + plan * masked)
    runs["plain Adam fine-tuning (bf16 weights)"] = (finetune, None)
    activations()  # warm-up (kernels, cuBLAS workspace) before anything is measured
    free_device_memory(ctx.device)
    for label, (run, plan_bytes) in runs.items():
        row = {"config": label, "plan_gib": gib(plan_bytes)}
        out["rows"].append(row)
        if ctx.left() <= 0:
            row.update(ok=False, skipped="section budget spent")
            continue
        if cuda and plan_bytes is not None:
            free, _ = torch.cuda.mem_get_info(ctx.device)
            if plan_bytes - weights > 0.95 * free:
                row.update(ok=False, skipped=f"does not fit: {gib(free):.1f} GiB free")
                continue
        start = time.perf_counter()
        try:
            with PeakMemory(ctx.device) as peak:
                run()
            row.update(ok=True, seconds=time.perf_counter() - start)
            if cuda:
                total = weights + peak.extra
                row.update(measured_gib=gib(total), extra_over_weights_gib=gib(peak.extra))
                if plan_bytes is not None:
                    row["measured_vs_plan"] = total / plan_bytes
        except torch.cuda.OutOfMemoryError as error:
            row.update(ok=False, error=f"out of memory: {str(error)[:200]}")
        except Exception as error:
            row.update(ok=False, error=error_text(error), trace=traceback.format_exc()[-1500:])
        free_device_memory(ctx.device)
    base = next((r for r in out["rows"] if r["config"].startswith("plain Adam")), {})
    acts = out["rows"][0].get("extra_over_weights_gib")
    for row in out["rows"]:
        if row.get("extra_over_weights_gib") and base.get("extra_over_weights_gib"):
            row["extra_vs_finetune"] = (
                row["extra_over_weights_gib"] / base["extra_over_weights_gib"]
            )
        if row.get("measured_vs_plan") and acts is not None:
            row["without_activations_vs_plan"] = (row["measured_gib"] - acts) / row["plan_gib"]
