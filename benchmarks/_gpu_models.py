"""Models, losses and timers for ``gpu_check.py`` (a helper: not a benchmark of its own).

Every model is built from a configuration with random weights (no hub is reached), directly on
the device it runs on.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

TINY_VOCAB = 40
GPT2_SMALL = dict(
    n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip  # 124M (hf_model's defaults are tiny: every field given)
TINY_GPT2 = dict(
    n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
# TinyLlama's shape (1.10B parameters), as in mask_memory.py's plan
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
)  # fmt: skip
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to bf16 for ``precision == "bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def next_token_loss(logits, tokens):
    """Mean next-token cross-entropy with shifted labels (no copy of the logits), as Hugging
    Face's loss computes it, so NeuroSurgeon and every other configuration pay the same."""
    labels = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
    )


def lm_loss(precision: str = "fp32") -> Callable:
    """``loss_fn(model, tokens)`` for models called as ``model(tokens)``, under autocast."""

    def loss_fn(model, tokens):
        with autocast(tokens.device, precision):
            out = logits_of(model(tokens))
        return next_token_loss(out, tokens)

    return loss_fn


def traced_loss(model, tokens):
    """nnsight: the logits saved from a trace."""
    with model.trace(tokens):
        out = model.output.save()
    return next_token_loss(logits_of(out), tokens)


def mse_loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def tokens(vocab: int, batch: int, seq: int, count: int, device, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(count)]


def hf_model(kind: str, device, **overrides):
    """A tiny (or, with ``overrides``, any) GPT-2 / GPT-NeoX / Llama causal LM in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            **{**dict(n_layer=2, n_head=4, n_embd=32, vocab_size=TINY_VOCAB, n_positions=16),
               **common, **overrides}
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    elif kind == "neox":
        config = transformers.GPTNeoXConfig(
            **{**dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                      intermediate_size=64, vocab_size=TINY_VOCAB, max_position_embeddings=16),
               **common, **overrides}
        )  # fmt: skip
        cls = transformers.GPTNeoXForCausalLM
    else:
        config = transformers.LlamaConfig(
            **{**dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      hidden_size=32, intermediate_size=48, vocab_size=TINY_VOCAB,
                      max_position_embeddings=16),
               **common, **overrides}
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM
    with torch.device(device):
        return cls(config).eval()


def bridge(device):
    """A TransformerLens ``TransformerBridge`` around the tiny GPT-2."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = hf_model("gpt2", device)
    return build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config).eval()


def hooked_transformer(device):
    """A legacy TransformerLens ``HookedTransformer`` (transformer-lens < 4); ImportError after."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    config = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, d_vocab=TINY_VOCAB, n_ctx=16,
        act_fn="gelu_new", normalization_type="LN", default_prepend_bos=False, device=str(device),
    )  # fmt: skip
    return HookedTransformer(config).eval()


def plain_mlp(device, width: int = 32):
    torch.manual_seed(0)
    with torch.device(device):
        return torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
        )


# adapter label -> (builder(device) -> model, loss_fn, batches(device))
def adapters() -> dict[str, tuple[Callable, Callable, Callable]]:
    def token_data(device):
        return tokens(TINY_VOCAB, 4, 12, 2, device)

    def mlp_data(device):
        gen = torch.Generator().manual_seed(0)
        return [(torch.randn(4, 32, generator=gen).to(device),) * 2 for _ in range(2)]

    def nnsight_gpt2(device):
        import nnsight

        return nnsight.NNsight(hf_model("gpt2", device))

    return {
        "hf_gpt2": (lambda d: hf_model("gpt2", d), lm_loss(), token_data),
        "hf_neox": (lambda d: hf_model("neox", d), lm_loss(), token_data),
        "hf_llama": (lambda d: hf_model("llama", d), lm_loss(), token_data),
        "transformer_bridge": (bridge, lm_loss(), token_data),
        "nnsight": (nnsight_gpt2, traced_loss, token_data),
        "hooked_transformer_legacy": (hooked_transformer, lm_loss(), token_data),
        "plain_module": (plain_mlp, mse_loss, mlp_data),
    }


def finetune_timer(model, loss_fn, batches, device, warmup: int, total: int) -> float:
    """Seconds per plain Adam step on every weight, timed from after step ``warmup`` to after
    the last step (as the mask runs are timed by their callbacks), synchronising the device."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-4)
    marks = {}
    try:
        for step in range(total):
            loss = loss_fn(model, batches[step % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in (warmup, total - 1):
                float(loss.detach())  # a log point, as si.find's
                sync(device)
                marks[step] = time.perf_counter()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return (marks[total - 1] - marks[warmup]) / (total - 1 - warmup)


def find_timer(model, method, loss_fn, batches, device, warmup: int, total: int) -> float:
    """Seconds per ``si.find`` step, timed by a callback after step ``warmup`` and after the last
    step; ``log_every=warmup`` with ``total <= 2 * warmup`` logs only at 0, ``warmup`` and the
    last step."""
    import subnet_interp as si

    assert total <= 2 * warmup and total - 1 > warmup
    marks = {}

    def timer(step, record):
        sync(device)
        marks[step] = time.perf_counter()

    si.find(
        model, method, loss_fn, batches, steps=total, callbacks=[timer], log_every=warmup,
        progress=False,
    )  # fmt: skip
    return (marks[total - 1] - marks[warmup]) / (total - 1 - warmup)


def neurosurgeon_timer(model, precision, batches, device, warmup: int, total: int) -> float:
    """NeuroSurgeon 0.1.0's continuous-sparsification masks on every GPT-2 block matrix (the
    layers ``continuous_sparsification_lepori`` masks by default), timed as ``finetune_timer``."""
    import copy

    from _neurosurgeon import circuit_model

    wrapped = circuit_model(copy.deepcopy(model)).to(device)
    wrapped.train()
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    marks = {}
    for step in range(total):
        batch = batches[step % len(batches)]
        with autocast(device, precision):
            logits = wrapped(input_ids=batch).logits
            loss = next_token_loss(logits, batch)  # the loss every configuration uses
            loss = loss + wrapped.config.l0_lambda * wrapped._compute_l0_loss()  # its L0 term
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
        if step in (warmup, total - 1):
            float(loss.detach())
            sync(device)
            marks[step] = time.perf_counter()
    return (marks[total - 1] - marks[warmup]) / (total - 1 - warmup)


def has_module(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def gib(n: float | None) -> float | None:
    return None if n is None else n / 2**30


class PeakMemory:
    """``torch.cuda.max_memory_allocated`` above what was allocated on entry (``None`` off
    cuda): ``with PeakMemory(device) as peak: ...; peak.extra``."""

    def __init__(self, device: torch.device):
        self.device, self.extra, self.before = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.before
        return False


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
