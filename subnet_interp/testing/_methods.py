"""si.testing.check_method: the conformance checks of a subnetwork-finding method."""

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

from .._checkpoint import jsonable
from .._find import find
from .._fingerprint import fingerprint
from .._masked import masked
from .._subnetwork import Subnetwork
from ..methods import FindResult, MaskMethod, Method
from ..tasks.planted import (
    PlantedTask,
    planted_delta,
    planted_mlp,
    planted_sensitivity,
    planted_teacher,
)
from ._common import check_unchanged, fail, state_copy


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


def _iou(a: Subnetwork, b: Subnetwork) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a.names)
    union = sum(int((a[n] | b[n]).sum()) for n in a.names)
    return inter / union if union else 1.0


def _task_kind(cls: type) -> tuple[str, Callable[..., PlantedTask]]:
    if getattr(cls, "returns_delta", False):
        return "delta", planted_delta
    if getattr(cls, "scores_from_gradient", False):
        return "sensitivity", planted_sensitivity
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
        fail(check, f"expected a subclass of si.methods.Method, got {cls!r}.")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        fail(check, f"{cls.__name__} must be a @dataclass(frozen=True) of hyper-parameters.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        fail(check, f"{cls.__name__} needs a class attribute `name` (a non-empty str).")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        fail(check, f"{name}: hyper-parameters {missing} have no default (use the paper's).")
    if not (cls.__doc__ or "").strip() or cls.__doc__ == Method.__doc__:
        fail(check, f"{name}: the class docstring must say what it does and cite its source.")
    method = cls()
    hparams = method.hparams()
    if jsonable(hparams) != jsonable(jsonable(hparams)):
        fail(check, f"{name}: hparams() must be JSON-serialisable, got {hparams!r}.")
    try:
        cls(not_a_hyperparameter=1)
    except TypeError:
        pass
    else:
        fail(check, f"{name}: an unknown hyper-parameter was accepted.")


def _check_bad_hparams(cls: type, task: PlantedTask, steps: int | None) -> None:
    check = "bad_hparams"
    before = state_copy(task.model)
    bad_values = {float: ("not a number", float("nan")), int: ("3", 2.5)}
    for name, kind in _numeric_fields(cls):
        for value in bad_values[kind]:
            try:
                method = cls(**{name: value})
                find(task.model, method, task.loss_fn, task.batches(64), steps=steps or 2,
                     progress=False)  # fmt: skip
            except (TypeError, ValueError) as error:
                if name not in str(error):
                    fail(
                        check,
                        f"{cls.name}: `{name}={value!r}` was refused, but the message does not "
                        f"name the hyper-parameter: {error}",
                    )
            else:
                fail(check, f"{cls.name}: `{name}={value!r}` was accepted; it must be refused.")
            check_unchanged(check, task.model, before)


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
            fail(check, f"{cls.name}: meta[{key!r}] is {meta.get(key)!r}, expected {value!r}.")
    if cls.needs_steps:
        history = result.history
        if not {"loss", "density"} <= set(history):
            fail(
                check, f"{cls.name}: history must track 'loss' and 'density', has {list(history)}."
            )
        if not len(history["loss"]) == len(history["density"]) > 1:
            fail(check, f"{cls.name}: history 'loss' and 'density' must be equally long (> 1).")
        if not all(math.isfinite(v) for v in history["loss"]):
            fail(check, f"{cls.name}: non-finite losses in the history: {history['loss']}.")


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
                fail(check, f"{cls.name}: {prop} is False but result.{attribute} is set.")
            continue
        if value is None or set(value) != names:
            fail(check, f"{cls.name}: {prop} is True, so result.{attribute} must cover {names}.")
        for name, tensor in value.items():
            if tensor.shape != result.subnetwork[name].shape:
                fail(check, f"{cls.name}: result.{attribute}[{name!r}] has the wrong shape.")
    scores = result.scores
    if scores is None or list(scores) != list(result.subnetwork.names):
        fail(check, f"{cls.name}: result.scores must score every target of the subnetwork.")
    for name, tensor in scores.items():
        mask = result.subnetwork[name]
        if tensor.shape != mask.shape or tensor.dtype != torch.float32:
            fail(
                check, f"{cls.name}: result.scores[{name!r}] must be float32 shaped like its mask."
            )


def _check_save_load(result, task: PlantedTask) -> None:
    check = "save_load"
    sub = result.subnetwork
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "found.safetensors"
        sub.save(path)
        loaded = Subnetwork.load(path)
    if loaded != sub or dict(loaded.meta) != dict(sub.meta):
        fail(check, "the subnetwork read back differs from the one saved.")
    with masked(task.model, loaded):  # the recorded fingerprint is accepted
        pass


def _check_determinism(method: Method, make_task, steps: int | None, seed: int) -> None:
    check = "determinism"
    short = 20 if steps else None
    first = _run(method, make_task(), short, seed)
    second = _run(method, make_task(), short, seed)
    if first.subnetwork != second.subnetwork or first.history != second.history:
        fail(check, f"{type(method).name}: two runs with the same seed differ.")


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
        before = state_copy(task.model)
        try:
            _run(method, task, steps, seed, log_every=1, checkpoint=path, checkpoint_every=5,
                 callbacks=[stop])  # fmt: skip
        except _Interrupt:
            pass
        else:
            fail(check, "the interrupting callback was never called with step 17.")
        check_unchanged(check, task.model, before)
        if not path.exists():
            fail(check, f"no checkpoint was written at {path} before the interruption.")
        resumed = _run(method, task, steps, seed, log_every=1, checkpoint=path,
                       checkpoint_every=5)  # fmt: skip
    if resumed.subnetwork != reference.subnetwork or resumed.history != reference.history:
        fail(
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
    before = state_copy(task.model)
    flags = [p.requires_grad for p in task.model.parameters()]
    task.model.train()
    result = _run(method, task, steps, seed)
    score = _iou(result.subnetwork, task.planted)
    if getattr(cls, "learns_from_loss", True):
        if score < min_iou:
            fail(
                "recovery",
                f"{cls.name}: IoU with the planted subnetwork is {score:.3f} (density "
                f"{result.subnetwork.density():.3f}), expected >= {min_iou} on the {kind} task. "
                "Tune `hparams`/`steps` for a short run, or check the method.",
            )
        passed.append("recovery")
    else:
        skipped["recovery"] = "learns_from_loss is False (a baseline)"

    check_unchanged("restore", task.model, before)
    if [p.requires_grad for p in task.model.parameters()] != flags:
        fail("restore", f"{cls.name}: requires_grad flags of the model's parameters changed.")
    if not all(m.training for m in task.model.modules()):
        fail("restore", f"{cls.name}: the model was left in eval mode.")
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
