"""One script for a GPU machine: everything issue 21 wants measured on a GPU, in <= 8 minutes.

Sections (each with its own time budget, all under one global deadline; a section that fails
records its error and the next one runs; the JSON is rewritten after every section and, if the
deadline passes in the middle of one, by a watchdog before the process exits):

1. ``methods``: every registered method through every adapter (Hugging Face GPT-2 / GPT-NeoX /
   Llama, TransformerLens ``TransformerBridge``, nnsight, a legacy ``HookedTransformer`` where
   transformer-lens < 4 is installed, a plain ``nn.Module``) on the device, a few ``si.find``
   steps each: ok / error, seconds, density, weights restored. On cuda also the host-device
   syncs per inner step of each learnable method (``torch.cuda.set_sync_debug_mode``).
2. ``step_time``: seconds per step of each learnable method vs plain Adam fine-tuning and
   NeuroSurgeon 0.1.0 (when installed) on a GPT-2-small configuration, fp32 and bf16 autocast,
   repeats interleaved, medians, ``torch.cuda.synchronize`` around every timing; extra peak
   memory vs fine-tuning.
3. ``memory_plan``: ``torch.cuda.max_memory_allocated`` of mask training on a TinyLlama-shaped
   (1.1B, bf16, random init) model against ``mask_memory.py``'s memory plan, per method and
   memory option, with the activations and plain fine-tuning measured alongside.
4. ``distributed``: data parallelism and FSDP2 under ``torchrun`` over the GPUs present (a
   subprocess with a timeout): every rank the same mask, FSDP's mask = the data-parallel one.

Without cuda the same code runs on the CPU (``--quick``: tiny models, a few steps, seconds), and
what needs a GPU is listed under ``skipped`` with the reason.

    python benchmarks/gpu_check.py --out benchmarks/results     # on a GPU machine
    python benchmarks/gpu_check.py --quick                       # smoke test, CPU or GPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import threading
import time
import traceback
from datetime import datetime, timezone

START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import subnet_interp  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(1, os.path.dirname(HERE))

import torch  # noqa: E402
from _gpu_distributed import distributed  # noqa: E402
from _gpu_sections import memory_plan, methods_by_adapter, step_ratios  # noqa: E402

# section -> (function, budget in seconds on a GPU); the global deadline caps them all
SECTIONS = {
    "methods": (methods_by_adapter, 100),
    "step_time": (step_ratios, 170),
    "memory_plan": (memory_plan, 90),
    "distributed": (distributed, 80),
}
GLOBAL_BUDGET = 450  # seconds from the start; the watchdog writes the JSON 20 s after it
QUICK_BUDGET = 120  # scaled section budgets; --quick takes ~35 s on 2 busy CPU cores


class Context:
    """What a section gets: the device, ``--quick``, and the time it has left."""

    def __init__(self, device: torch.device, quick: bool, end: float):
        self.device, self.quick, self.end = device, quick, end

    def left(self) -> float:
        return self.end - time.monotonic()


def write(record: dict, path: str) -> None:
    """The record as JSON, written atomically (also from the watchdog while a section runs)."""
    for _ in range(5):
        try:
            text = json.dumps(copy.deepcopy(record), indent=1, default=str)
            break
        except RuntimeError:  # changed while being copied: try again
            time.sleep(0.05)
    else:
        text = json.dumps({k: record[k] for k in ("benchmark", "date")}, indent=1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "transformer-lens", "nnsight", "NeuroSurgeon",
                    "subnet_interp"):  # fmt: skip
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    info = {"machine": platform.platform(), "cpus": os.cpu_count(), "versions": versions,
            "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpus=torch.cuda.device_count(),
            gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
            cuda=torch.version.cuda,
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


def summary(record: dict) -> str:
    """A few lines per section for the console."""
    lines = [f"gpu_check on {record['environment']['device']}"
             f" ({record['environment'].get('gpu', 'no GPU')}), {record['seconds']:.0f} s"]  # fmt: skip
    for name, section in record["sections"].items():
        rows = section.get("rows", [])
        failed = [r for r in rows if not r.get("ok", True)]
        lines.append(f"[{name}] {section['status']} in {section.get('seconds', 0):.0f} s "
                     f"(budget {section['budget_s']:.0f} s): {len(rows)} rows, "
                     f"{len(failed)} not ok")  # fmt: skip
        if section.get("error"):
            lines.append(f"    error: {section['error']}")
        for row in failed[:8]:
            what = row.get("skipped") or row.get("error", "")
            label = " ".join(str(row[k]) for k in ("adapter", "run", "config", "method",
                                                   "precision", "check") if k in row)  # fmt: skip
            lines.append(f"    not ok: {label}: {what[:160]}")
        for skipped in section.get("skipped", [])[:6]:
            lines.append(f"    skipped: {skipped}")
        if name == "step_time":
            for row in rows:
                ratio = row.get("time_vs_finetune")
                if ratio is not None:
                    surgeon = row.get("time_vs_neurosurgeon")
                    lines.append(f"    {row['config']:34s} {row['precision']}: x{ratio:.3f} of "
                                 f"fine-tuning" + (f", x{surgeon:.3f} of NeuroSurgeon"
                                                   if surgeon else ""))  # fmt: skip
        if name == "memory_plan":
            for row in rows:
                if row.get("measured_gib") is not None:
                    plan = row.get("plan_gib")
                    lines.append(f"    {row['config']:50s} {row['measured_gib']:.2f} GiB"
                                 + (f" / plan {plan:.2f}" if plan else ""))  # fmt: skip
        if name == "distributed" and "fsdp_vs_data_parallel_iou" in section:
            lines.append(
                f"    FSDP vs data-parallel mask IoU {section['fsdp_vs_data_parallel_iou']:.4f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"global seconds (default {GLOBAL_BUDGET}; --quick {QUICK_BUDGET})",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="a folder")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    budget = args.budget or (QUICK_BUDGET if args.quick else GLOBAL_BUDGET)
    deadline = START + budget
    name = f"gpu_check{'' if device.type == 'cuda' else '_' + device.type}"
    path = os.path.join(args.out, name + ("_quick" if args.quick else "") + ".json")
    record = {
        "benchmark": "gpu_check",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "budget_s": budget,
        "environment": environment(device),
        "sections": {},
        "rows": [],
        "seconds": 0.0,
    }

    def watchdog():  # a section that hangs past the deadline: keep what was measured, stop
        record["aborted"] = f"global deadline ({budget:.0f} s + 20 s) passed during a section"
        record["seconds"] = time.monotonic() - START
        write(record, path)
        print(summary(record), flush=True)
        print(f"wrote {path} (aborted at the deadline)", flush=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, deadline + 20 - time.monotonic()), watchdog)
    timer.daemon = True
    timer.start()
    scale = 1.0 if not args.quick else budget / sum(b for _, b in SECTIONS.values())
    for section_name in args.sections:
        function, section_budget = SECTIONS[section_name]
        section_budget *= scale
        section = {"status": "running", "budget_s": section_budget, "rows": [], "skipped": []}
        record["sections"][section_name] = section
        start = time.monotonic()
        end = min(start + section_budget, deadline)
        try:
            if end <= start:
                raise TimeoutError("no time left before the global deadline")
            function(Context(device, args.quick, end), section)
            section["status"] = "error" if section.get("error") else "ok"
        except Exception as error:
            section["status"] = "error"
            section["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            section["traceback"] = traceback.format_exc()[-3000:]
        section["seconds"] = time.monotonic() - start
        record["rows"] = [
            {"section": n, **row} for n, s in record["sections"].items() for row in s["rows"]
        ]
        record["seconds"] = time.monotonic() - START
        write(record, path)
        gc.collect()  # the section's models, before the next one measures memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timer.cancel()
    if not record["rows"]:  # nothing measured at all: say so in a row of its own
        record["rows"] = [{"section": None, "ok": False, "error": "no section produced a row"}]
        write(record, path)
    print(summary(record))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
