"""Memory of mask training, in bytes per masked weight, for every learnable method and memory
option; and the memory plan for 1B and 7B models that follows from it.

Each configuration runs in a fresh subprocess on a wide MLP whose weights dwarf its activations.
Two figures per configuration:

* ``state``: the persistent training state, exact: mask parameters + their gradients +
  optimizer state, counted tensor by tensor on the same method and options.
* ``peak``: (peak resident memory during ``si.find`` - resident memory before it) / masked
  weights, with glibc's mmap threshold fixed at 1 MiB so that freed temporaries are returned
  (as a GPU caching allocator would reuse them) rather than retained. It includes the state and every temporary at the peak (sampled masks, the masked
  weights autograd saves for backward, noise), i.e. what training really costs next to the
  frozen model.

The plan then builds Llama-style 1B and 7B configurations on the ``meta`` device (no memory
allocated), counts their maskable weights with ``si.targets`` and adds the frozen bf16 weights
(2 bytes per parameter) to ``peak`` x masked weights. Activations come on top and depend on
batch and sequence length.

    python benchmarks/mask_memory.py            # 4 x 2048^2 MLP (16.8M masked weights)
    python benchmarks/mask_memory.py --quick    # small MLP, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {  # the conformance settings' hyper-parameters (see tests/test_methods_conformance.py)
    "gumbel_sigmoid": {"mask_samples": 1},
    "gumbel_sigmoid (4 samples, the default)": {"mask_samples": 4},
    "continuous_sparsification_lepori": {},
    "hard_concrete": {},
    "continuous_sparsification": {},
}
OPTIONS = {
    "fp32 + Adam (paper)": dict(mask_dtype="float32", mask_optimizer="paper", recompute=False),
    "fp32 + Adam, layer by layer": dict(
        mask_dtype="float32", mask_optimizer="paper", recompute=False, batching="sequential"
    ),
    "fp32 + Adam, recompute": dict(mask_dtype="float32", mask_optimizer="paper", recompute=True),
    "bf16 + Adam, recompute": dict(mask_dtype="bfloat16", mask_optimizer="paper", recompute=True),
    "bf16 + Adafactor, recompute": dict(
        mask_dtype="bfloat16", mask_optimizer="adafactor", recompute=True
    ),
    "neuron gates, recompute": dict(
        mask_dtype="float32", mask_optimizer="paper", recompute=True, granularity="neuron"
    ),
}
PLAN_MODELS = {
    "Llama 1.1B (TinyLlama shape)": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
    ),
    "Llama-2 7B shape": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    ),
}  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def state_bytes_per_gate(method: str, option: dict) -> float:
    """Mask parameters + gradients + optimizer state per gate, counted after a real step."""
    import subnet_interp as si
    from subnet_interp._train import _mask_optimizer
    from subnet_interp.methods._base import FindContext

    dtype = getattr(torch, option["mask_dtype"])
    params = [torch.zeros(512, 512, dtype=dtype, requires_grad=True)]
    hparams = dict(METHODS[method])
    hparams["granularity"] = "weight"
    m = si.methods.create(method.split(" (")[0], **hparams)
    context = FindContext(
        model=None, root=torch.nn.Module(), targets={}, loss_fn=None, batches=iter(()),
        steps=1, device=torch.device("cpu"), generator=torch.Generator(),
        mask_dtype=dtype, mask_optimizer=option["mask_optimizer"],
    )  # fmt: skip
    optimizer = _mask_optimizer(m, params, context)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    total = sum(p.numel() * p.element_size() * 2 for p in params)  # values + grads
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / params[0].numel()


def child(config: dict) -> dict:
    import subnet_interp as si

    width, layers = config["width"], config["layers"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[
            m
            for _ in range(layers)
            for m in (torch.nn.Linear(width, width, bias=False), torch.nn.ReLU())
        ]
    )
    x, y = torch.randn(8, width), torch.randn(8, width)
    batches = [(x, y)]

    def loss_fn(net, batch):
        return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

    masked = sum(t.numel for t in si.targets(model).values())
    # warm up on a tiny copy (lazy imports, thread pools, allocator arenas) before measuring
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    tiny_data = [(torch.randn(8, 8), torch.randn(8, 8))]
    if config["method"] != "fine-tuning":
        warm = config["method"].split(" (")[0]
        si.find(tiny, warm, loss_fn, tiny_data, steps=2, progress=False, inplace=True)
    else:
        loss_fn(tiny, tiny_data[0]).backward()
    if config["method"] == "fine-tuning":  # the reference: Adam on the weights themselves
        before = rss_bytes()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for _ in range(3):
            loss_fn(model, batches[0]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        return {"masked": masked, "peak": (peak_bytes() - before) / masked}
    option = OPTIONS[config["option"]]
    hparams = dict(METHODS[config["method"]], granularity=option.get("granularity", "weight"))
    method = config["method"].split(" (")[0]
    before = rss_bytes()
    si.find(
        model,
        si.methods.create(method, **hparams),
        loss_fn,
        batches,
        steps=3,
        sample_batching=option.get("batching", "auto"),
        progress=False,
        mask_dtype=getattr(torch, option["mask_dtype"]),
        mask_optimizer=option["mask_optimizer"],
        recompute_masks=option["recompute"],
        inplace=True,  # weight-training methods: no copy of the model in the measurement
    )
    return {"masked": masked, "peak": (peak_bytes() - before) / masked}


def run_child(config: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
        # a fixed mmap threshold: glibc's dynamic one otherwise keeps freed weight-sized
        # temporaries in the heap, and RSS then measures the allocator's retention, not use
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan(peaks: dict[str, float]) -> list[dict]:
    import transformers

    import subnet_interp as si

    rows = []
    for label, shape in PLAN_MODELS.items():
        config = transformers.LlamaConfig(**shape)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        masked = sum(t.numel for t in si.targets(model).values())
        row = {"model": label, "parameters": params, "masked": masked}
        for option, per_weight in peaks.items():
            total = 2 * params + per_weight * masked
            row[option] = total / 2**30
        rows.append(row)
    return rows


def write_record(folder: str, name: str, fields: dict) -> None:
    """The results as JSON in ``folder``, with the date, machine and torch version."""
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        **fields,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(record, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--options", nargs="*", default=None, help="memory options to run")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument(
        "--layers",
        type=int,
        default=4,
        help="MLP depth: one layer's backward temporaries are 1/layers of the masked weights",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    width, layers = (256, 2) if args.quick else (args.width, args.layers)
    results = {"fine-tuning (Adam on weights)": run_child(
        {"method": "fine-tuning", "width": width, "layers": layers}
    )["peak"]}  # fmt: skip
    rows = []
    methods = ["continuous_sparsification_lepori"] if args.quick else args.methods
    options = list(OPTIONS)[2:3] if args.quick else (args.options or list(OPTIONS))
    for method in methods:
        for option in options:
            if method == "continuous_sparsification" and "neuron" in option:
                continue  # trains every weight anyway
            measured = run_child(
                {"method": method, "option": option, "width": width, "layers": layers}
            )
            state = state_bytes_per_gate(method, OPTIONS[option])
            if OPTIONS[option].get("granularity", "weight") != "weight":
                state = state / width  # one gate per output neuron of a width x width matrix
            rows.append({"method": method, "option": option, "state": state, **measured})
            print(
                f"{method:34s} {option:28s} state {state:6.2f} B/w   peak {measured['peak']:6.2f} B/w",
                flush=True,
            )
    print(
        f"{'plain fine-tuning (Adam on weights)':63s} peak {results['fine-tuning (Adam on weights)']:6.2f} B/w"
    )
    by_option = {}
    for option in options:
        peaks = [
            r["peak"]
            for r in rows
            if r["option"] == option and r["method"] != "continuous_sparsification"
        ]
        if peaks:
            by_option[option] = max(peaks)
    table = plan(by_option)
    print(
        "\nMemory plan (GiB: frozen bf16 weights + worst frozen-weight method's peak bytes x masked weights):"
    )
    for row in table:
        cells = "  ".join(f"{o}: {row[o]:.1f}" for o in by_option)
        print(
            f"  {row['model']} ({row['parameters'] / 1e9:.2f}B params, {row['masked'] / 1e9:.2f}B masked): {cells}"
        )
    shape = "" if (width, layers) == (2048, 4) or args.quick else f"_{layers}x{width}"
    name = "mask_memory_quick.json" if args.quick else f"mask_memory{shape}.json"
    write_record(args.out, name, {
        "mlp": {"width": width, "layers": layers},
        "rows": rows,
        "fine_tuning_peak": results["fine-tuning (Adam on weights)"],
        "plan": table,
    })  # fmt: skip


if __name__ == "__main__":
    main()
