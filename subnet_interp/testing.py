"""Conformance checks for new methods and model families, shipped with the library
(``si.testing``), as scikit-learn ships ``check_estimator``.

``check_method(MyMethod)`` runs a method through the contract every registered method keeps:
it is a frozen dataclass of documented hyper-parameters, refuses bad ones before touching the
model, recovers a planted subnetwork, leaves the model bit-exactly as it was, records its run in
the subnetwork's ``meta``, saves and loads, is deterministic under a seed and (for
learnable-mask methods) resumes from a checkpoint exactly. Which task and which checks apply is
read from the method's declared properties (``trains_weights``, ``needs_steps``,
``learns_from_loss``, ``returns_delta``, being a :class:`~subnet_interp.methods.MaskMethod`),
never from its name.

``check_adapter(model, inputs)`` does the same for a model as an adapter resolves it: exact
canonical layouts, masks that equal editing the weights by hand, bit-exact restore (also after an
exception), a stable fingerprint, and gradients that reach every target.

Both raise :class:`ConformanceError` (an ``AssertionError``, so pytest reports it as a failure)
naming the check, what was seen and what was expected; on success they return a report.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import adapters
from ._attach import masked
from ._checkpoint import jsonable
from ._find import find
from ._fingerprint import fingerprint, read_canonical
from ._subnetwork import Subnetwork
from ._targets import targets as resolve_targets
from .methods import FindResult, MaskMethod, Method
from .tasks.planted import PlantedTask, planted_delta, planted_mlp, planted_teacher


class ConformanceError(AssertionError):
    """A conformance check failed; the message names the check, what it saw and what it expected."""


@dataclass(frozen=True)
class MethodReport:
    """What :func:`check_method` ran.

    Attributes:
        method: the method's registered (or class) name.
        task: the planted task used (``"frozen"``, ``"teacher"`` or ``"delta"``).
        passed: the checks that ran and passed, in order.
        skipped: checks that do not apply to this method, with the declared property that says so.
        iou: intersection over union of the found and the planted subnetwork.
        density: density of the found subnetwork.
        result: the recovery run's ``FindResult``, for checks of your own.
        planted: the planted task it ran on (``model``, ``planted``, ``loss()``, ...).
    """

    method: str
    task: str
    passed: tuple[str, ...]
    skipped: Mapping[str, str]
    iou: float
    density: float
    result: FindResult = field(repr=False, compare=False)
    planted: PlantedTask = field(repr=False, compare=False)


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`check_adapter` ran: the adapter's class, the targets checked, the checks."""

    adapter: str
    targets: tuple[str, ...]
    passed: tuple[str, ...]


def _fail(check: str, message: str) -> None:
    raise ConformanceError(f"[{check}] {message}")


def _iou(a: Subnetwork, b: Subnetwork) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a.names)
    union = sum(int((a[n] | b[n]).sum()) for n in a.names)
    return inter / union if union else 1.0


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def _check_unchanged(check: str, module: torch.nn.Module, before: Mapping[str, Tensor]) -> None:
    after = module.state_dict()
    if list(after) != list(before):
        _fail(check, f"the model's state_dict keys changed: {list(before)} -> {list(after)}.")
    changed = [k for k, v in before.items() if not _same_bits(after[k], v)]
    if changed:
        _fail(check, f"weights were modified: {changed[:8]}; every weight must be bit-exact.")
    left = [n for n, m in module.named_modules() if hasattr(m, "parametrizations")]
    if left:
        _fail(check, f"parametrizations were left on modules {left[:8]}.")


def _task_kind(cls: type) -> tuple[str, Callable[..., PlantedTask]]:
    if getattr(cls, "returns_delta", False):
        return "delta", planted_delta
    if getattr(cls, "trains_weights", False):
        return "teacher", planted_teacher
    return "frozen", planted_mlp


def _numeric_fields(cls: type) -> list[tuple[str, type]]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        return []
    found = []
    for f in dataclasses.fields(cls):
        options = typing.get_args(hints.get(f.name)) or (hints.get(f.name),)
        if float in options or int in options:
            found.append((f.name, float if float in options else int))
    return found


