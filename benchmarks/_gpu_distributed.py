"""Section 4 of ``gpu_check.py``: data parallelism and FSDP2 under ``torchrun`` over the GPUs
present (a helper: not a benchmark of its own; torchrun runs this file in each process).

Every process builds the same small GPT-2 (random init, same seed) on its GPU and calls
``si.find`` with its shard of every global batch: once on the plain model (the library averages
the mask gradients over the processes, as DDP does), then on the model sharded with FSDP2's
``fully_shard`` (every block one unit, then the root) for each method that supports sharding.
Each process writes what it found; the parent checks that every process returned the same
mask and that FSDP's Lepori mask is the data-parallel one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FSDP_METHODS = ["continuous_sparsification_lepori", "hard_concrete", "gumbel_sigmoid"]
SMALL_GPT2 = dict(n_layer=6, n_head=8, n_embd=512, vocab_size=8192, n_positions=128)


def build(quick: bool, device):
    """The model and its FSDP units: a small GPT-2 (6 x 512), or with ``quick`` a 2-layer MLP
    (no transformers import: each process starts in a few seconds on a CPU)."""
    from _gpu_models import hf_model, plain_mlp

    if quick:
        model = plain_mlp(device)
        return model, [m for m in model if isinstance(m, torch.nn.Linear)]
    model = hf_model("gpt2", device, **SMALL_GPT2)
    return model, list(model.transformer.h)


def batches(quick: bool, size: int, device) -> list:
    """Two global batches of ``size`` examples (token ids, or for the MLP (input, target))."""
    from _gpu_models import tokens

    if not quick:
        return tokens(SMALL_GPT2["vocab_size"], size, 128, 2, device)
    gen = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(size, 32, generator=gen).to(device) for _ in range(2))
            for _ in range(2)]  # fmt: skip


def digest(subnetwork) -> str:
    h = hashlib.sha1()
    for name in sorted(subnetwork.names):
        h.update(name.encode())
        h.update(subnetwork[name].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def child(config: dict) -> None:
    """One torchrun process: the runs above, reported to ``<report>.rank<r>.json``."""
    import torch.distributed as dist
    from _gpu_models import lm_loss, mse_loss, sync
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import subnet_interp as si

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    with open(f"{config['report']}.pid{rank}", "w") as f:  # so the parent can end it on timeout
        f.write(str(os.getpid()))
    if config["device"] == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    steps = 3 if config["quick"] else 10
    loss_fn = lm_loss() if not config["quick"] else mse_loss
    global_batches = batches(config["quick"], 4 * world, device)
    mine = [tuple(t.chunk(world)[rank] for t in b) if isinstance(b, tuple)
            else b.chunk(world)[rank] for b in global_batches]  # fmt: skip
    report = {"rank": rank, "world": world, "device": str(device), "runs": []}
    masks = {}
    runs = [("data parallel", "continuous_sparsification_lepori")]
    runs += [("fsdp2", m) for m in FSDP_METHODS[: 1 if config["quick"] else None]]

    def save() -> None:  # after every run: a process stopped at the timeout keeps what it did
        with open(f"{config['report']}.rank{rank}.json.tmp", "w") as f:
            json.dump(report, f)
        os.replace(f"{config['report']}.rank{rank}.json.tmp", f"{config['report']}.rank{rank}.json")

    for kind, method in runs:
        run = {"kind": kind, "method": method, "ok": False, "error": "did not finish"}
        report["runs"].append(run)
        save()
        try:
            model, blocks = build(config["quick"], device)
            if kind == "fsdp2":
                mesh = init_device_mesh(device.type, (world,))
                for block in blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            result = si.find(model, method, loss_fn, mine, steps=steps, progress=False,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
            sync(device)
            del run["error"]
            run.update(ok=True, seconds_per_step=(time.perf_counter() - start) / steps,
                       density=result.subnetwork.density(), digest=digest(result.subnetwork),
                       loss=float(result.history["loss"][-1]))  # fmt: skip
            if device.type == "cuda":
                run["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            masks[kind, method] = result.subnetwork.to("cpu")
            del model, result
        except Exception as error:
            run.update(ok=False, error=f"{type(error).__name__}: {str(error)[:400]}")
    lepori = "continuous_sparsification_lepori"
    if ("data parallel", lepori) in masks and ("fsdp2", lepori) in masks:
        a, b = masks["data parallel", lepori], masks["fsdp2", lepori]
        inter = sum(int((a[n] & b[n]).sum()) for n in a.names)
        union = sum(int((a[n] | b[n]).sum()) for n in a.names)
        report["fsdp_vs_data_parallel_iou"] = inter / max(union, 1)
    save()
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, report: str, world: int) -> None:
    """End torchrun (SIGTERM: it stops its workers), then by force torchrun's process group and
    each worker by the pid it wrote (torchrun starts every worker in a session of its own)."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for rank in range(world):
        try:
            with open(f"{report}.pid{rank}") as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):  # never started, or already gone
            pass


