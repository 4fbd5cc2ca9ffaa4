"""Subnetwork probing (Cao, Sanh & Rush, NAACL 2021, "Low-Complexity Probing via Finding
Subnetworks").

Instead of training a large probe on frozen representations, subnetwork probing trains a weight
mask over the pretrained model jointly with a small probe that reads one layer's hidden state;
the probe's accuracy, set against how few weights the mask keeps, measures how readily the
model computes a property. Cao et al.'s recipe, the defaults here:

- the probe is linear (:class:`Probe` with ``hidden=None``), on the hidden state after block
  ``layer``, at token level (one label per token, ``-100`` ignored) or sequence level;
- the mask is one hard-concrete L0 gate per weight (Louizos et al. 2018: ``beta = 2/3``,
  ``gamma = -0.1``, ``zeta = 1.1``; the registered ``hard_concrete`` method) over the weight
  matrices of the blocks up to and including ``layer``, each gate starting at ``0.9``
  (``droprate_init = 1/6``), with Cao et al.'s penalty ``lambda * sum over matrices of the
  fraction of gates expected open``, ``lambda`` 0 for the first quarter of the steps and then
  linear to ``l0_lambda = 1`` over the next half (their schedule, ``lambda_ramp = (0.25, 0.5)``),
  and the mask's Adam at their learning rate ``0.2``; the model's weights stay frozen;
- the probe has its own Adam (``probe_lr``), trained from the same loss (``si.find``'s
  ``extra_parameters``).

Differences from their code: there is no learning-rate warm-up (theirs: linear over the first
10% of the steps) and no dropout on the representation, and
the probe's default learning rate is ``1e-3`` (theirs, ``5e-5``, is tuned for BERT-base and
thousands of steps). Any other learnable method can be named instead of ``hard_concrete``.

Their comparisons, here: :func:`train_probe` (the same probe on the full model, no mask),
:func:`reinitialized` (a random-init copy of the model, to run the same subnetwork probe on),
:func:`probe_baselines` (all three at once) and :func:`complexity_curve` (accuracy against the
density the mask keeps, over several sparsity strengths).

Data is an iterable of ``(inputs, labels)`` batches: ``inputs`` is a tensor passed to the model
positionally (token ids; pixel values for ViT) or a mapping of keyword arguments
(``input_ids``, ``attention_mask``, ...); ``labels`` is ``[batch, seq]`` (token level) or
``[batch]`` (sequence level).

Nothing here imports transformers, transformer_lens or nnsight.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from . import adapters
from ._attach import masked
from ._find import _resolve_targets, find, to_device
from ._fingerprint import fingerprint
from ._subnetwork import Subnetwork
from ._train import MaskMethod, endless
from ._types import NotFoundError, Target
from .methods import registry
from .methods._base import Method

LEVELS = ("token", "sequence")
IGNORE_INDEX = -100

# Cao et al. 2021 (stevenxcao/subnetwork-probing): gates start at 0.9, i.e.
# log_alpha = logit((0.9 - gamma) / (zeta - gamma)) = log 5, which is hard_concrete's init for
# droprate_init = 1/6; mask Adam at lr 0.2; lambda 0 for the first quarter of training, then
# linear to its final value 1 over the next half
CAO_HARD_CONCRETE = {
    "droprate_init": 1.0 / 6.0,
    "lr": 0.2,
    "l0_lambda": 1.0,
    "lambda_ramp": (0.25, 0.5),
}

# Where the blocks of Hugging Face models live, relative to the base model: GPT-2 (``h``),
# GPT-NeoX / Llama / ViT in transformers 5 (``layers``), BERT / RoBERTa / earlier ViT
# (``encoder.layer``), encoder-decoders' decoders.
_HF_BLOCK_LISTS = ("h", "layers", "encoder.layer", "encoder.layers", "decoder.layers")


class Probe(nn.Module):
    """A probe from a hidden state to class logits: linear (Cao et al. 2021's choice), or one
    hidden ReLU layer of width ``hidden``.

    Weights are drawn like ``nn.Linear``'s (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) from
    ``generator`` (default: seed 0), so a probe is reproducible.
    """

    def __init__(
        self,
        d_model: int,
        n_classes: int,
        hidden: int | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_classes", n_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if n_classes < 2:
            raise ValueError(f"A probe needs at least 2 classes, got n_classes={n_classes}.")
        if hidden is not None and (
            not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1
        ):
            raise ValueError(
                f"`hidden` must be None (a linear probe) or a positive int, got {hidden!r}."
            )
        self.d_model, self.n_classes, self.hidden = d_model, n_classes, hidden
        if hidden is None:
            self.net = nn.Sequential(nn.Linear(d_model, n_classes))
        else:
            self.net = nn.Sequential(
                nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
            )
        source = generator if generator is not None else torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for tensor in (layer.weight, layer.bias):
                        tensor.copy_((torch.rand(tensor.shape, generator=source) * 2 - 1) * bound)

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch n_classes"]:
        return self.net(x)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """A trained probe and the subnetwork it reads through.

    Attributes:
        subnetwork: the mask found with the probe; ``None`` for a probe on the full model.
        probe: the trained :class:`Probe`.
        history: per logged step, ``loss`` (and the mask method's ``penalty``, ``density``, ...).
        accuracy: the probe's accuracy (through the subnetwork) on the evaluation data.
        layer: the block (or module path) whose output the probe reads.
        level: ``"token"`` or ``"sequence"``.
        position: for sequence level, the token read (``None``: mean over tokens).
    """

    subnetwork: Subnetwork | None
    probe: Probe
    history: Mapping[str, list[float]]
    accuracy: float
    layer: int | str
    level: str
    position: int | None = None

    @property
    def density(self) -> float:
        """Fraction of the masked weights kept (1.0 for a probe on the full model)."""
        return 1.0 if self.subnetwork is None else self.subnetwork.density()


@dataclasses.dataclass(frozen=True)
class ProbeBaselines:
    """Cao et al.'s comparison: the subnetwork probe on the pretrained model, the same probe
    trained on the full model (no mask), and the subnetwork probe on a random-init copy."""

    subnetwork: ProbeResult
    full_model: ProbeResult
    random_init: ProbeResult


# ------------------------------------------------------------------ reading hidden states
def _block_output_module(model: Any, layer: int | str) -> tuple[nn.Module, nn.Module, str]:
    """``(root, module, path)``: the module whose forward output is the hidden state."""
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    if isinstance(layer, str):
        try:
            return root, root.get_submodule(layer), layer
        except AttributeError:
            raise NotFoundError(
                f"`layer` {layer!r} is not a sub-module of this {type(root).__qualname__}. Pass a "
                "block index (Hugging Face, TransformerLens, nnsight models) or the path of the "
                "module whose output is the hidden state (one of root.named_modules())."
            ) from None
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"`layer` must be a block index (int) or a module path, got {layer!r}.")
    family = adapter.inner(model).family if hasattr(adapter, "inner") else adapter.family
    if family.startswith("transformer_lens"):
        blocks = getattr(root, "blocks", None)
        path = "blocks"
    else:
        base = getattr(root, "base_model_prefix", "")
        base = f"{base}." if base and hasattr(root, base) else ""
        blocks, path = None, ""
        for candidate in _HF_BLOCK_LISTS:
            try:
                found = root.get_submodule(base + candidate)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                blocks, path = found, base + candidate
                break
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"`layer={layer}` is a block index, but this {type(root).__qualname__} has none of the "
            f"block lists subnet_interp knows ({list(_HF_BLOCK_LISTS)}, TransformerLens "
            "`blocks`). Pass the path of the module whose output is the hidden state instead, "
            "e.g. layer='encoder.2'."
        )
    if not 0 <= layer < len(blocks):
        raise IndexError(
            f"`layer={layer}` is out of range: the model has {len(blocks)} blocks "
            f"(0 .. {len(blocks) - 1})."
        )
    block = blocks[layer]
    if path == "blocks":  # TransformerLens: the residual-stream hook after the block
        for name in ("hook_resid_post", "hook_out"):
            hook = block._modules.get(name)
            if isinstance(hook, nn.Module):
                return root, hook, f"blocks.{layer}.{name}"
    return root, block, f"{path}.{layer}"


def _first_tensor(output: Any, path: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]  # older transformers blocks return (hidden_states, ...)
    raise TypeError(
        f"The output of {path!r} is a {type(output).__name__}, not a tensor (or a tuple starting "
        "with one); pass as `layer` the path of a module that returns the hidden state."
    )


class _StopForward(Exception):
    """Raised by the capturing hook to skip the blocks after the probed one."""


class CapturedHidden:
    """What :func:`capture_hidden` yields; ``value`` is the last hidden state seen."""

    def __init__(self, path: str):
        self.path = path
        self.value: Tensor | None = None


@contextlib.contextmanager
def capture_hidden(model: Any, layer: int | str, *, stop: bool = False) -> Iterator[CapturedHidden]:
    """Context manager: record the hidden state after block ``layer`` during the forward passes
    run inside it (``captured.value``, ``[batch, seq, d_model]``).

    The hidden state is the residual stream after the block: a PyTorch forward hook on the
    block module the model's family uses (Hugging Face GPT-2 ``transformer.h[L]``, GPT-NeoX and
    Llama ``layers[L]``, BERT / RoBERTa ``encoder.layer[L]``, ViT ``layers[L]``;
    TransformerLens ``blocks.L.hook_resid_post``, the ``TransformerBridge``'s
    ``blocks.L.hook_out``; an nnsight wrapper's underlying module). For the last block this is
    before the final norm (unlike Hugging Face's ``hidden_states[-1]``). A string ``layer`` hooks
    that module path of the model (the way to probe a plain ``nn.Module``). Because it hooks
    module outputs, it sees masks attached with ``si.masked`` or during ``si.find``, and
    gradients flow through the captured tensor.

    ``stop=True`` aborts the forward pass right after the block (its caller must catch the
    private exception, as :func:`read_hidden` does); leave it off around your own forward calls.
    """
    _, module, path = _block_output_module(model, layer)
    captured = CapturedHidden(path)

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.value = _first_tensor(output, path)
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _run(root: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return root(**inputs)
    if isinstance(inputs, (tuple, list)):
        return root(*inputs)
    return root(inputs)


def read_hidden(model: Any, layer: int | str, inputs: Any) -> Float[Tensor, "batch ..."]:
    """The hidden state after block ``layer`` for ``inputs`` (``[batch, seq, d_model]``).

    Runs the model only up to that block (the forward is stopped by the hook of
    :func:`capture_hidden`). ``inputs`` is a tensor passed positionally, a tuple of positional
    arguments or a mapping of keyword arguments. Gradients flow unless called under
    ``torch.no_grad()``; masks attached to the model are in effect.
    """
    root = adapters.resolve(model).root(model)
    with capture_hidden(model, layer, stop=True) as captured:
        try:
            _run(root, inputs)
        except _StopForward:
            pass
    if captured.value is None:
        raise RuntimeError(
            f"The forward pass never ran {captured.path!r}, so no hidden state was captured; "
            "check `layer` and `inputs`."
        )
    return captured.value


# ------------------------------------------------------------------ probe loss and accuracy
def _split_batch(batch: Any) -> tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], Tensor):
        raise TypeError(
            "Probing data must yield (inputs, labels) pairs, with labels a tensor of class "
            f"indices; got a {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    return batch[0], batch[1]


def _check_level(level: str, position: int | None) -> None:
    if level not in LEVELS:
        raise ValueError(f"`level` must be 'token' or 'sequence', got {level!r}.")
    if position is not None and level != "sequence":
        raise ValueError(
            "`position` chooses the token read at sequence level; use level='sequence'."
        )


def _features(hidden: Tensor, inputs: Any, level: str, position: int | None) -> Tensor:
    """What the probe reads: every token, one token, or the mean over (unpadded) tokens."""
    if level == "token" or hidden.dim() == 2:
        return hidden
    if position is not None:
        return hidden[:, position]
    attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(attention, Tensor) and tuple(attention.shape) == tuple(hidden.shape[:2]):
        weights = attention.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return hidden.mean(1)


def _logits_and_labels(
    hidden: Tensor, inputs: Any, labels: Tensor, probe: Probe, level: str, position: int | None
) -> tuple[Tensor, Tensor]:
    features = _features(hidden, inputs, level, position)
    expected = tuple(features.shape[:-1])
    if tuple(labels.shape) != expected:
        want = "[batch, seq]" if level == "token" else "[batch]"
        raise ValueError(
            f"At {level} level the labels must be {want} = {expected} to match the hidden "
            f"state {tuple(hidden.shape)}, got {tuple(labels.shape)}."
            + (" For one label per sequence use level='sequence'." if level == "token" else "")
        )
    weight = probe.net[0].weight
    logits = probe(features.to(weight.dtype))
    return logits.reshape(-1, probe.n_classes), labels.reshape(-1).to(logits.device)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    # sum / count rather than the mean, so a batch whose labels are all ignored gives 0, not NaN
    total = nn.functional.cross_entropy(
        logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def probe_loss(
    model: Any,
    probe: Probe,
    layer: int | str,
    batch: Any,
    *,
    level: str = "token",
    position: int | None = None,
) -> Tensor:
    """Cross-entropy of ``probe`` on the hidden state after block ``layer`` for one
    ``(inputs, labels)`` batch; labels ``-100`` are ignored."""
    inputs, labels = _split_batch(batch)
    hidden = read_hidden(model, layer, inputs)
    return _cross_entropy(*_logits_and_labels(hidden, inputs, labels, probe, level, position))


@contextlib.contextmanager
def _evaluating(root: nn.Module) -> Iterator[None]:
    modes = {name: module.training for name, module in root.named_modules()}
    root.eval()
    try:
        yield
    finally:
        for name, module in root.named_modules():
            if name in modes:
                module.training = modes[name]


def _device(root: nn.Module) -> torch.device:
    first = next(root.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def probe_accuracy(
    model: Any,
    subnetwork: Subnetwork | None,
    probe: Probe,
    layer: int | str,
    data: Iterable[Any],
    level: str = "token",
    *,
    position: int | None = None,
) -> float:
    """Accuracy of ``probe`` on ``data`` (``(inputs, labels)`` batches), reading the hidden
    state after block ``layer`` while the model computes with ``subnetwork`` (``None``: the
    full model). Labels ``-100`` are not counted; the model is in eval mode meanwhile."""
    _check_level(level, position)
    root = adapters.resolve(model).root(model)
    device = _device(root)
    correct = torch.zeros((), dtype=torch.long)
    counted = 0
    context = masked(model, subnetwork) if subnetwork is not None else contextlib.nullcontext()
    with torch.no_grad(), _evaluating(root), context:
        for batch in data:
            inputs, labels = _split_batch(to_device(batch, device))
            hidden = read_hidden(model, layer, inputs)
            logits, flat = _logits_and_labels(hidden, inputs, labels, probe, level, position)
            keep = flat != IGNORE_INDEX
            correct += (logits.argmax(-1)[keep] == flat[keep]).sum().cpu()
            counted += int(keep.sum())
    if counted == 0:
        raise ValueError("`data` has no labelled examples (every label is -100, or it is empty).")
    return float(correct) / counted


# ------------------------------------------------------------------ subnetwork probing
def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def _first_batch(data: Iterable[Any]) -> Any:
    for batch in data:
        return batch
    raise ValueError("`data` yielded no batches; pass a list of (inputs, labels) batches.")


def _make_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    hidden: int | None,
    seed: int,
) -> Probe:
    root = adapters.resolve(model).root(model)
    inputs, _ = _split_batch(to_device(_first_batch(data), _device(root)))
    with torch.no_grad(), _evaluating(root):
        width = read_hidden(model, layer, inputs).shape[-1]
    probe = Probe(int(width), n_classes, hidden, generator=torch.Generator().manual_seed(seed))
    return probe.to(_device(root))


def _default_targets(layer: int | str) -> list[str] | None:
    if isinstance(layer, str):
        return None
    return [f"blocks.{index}.*" for index in range(layer + 1)]


def _method(
    method: str | Method,
    model: Any,
    targets: Any,
    hparams: Mapping[str, Any],
) -> Method:
    if isinstance(method, Method):
        if hparams:
            raise ValueError(
                "Hyper-parameters were given as keywords and a method instance as `method`; "
                f"set them on the instance instead ({sorted(hparams)})."
            )
        resolved = method
    elif isinstance(method, str):
        registry.get(method)  # an unknown name fails here, listing the registered ones
        settings = dict(hparams)
        if method == "hard_concrete":
            chosen = _resolve_targets(adapters.resolve(model), model, targets)
            mean_size = sum(t.numel for t in chosen.values()) / len(chosen)
            # dataset_size = mean target size turns hard_concrete's penalty,
            # l0_lambda / dataset_size * (expected open gates), into
            # l0_lambda * sum over targets of their expected open fraction (exactly so for
            # equal-sized targets): Cao et al.'s per-matrix normalisation
            settings = {
                **CAO_HARD_CONCRETE,
                "dataset_size": max(1, round(mean_size)),
                **settings,
            }
            if settings.get("target_density") is not None and "lambda_ramp" not in hparams:
                del settings["lambda_ramp"]  # the Lagrangian replaces the L0 penalty it ramps
        resolved = registry.create(method, **settings)
    else:
        raise TypeError(
            f"`method` must be a registered method name or instance, got {type(method).__name__}."
        )
    if not isinstance(resolved, MaskMethod):
        learnable = [n for n in registry.names() if issubclass(registry.get(n), MaskMethod)]
        raise ValueError(
            f"Subnetwork probing trains the mask and the probe together, so it needs a "
            f"learnable-mask method ({learnable}); got {resolved.name!r}."
        )
    return resolved


def subnetwork_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    method: str | Method = "hard_concrete",
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    probe_lr: float = 1e-3,
    targets: str | Iterable[str] | Mapping[str, Target] | None = None,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **method_hparams: Any,
) -> ProbeResult:
    """Subnetwork probing (Cao, Sanh & Rush 2021): train a weight mask of the frozen ``model``
    jointly with a probe on the hidden state after block ``layer``.

    Args:
        model: a Hugging Face, TransformerLens or nnsight model (``layer`` an int), or any
            ``nn.Module`` (``layer`` the path of the module whose output to read).
        layer: the block whose output the probe reads (see :func:`capture_hidden`).
        data: ``(inputs, labels)`` batches, re-iterated as needed (see the module docstring).
        n_classes: number of classes of the labels.
        method: a learnable-mask method; ``"hard_concrete"`` (Cao et al.'s) gets their
            settings (``CAO_HARD_CONCRETE`` and the per-matrix penalty normalisation), which
            ``method_hparams`` override; other names take only ``method_hparams``.
        steps: optimisation steps (one batch each).
        level: ``"token"`` (labels ``[batch, seq]``, ``-100`` ignored) or ``"sequence"``
            (labels ``[batch]``).
        hidden: ``None`` for a linear probe (Cao et al.), or the width of a one-hidden-layer
            ReLU probe.
        probe_lr: learning rate of the probe's Adam.
        targets: the weights to mask; default: every weight matrix of blocks ``0 .. layer``
            (every default target for a string ``layer``).
        position: at sequence level, the token to read (e.g. ``0`` for BERT's ``[CLS]``,
            ``-1`` for the last); default: the mean over tokens (over ``attention_mask`` when
            ``inputs`` carries one).
        eval_data: where ``accuracy`` is measured; default ``data``.
        generator: the source of all randomness (probe init, mask init and sampling).
        progress: show a progress bar.
        **method_hparams: the method's hyper-parameters, e.g. ``l0_lambda=3.0``.

    Returns:
        :class:`ProbeResult`; the model is left bit-exactly as it was.
    """
    _check_level(level, position)
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = _make_probe(model, layer, data, n_classes, hidden, _seed(source))  # checks layer
    chosen = targets if targets is not None else _default_targets(layer)
    resolved = _method(method, model, chosen, method_hparams)

    def loss_fn(probed: Any, batch: Any) -> Tensor:
        return probe_loss(probed, probe, layer, batch, level=level, position=position)

    found = find(
        model,
        resolved,
        loss_fn,
        data,
        targets=chosen,
        steps=steps,
        generator=source,
        progress=progress,
        extra_parameters=probe,
        extra_lr=probe_lr,
    )
    evaluation = eval_data if eval_data is not None else data
    accuracy = probe_accuracy(
        model, found.subnetwork, probe, layer, evaluation, level, position=position
    )
    return ProbeResult(found.subnetwork, probe, found.history, accuracy, layer, level, position)


def train_probe(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    lr: float = 1e-3,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    log_every: int = 10,
) -> ProbeResult:
    """The usual probe: train ``Probe`` alone with Adam on the full, frozen model's hidden
    state after block ``layer`` (Cao et al.'s comparison without a mask).

    Arguments as in :func:`subnetwork_probe`; the returned ``subnetwork`` is ``None``.
    """
    _check_level(level, position)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    probe = _make_probe(model, layer, data, n_classes, hidden, _seed(source))
    root = adapters.resolve(model).root(model)
    device = _device(root)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    batches = endless(data)
    with _evaluating(root):
        for step in range(steps):
            inputs, labels = _split_batch(to_device(next(batches), device))
            with torch.no_grad():  # the model is frozen: no graph through it
                hidden_state = read_hidden(model, layer, inputs)
            loss = _cross_entropy(
                *_logits_and_labels(hidden_state, inputs, labels, probe, level, position)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == steps - 1:
                history["step"].append(float(step))
                history["loss"].append(float(loss.detach()))
    evaluation = eval_data if eval_data is not None else data
    accuracy = probe_accuracy(model, None, probe, layer, evaluation, level, position=position)
    return ProbeResult(None, probe, history, accuracy, layer, level, position)


# ------------------------------------------------------------------ baselines
def _clear_hf_init_flags(module: nn.Module) -> None:
    # transformers marks initialised modules and tensors and skips them in init_weights()
    for sub in module.modules():
        sub.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            if "_is_hf_initialized" in getattr(tensor, "__dict__", {}):
                del tensor._is_hf_initialized


def _is_hf_pretrained(module: nn.Module) -> bool:
    return (
        type(module).__module__.startswith("transformers.")
        and hasattr(module, "config")
        and callable(getattr(module, "init_weights", None))
        and callable(getattr(module, "_init_weights", None))
    )


def _reinitialize(root: nn.Module) -> None:
    wrapped = root.__dict__.get("original_model")  # a TransformerBridge's transformers model
    candidates = [*([wrapped] if isinstance(wrapped, nn.Module) else []), *root.modules()]
    hf = [m for m in candidates if _is_hf_pretrained(m)]
    if hf:
        top = hf[0]  # the outermost: it re-initialises (and re-ties) its sub-models too
        _clear_hf_init_flags(top)
        top.init_weights()
        return
    if callable(getattr(root, "init_weights", None)):  # HookedTransformer, TL-native bridges
        root.init_weights()
        return
    resettable = [m for m in root.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise TypeError(
            f"Cannot re-initialise a {type(root).__qualname__}: it is not a transformers model, "
            "has no init_weights() and no sub-module with reset_parameters(). Build a fresh "
            "model from its config instead."
        )
    for module in resettable:
        module.reset_parameters()


def reinitialized(model: Any, generator: torch.Generator | None = None) -> Any:
    """A deep copy of ``model`` with freshly initialised weights (``model`` is untouched): the
    random-init control of Cao et al. 2021 (their "reset all", embeddings included).

    Uses the model's own initialisation: for a Hugging Face model (also inside a
    ``TransformerBridge`` or an nnsight wrapper) its ``init_weights()`` (``_init_weights``:
    e.g. ``N(0, initializer_range)`` and GPT-2's scaled residual projections, norms to 1 and
    0); for a legacy ``HookedTransformer`` or a TL-native bridge its ``init_weights()``;
    otherwise PyTorch's ``reset_parameters()`` of every module that has one. The draws come from ``generator``
    (default: seed 0); the global RNG is left as it was.
    """
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    try:
        fresh = copy.deepcopy(model)
    except Exception as error:
        raise TypeError(
            f"reinitialized() works on a deep copy, but a {type(model).__qualname__} could not "
            f"be copied ({error}); pass the underlying module instead."
        ) from error
    root = adapters.resolve(fresh).root(fresh)
    devices = sorted({p.device.index or 0 for p in root.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(_seed(source))
        _reinitialize(root)
    if fingerprint(fresh) == fingerprint(model):
        raise RuntimeError(
            f"Re-initialising the {type(root).__qualname__} left the weights it computes with "
            "unchanged; build a fresh model from its config instead."
        )
    return fresh


def probe_baselines(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    steps: int,
    level: str = "token",
    hidden: int | None = None,
    probe_lr: float = 1e-3,
    position: int | None = None,
    eval_data: Iterable[Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **probe_options: Any,
) -> ProbeBaselines:
    """Cao et al.'s three probes on one task: the subnetwork probe on ``model``, a probe on the
    full model without a mask (:func:`train_probe`, same steps and learning rate) and the
    subnetwork probe on a random-init copy (:func:`reinitialized`).

    ``probe_options`` go to :func:`subnetwork_probe` (``method``, ``targets``, hyper-parameters).
    """
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seeds = [_seed(source) for _ in range(3)]
    shared: dict[str, Any] = {
        "level": level,
        "hidden": hidden,
        "position": position,
        "eval_data": eval_data,
    }

    def gen(index: int) -> torch.Generator:
        return torch.Generator().manual_seed(seeds[index])

    pretrained = subnetwork_probe(
        model, layer, data, n_classes, steps=steps, probe_lr=probe_lr, generator=gen(0),
        progress=progress, **shared, **probe_options,
    )  # fmt: skip
    full = train_probe(
        model, layer, data, n_classes, steps=steps, lr=probe_lr, generator=gen(1), **shared
    )
    random_model = reinitialized(model, gen(2))
    random_init = subnetwork_probe(
        random_model, layer, data, n_classes, steps=steps, probe_lr=probe_lr, generator=gen(2),
        progress=progress, **shared, **probe_options,
    )  # fmt: skip
    return ProbeBaselines(pretrained, full, random_init)


def complexity_curve(
    model: Any,
    layer: int | str,
    data: Iterable[Any],
    n_classes: int,
    *,
    strengths: Sequence[float],
    steps: int,
    hparam: str = "l0_lambda",
    generator: torch.Generator | None = None,
    **probe_options: Any,
) -> list[tuple[float, float]]:
    """Cao et al.'s accuracy-against-complexity curve: the subnetwork probe once per sparsity
    strength (``hparam``: ``l0_lambda`` for ``hard_concrete``, ``alpha`` for
    ``gumbel_sigmoid``, ...), each from the same seed.

    Returns ``(density, accuracy)`` per strength, in the order given; ``probe_options`` go to
    :func:`subnetwork_probe` (``eval_data``, ``level``, ``method``, ...).
    """
    if not strengths:
        raise ValueError("`strengths` is empty; give the sparsity strengths to sweep.")
    if hparam in probe_options:
        raise ValueError(f"`{hparam}` is swept by `strengths`; do not also pass it.")
    source = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = _seed(source)
    points = []
    for strength in strengths:
        result = subnetwork_probe(
            model, layer, data, n_classes, steps=steps,
            generator=torch.Generator().manual_seed(seed), **{hparam: strength}, **probe_options,
        )  # fmt: skip
        points.append((result.density, result.accuracy))
    return points


__all__ = [
    "CAO_HARD_CONCRETE",
    "CapturedHidden",
    "Probe",
    "ProbeBaselines",
    "ProbeResult",
    "capture_hidden",
    "complexity_curve",
    "probe_accuracy",
    "probe_baselines",
    "probe_loss",
    "read_hidden",
    "reinitialized",
    "subnetwork_probe",
    "train_probe",
]