def _check_declaration(cls: type) -> None:
    check = "declaration"
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        _fail(check, f"expected a subclass of si.methods.Method, got {cls!r}.")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        _fail(check, f"{cls.__name__} must be a @dataclass(frozen=True) of hyper-parameters.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        _fail(check, f"{cls.__name__} needs a class attribute `name` (a non-empty str).")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        _fail(check, f"{name}: hyper-parameters {missing} have no default (use the paper's).")
    if not (cls.__doc__ or "").strip() or cls.__doc__ == Method.__doc__:
        _fail(check, f"{name}: the class docstring must say what it does and cite its source.")
    method = cls()
    hparams = method.hparams()
    if jsonable(hparams) != jsonable(jsonable(hparams)):
        _fail(check, f"{name}: hparams() must be JSON-serialisable, got {hparams!r}.")
    try:
        cls(not_a_hyperparameter=1)
    except TypeError:
        pass
    else:
        _fail(check, f"{name}: an unknown hyper-parameter was accepted.")


def _check_bad_hparams(cls: type, task: PlantedTask, steps: int | None) -> None:
    check = "bad_hparams"
    before = _state(task.model)
    bad_values = {float: ("not a number", float("nan")), int: ("3", 2.5)}
    for name, kind in _numeric_fields(cls):
        for value in bad_values[kind]:
            try:
                method = cls(**{name: value})
                find(task.model, method, task.loss_fn, task.batches(64), steps=steps or 2,
                     progress=False)  # fmt: skip
            except (TypeError, ValueError) as error:
                if name not in str(error):
                    _fail(
                        check,
                        f"{cls.name}: `{name}={value!r}` was refused, but the message does not "
                        f"name the hyper-parameter: {error}",
                    )
            else:
                _fail(check, f"{cls.name}: `{name}={value!r}` was accepted; it must be refused.")
            _check_unchanged(check, task.model, before)


def _run(method: Method, task: PlantedTask, steps: int | None, seed: int, **options: Any):
    return find(
        task.model,
        method,
        task.loss_fn,
        task.batches(64),
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
        **options,
    )


def _check_meta(method: Method, result, task: PlantedTask, steps: int | None) -> None:
    check = "meta"
    cls = type(method)
    meta = result.subnetwork.meta
    expected = {
        "method": cls.name,
        "steps": steps,
        "fingerprint": fingerprint(task.model),
        "hparams": jsonable(method.hparams()),
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            _fail(check, f"{cls.name}: meta[{key!r}] is {meta.get(key)!r}, expected {value!r}.")
    if cls.needs_steps:
        history = result.history
        if not {"loss", "density"} <= set(history):
            _fail(
                check, f"{cls.name}: history must track 'loss' and 'density', has {list(history)}."
            )
        if not len(history["loss"]) == len(history["density"]) > 1:
            _fail(check, f"{cls.name}: history 'loss' and 'density' must be equally long (> 1).")
        if not all(math.isfinite(v) for v in history["loss"]):
            _fail(check, f"{cls.name}: non-finite losses in the history: {history['loss']}.")


def _check_result_fields(cls: type, result) -> None:
    check = "result"
    names = set(result.subnetwork.names)
    for attribute, declared, prop in (
        ("weights", cls.trains_weights, "trains_weights"),
        ("delta", getattr(cls, "returns_delta", False), "returns_delta"),
    ):
        value = getattr(result, attribute)
        if not declared:
            if value is not None:
                _fail(check, f"{cls.name}: {prop} is False but result.{attribute} is set.")
            continue
        if value is None or set(value) != names:
            _fail(check, f"{cls.name}: {prop} is True, so result.{attribute} must cover {names}.")
        for name, tensor in value.items():
            if tensor.shape != result.subnetwork[name].shape:
                _fail(check, f"{cls.name}: result.{attribute}[{name!r}] has the wrong shape.")


def _check_save_load(result, task: PlantedTask) -> None:
    check = "save_load"
    sub = result.subnetwork
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "found.safetensors"
        sub.save(path)
        loaded = Subnetwork.load(path)
    if loaded != sub or dict(loaded.meta) != dict(sub.meta):
        _fail(check, "the subnetwork read back differs from the one saved.")
    with masked(task.model, loaded):  # the recorded fingerprint is accepted
        pass


def _check_determinism(method: Method, make_task, steps: int | None, seed: int) -> None:
    check = "determinism"
    short = 20 if steps else None
    first = _run(method, make_task(), short, seed)
    second = _run(method, make_task(), short, seed)
    if first.subnetwork != second.subnetwork or first.history != second.history:
        _fail(check, f"{type(method).name}: two runs with the same seed differ.")


class _Interrupt(Exception):
    pass


def _check_checkpoint(method: Method, make_task, seed: int) -> None:
    check = "checkpoint"
    steps = 30
    reference = _run(method, make_task(), steps, seed, log_every=1)

    def stop(step: int, record: Mapping[str, float]) -> None:
        if step == 17:
            raise _Interrupt

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.ckpt"
        task = make_task()
        before = _state(task.model)
        try:
            _run(method, task, steps, seed, log_every=1, checkpoint=path, checkpoint_every=5,
                 callbacks=[stop])  # fmt: skip
        except _Interrupt:
            pass
        else:
            _fail(check, "the interrupting callback was never called with step 17.")
        _check_unchanged(check, task.model, before)
        if not path.exists():
            _fail(check, f"no checkpoint was written at {path} before the interruption.")
        resumed = _run(method, task, steps, seed, log_every=1, checkpoint=path,
                       checkpoint_every=5)  # fmt: skip
    if resumed.subnetwork != reference.subnetwork or resumed.history != reference.history:
        _fail(
            check, f"{type(method).name}: the resumed run ends elsewhere than an uninterrupted one."
        )


def check_method(
    cls: type,
    *,
    hparams: Mapping[str, Any] | None = None,
    steps: int | None = 300,
    min_iou: float = 0.9,
    seed: int = 1,
) -> MethodReport:
    """Run the conformance checks on a method class (registered or not).

    Args:
        cls: the method's class, a frozen dataclass subclassing ``si.methods.Method``
            (``si.methods.MaskMethod`` for learnable masks).
        hparams: hyper-parameters for the runs on the planted task, where the paper's defaults
            need many more steps than a test affords (e.g. a larger learning rate).
        steps: training steps of the recovery run (ignored when ``cls.needs_steps`` is False).
        min_iou: the IoU with the planted subnetwork the found one must reach (only for methods
            that learn from the loss; ``learns_from_loss = False`` marks baselines).
        seed: the seed of every run's generator.

    Returns:
        A :class:`MethodReport`. Raises :class:`ConformanceError` on the first failed check.
    """
    _check_declaration(cls)
    hparams = dict(hparams or {})
    method = cls(**hparams)
    steps = steps if cls.needs_steps else None
    kind, build = _task_kind(cls)

    def make_task() -> PlantedTask:
        return build(generator=torch.Generator().manual_seed(0))

    passed = ["declaration"]
    skipped: dict[str, str] = {}
    _check_bad_hparams(cls, make_task(), steps)
    passed.append("bad_hparams")

    task = make_task()
    before = _state(task.model)
    flags = [p.requires_grad for p in task.model.parameters()]
    task.model.train()
    result = _run(method, task, steps, seed)
    score = _iou(result.subnetwork, task.planted)
    if getattr(cls, "learns_from_loss", True):
        if score < min_iou:
            _fail(
                "recovery",
                f"{cls.name}: IoU with the planted subnetwork is {score:.3f} (density "
                f"{result.subnetwork.density():.3f}), expected >= {min_iou} on the {kind} task. "
                "Tune `hparams`/`steps` for a short run, or check the method.",
            )
        passed.append("recovery")
    else:
        skipped["recovery"] = "learns_from_loss is False (a baseline)"

    _check_unchanged("restore", task.model, before)
    if [p.requires_grad for p in task.model.parameters()] != flags:
        _fail("restore", f"{cls.name}: requires_grad flags of the model's parameters changed.")
    if not all(m.training for m in task.model.modules()):
        _fail("restore", f"{cls.name}: the model was left in eval mode.")
    passed.append("restore")

    _check_meta(method, result, task, steps)
    passed.append("meta")
    _check_result_fields(cls, result)
    passed.append("result")
    _check_save_load(result, task)
    passed.append("save_load")
    _check_determinism(method, make_task, steps, seed)
    passed.append("determinism")
    if isinstance(method, MaskMethod):
        _check_checkpoint(method, make_task, seed)
        passed.append("checkpoint")
    else:
        skipped["checkpoint"] = "not a MaskMethod (si.find's checkpoint= is for learnable masks)"
    density = result.subnetwork.density()
    return MethodReport(cls.name, kind, tuple(passed), skipped, score, density, result, task)


# ---------------------------------------------------------------------------------- adapters


def _default_forward(model: Any, inputs: Any) -> Tensor:
    output = model(inputs)
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    elif hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, Tensor):
        raise TypeError(
            f"check_adapter: the model returned {type(output).__name__}, not a tensor; pass "
            "`forward=lambda model, inputs: ...` returning the output tensor to compare."
        )
    return output


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def check_adapter(
    model: Any,
    inputs: Any,
    *,
    forward: Callable[[Any, Any], Tensor] | None = None,
    include: str | list[str] | None = None,
    seed: int = 0,
) -> AdapterReport:
    """Run the conformance checks on a model as its adapter sees it.

    Args:
        model: the model as users hold it (a Hugging Face model, a TransformerLens bridge, an
            nnsight wrapper, a plain ``nn.Module``, ...).
        inputs: one batch the model accepts.
        forward: ``forward(model, inputs) -> Tensor``; default calls ``model(inputs)`` and takes
            ``.logits`` / the first element / ``.last_hidden_state``.
        include: target patterns to check (default: the default targets).
        seed: seed of the random masks.

    Checks: targets resolve; each target's canonical view of its real tensor round-trips exactly
    and targets sharing a tensor do not overlap; an all-ones mask leaves the output unchanged
    and an all-zeros mask changes it; a random mask gives the output of zeroing the same weights
    by hand; every weight is bit-exact after ``si.masked``, also after an exception inside it;
    the fingerprint is stable; ``si.find`` trains mask parameters of every target.
    """
    forward = forward or _default_forward
    adapter = adapters.resolve(model)
    root = adapter.root(model)
    found = resolve_targets(model, include=include)
    if not found:
        _fail("targets", f"{type(adapter).__name__} found no targets in {type(model).__name__}.")
    passed = ["targets"]

    _check_layouts(root, found)
    passed.append("layouts")

    before = _state(root)
    print_before = fingerprint(model)
    with torch.no_grad():
        reference = forward(model, inputs)
        ones = Subnetwork({n: torch.ones(t.shape, dtype=torch.bool) for n, t in found.items()})
        with masked(model, ones):
            kept = forward(model, inputs)
        with masked(model, ~ones):
            removed = forward(model, inputs)
    if not _close(kept, reference):
        _fail("identity", "an all-ones mask changed the model's output.")
    if _close(removed, reference):
        _fail(
            "effect", "an all-zeros mask left the output unchanged: masks do not reach the forward."
        )
    passed += ["identity", "effect"]

    generator = torch.Generator().manual_seed(seed)
    random_masks = {n: torch.rand(t.shape, generator=generator) < 0.5 for n, t in found.items()}
    with torch.no_grad():
        with masked(model, Subnetwork(random_masks)):
            attached = forward(model, inputs)
        by_hand = _zeroed_by_hand(model, root, found, random_masks, forward, inputs)
    if not _close(attached, by_hand):
        _fail("by_hand", "a random mask's output differs from zeroing the same weights by hand.")
    passed.append("by_hand")
    _check_unchanged("restore", root, before)

    try:
        with masked(model, Subnetwork(random_masks)):
            raise _Interrupt
    except _Interrupt:
        pass
    _check_unchanged("restore_on_error", root, before)
    passed += ["restore", "restore_on_error"]

    if fingerprint(model) != print_before:
        _fail("fingerprint", "the fingerprint changed after masking (or is not deterministic).")
    passed.append("fingerprint")

    _check_gradients(model, found, forward, inputs, seed)
    _check_unchanged("find", root, before)
    passed.append("find")
    return AdapterReport(type(adapter).__name__, tuple(found), tuple(passed))


def _real(root: torch.nn.Module, target) -> Tensor:
    return adapters.real_tensor(root.get_submodule(target.module), target.attribute)


def _check_layouts(root: torch.nn.Module, found) -> None:
    coverage: dict[tuple[str, str], Tensor] = {}
    for name, target in found.items():
        real = _real(root, target)
        canonical = read_canonical(root, target)
        if tuple(canonical.shape) != tuple(target.shape):
            _fail("layouts", f"{name}: canonical view has shape {tuple(canonical.shape)}, "
                  f"the target says {target.shape}.")  # fmt: skip
        buffer = torch.zeros_like(real.detach())
        written = target.layout.write_real(canonical.detach().clone(), buffer)
        if not torch.equal(target.layout.to_canonical(written), canonical.detach()):
            _fail("layouts", f"{name}: writing the canonical tensor back does not round-trip.")
        count = coverage.setdefault(target.location, torch.zeros(real.shape, dtype=torch.int32))
        target.layout.to_canonical(count).add_(1)
    for location, count in coverage.items():
        if int(count.max()) > 1:
            _fail("layouts", f"targets on {'.'.join(location)} overlap in the real tensor.")


def _zeroed_by_hand(model, root, found, masks, forward, inputs) -> Tensor:
    saved: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    try:
        for name, target in found.items():
            real = _real(root, target)
            saved.setdefault(target.location, (real, real.detach().clone()))
            view = target.layout.to_canonical(real.data)
            view.mul_(masks[name].to(view.dtype))
        return forward(model, inputs)
    finally:
        for real, value in saved.values():
            real.data.copy_(value)


def _check_gradients(model, found, forward, inputs, seed: int) -> None:
    # Lepori et al.'s gates start at s = 0 (mask s > 0 all off); Adam's first steps move each s
    # by about lr * -sign(grad), so a weight's gate ends on exactly where its gradient was
    # negative. A random projection of the output gives gradients of both signs, so a target
    # with no gate on received no gradient at all.
    with torch.no_grad():
        shape = forward(model, inputs).shape
    projection = torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def loss(m, batch):
        output = forward(m, batch)
        return (output.float() * projection.to(output.device)).mean()

    result = find(model, "continuous_sparsification_lepori", loss, [inputs], steps=2,
                  targets=found, progress=False)  # fmt: skip
    dead = [n for n in found if not bool(result.subnetwork[n].any())]
    if dead:
        _fail(
            "find",
            f"mask parameters of {dead[:8]} did not move in two steps of si.find: no gradient "
            "reaches them (is the weight read by the forward you passed? choose `include=`).",
        )