def distributed(ctx, out) -> None:
    """torchrun over every GPU present (NCCL; with one GPU a world of 1 still runs the
    process-group and DTensor paths); on CPU, gloo over 2 processes, or with ``--quick`` one
    process started without torchrun."""
    cuda = ctx.device.type == "cuda"
    world = torch.cuda.device_count() if cuda else (1 if ctx.quick else 2)
    out.update(world=world, backend="nccl" if cuda else "gloo")
    if cuda and world == 1:
        out["note"] = "one GPU: world size 1 (a smoke test of the distributed code paths)"
    if not torch.distributed.is_available():
        out["skipped"].append("torch.distributed is not available in this build")
        return
    import subnet_interp

    package_root = os.path.dirname(os.path.dirname(subnet_interp.__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([HERE, package_root, env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as folder:
        config = {"device": "cuda" if cuda else "cpu", "quick": ctx.quick,
                  "report": os.path.join(folder, "report")}  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", __file__, json.dumps(config)]  # fmt: skip
        if ctx.quick and world == 1:  # torchrun's own start costs ~6 s on a small CPU
            command = [sys.executable, __file__, json.dumps(config)]
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))  # fmt: skip
        out["launcher"] = "torchrun" if "torch.distributed.run" in command else "one process"
        timeout = max(60.0 if ctx.quick else 5.0, ctx.left())
        with open(os.path.join(folder, "log"), "w+") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                       env=env, start_new_session=True)  # fmt: skip
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                out["error"] = f"torchrun did not finish within {timeout:.0f} s"
                stop(process, config["report"], world)
            log.seek(0)
            text = log.read()
        out["returncode"] = process.returncode
        if process.returncode:
            out["log_tail"] = text[-3000:]
        reports = []
        for rank in range(world):
            path = f"{config['report']}.rank{rank}.json"
            if os.path.exists(path):
                with open(path) as f:
                    reports.append(json.load(f))
    if len(reports) < world:
        out["rows"].append({"run": "torchrun", "ok": False,
                            "error": f"{len(reports)} of {world} processes reported"})  # fmt: skip
    if not reports:
        return
    for i, run in enumerate(reports[0]["runs"]):
        per_rank = [r["runs"][i] for r in reports if i < len(r["runs"])]
        ok = len(per_rank) == world and all(r.get("ok") for r in per_rank)
        row = {"run": run["kind"], "method": run["method"], "world": world, "ok": ok,
               "ranks": len(per_rank)}  # fmt: skip
        if ok:
            row.update(
                ranks_agree=len({r["digest"] for r in per_rank}) == 1,
                density=run["density"],
                seconds_per_step=max(r["seconds_per_step"] for r in per_rank),
                cuda_peak_gib=max((r.get("cuda_peak_gib") or 0.0) for r in per_rank) or None,
            )
            row["ok"] = row["ranks_agree"]
        else:
            row["error"] = next(
                (r["error"] for r in per_rank if not r.get("ok")), "a rank is missing"
            )
        out["rows"].append(row)
    if "fsdp_vs_data_parallel_iou" in reports[0]:
        out["fsdp_vs_data_parallel_iou"] = reports[0]["fsdp_vs_data_parallel_iou"]


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    child(json.loads(sys.argv[1]))
