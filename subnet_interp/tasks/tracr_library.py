"""Programs of tracr's own library (``tracr.compiler.lib``) as ground-truth tasks, by name.

``library_task("reverse")`` compiles a registered program (:data:`PROGRAMS`: vocabulary,
``max_seq_len``, input generator, categorical or numerical output) into a bridge, plants small
random weights in the components it does not use (:func:`~subnet_interp.tasks.tracr.plant_noise`)
and returns a :class:`TracrTask`: batches of every input (sampled where there are too many),
grouped by length because the bridge takes no padding, with tracr's own outputs as targets, a
loss (cross-entropy for categorical programs, squared error for numerical ones), an accuracy,
and the truth at head (``model.circuit``), neuron (``used_neurons``) and weight
(``used_weights``) level, all read off the compiled weights before the noise was planted, and
what the data *needs* of them (:meth:`TracrTask.truth`, by single ablation), with
:meth:`TracrTask.recovery` scoring a subnetwork against it. ``inert=True`` plants noise that
writes only spare residual dimensions, so that the noisy model computes the program exactly.

Needs the optional extra ``tracr`` (``pip install 'subnet_interp[tracr]'``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._subnetwork import Subnetwork
from ..analysis.circuits import Circuit
from .tracr import TracrModel, compile_program, plant_noise

NUMERICAL_TOLERANCE = 0.05
"""A numerical output counts as correct within this absolute error (for :meth:`accuracy`)."""

INERT_SPARE_DIMS = 8
"""Spare residual dimensions a :func:`library_task` with ``inert=True`` appends, the only ones
its planted noise writes (enough that a noise component's writes are not confined to a line)."""


def _tokens():
    from tracr.rasp import rasp

    return rasp


def _lib():
    from tracr.compiler import lib

    return lib


def _product(vocab: tuple) -> Callable[[int], list[tuple]]:
    return lambda length: list(itertools.product(vocab, repeat=length))


def _permutations(vocab: tuple) -> Callable[[int], list[tuple]]:
    return lambda length: list(itertools.permutations(vocab, length))


@dataclass(frozen=True)
class LibraryProgram:
    """A program of ``tracr.compiler.lib`` with what compiling and feeding it needs.

    ``build()`` returns the RASP program; ``inputs(length)`` every input sequence of one length
    (the programs' preconditions hold, e.g. distinct keys for ``sort_unique``); sequences of
    ``min_len`` .. ``max_seq_len`` tokens are used. ``numerical``: the output is a number (one
    output dimension, squared-error loss) rather than a class.
    """

    name: str
    build: Callable[[], Any]
    vocab: tuple
    max_seq_len: int
    numerical: bool
    inputs: Callable[[int], list[tuple]]
    min_len: int = 2
    note: str = ""


def _programs() -> dict[str, LibraryProgram]:
    abc = ("a", "b", "c")
    parens = ("(", ")")
    dyck2 = ("(", ")", "{", "}")
    specs = [
        LibraryProgram("length", lambda: _lib().make_length(), abc, 5, False, _product(abc),
                       note="one head and one MLP, both used: no unused component"),
        LibraryProgram("reverse", lambda: _lib().make_reverse(_tokens().tokens), abc, 5, False,
                       _product(abc)),
        LibraryProgram("hist", lambda: _lib().make_hist(), abc, 5, False, _product(abc),
                       note="one head and one MLP, both used: no unused component"),
        LibraryProgram("sort_unique",
                       lambda: _lib().make_sort_unique(_tokens().tokens, _tokens().tokens),
                       (1, 2, 3, 4, 5), 5, False, _permutations((1, 2, 3, 4, 5)),
                       note="every head used"),
        LibraryProgram("sort", lambda: _lib().make_sort(_tokens().tokens, _tokens().tokens,
                                                        max_seq_len=5, min_key=1),
                       (1, 2, 3), 5, False, _product((1, 2, 3))),
        LibraryProgram("sort_freq", lambda: _lib().make_sort_freq(5), abc, 5, False,
                       _product(abc)),
        LibraryProgram("frac_prevs",
                       lambda: _lib().make_frac_prevs(_tokens().tokens == "a"), abc, 5, True,
                       _product(abc)),
        LibraryProgram("pair_balance",
                       lambda: _lib().make_pair_balance(_tokens().tokens, "(", ")"),
                       parens, 6, True, _product(parens)),
        LibraryProgram("detect_pattern",
                       lambda: _lib().detect_pattern(_tokens().tokens, "abc"), abc, 5, False,
                       _product(abc), min_len=3),
        LibraryProgram("shuffle_dyck2", lambda: _lib().make_shuffle_dyck2(), dyck2, 6, False,
                       _product(dyck2)),
    ]  # fmt: skip
    return {spec.name: spec for spec in specs}


PROGRAMS: dict[str, LibraryProgram] = _programs()
"""The library programs by name (see :func:`program_names`)."""


def program_names() -> list[str]:
    """Names of the registered library programs."""
    return list(PROGRAMS)


@dataclass
class TracrTask:
    """A compiled library program with noise planted in its unused components, and its data.

    ``batches``: ``(tokens, target, defined)`` triples, one sequence length per batch;
    ``target`` holds tracr's output (class ids, or values for a numerical program) and
    ``defined`` marks the positions scored (not BOS, and for a categorical program not a
    position whose RASP value is undefined, where the compiled logits tie exactly).
    ``used_neurons``: ``[layers, d_mlp]``, a neuron whose compiled ``W_in`` column or ``W_out``
    row is non-zero; ``used_weights``: per canonical target, the compiled non-zero weights;
    ``live_neurons`` / ``live_weights``: the same after planting (what a mask can drop at a
    cost: zero-padding is neither used nor a choice). ``planted``: the noise-filled components.
    """

    name: str
    spec: LibraryProgram
    model: TracrModel
    batches: list[tuple[Tensor, Tensor, Tensor]]
    used_neurons: Tensor
    used_weights: dict[str, Tensor]
    live_neurons: Tensor = field(repr=False)
    live_weights: dict[str, Tensor] = field(repr=False)
    planted: Circuit = field(default_factory=lambda: Circuit(frozenset()))
    clean_state: dict[str, Tensor] | None = field(default=None, repr=False)
    _truth: dict[str, Any] | None = field(default=None, repr=False)

    def truth(self) -> dict[str, Any]:
        """What the program *needs* on this task's data: ``heads`` (node names), ``neurons``
        (``[layers, d_mlp]`` bool) and ``weights`` (canonical name -> bool), each a piece whose
        zeroing alone makes a scored position wrong on the clean compiled model
        (:func:`~subnet_interp.tasks._tracr_truth.needed_truth`; a subset of ``model.circuit``
        / ``used_neurons`` / ``used_weights``). Computed on a copy on first call (0.1-15 s;
        about 2.5 min for ``shuffle_dyck2``), then cached; the task's bridge is not touched."""
        if self._truth is None:
            from ._tracr_truth import needed_truth

            twin = copy.copy(self)
            twin.model = copy.copy(self.model)
            twin.model.bridge = copy.deepcopy(self.bridge)
            if self.clean_state is not None:
                twin.model.bridge.load_state_dict(self.clean_state)
            self._truth = needed_truth(twin)
        return self._truth

    @property
    def bridge(self) -> Any:
        """The compiled model's ``TransformerBridge``."""
        return self.model.bridge

    @property
    def numerical(self) -> bool:
        """Whether the program's output is a number (squared-error loss) rather than a class."""
        return self.spec.numerical

    def loss_fn(self, bridge: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Cross-entropy (categorical) or mean squared error (numerical) on defined positions."""
        tokens, target, defined = batch
        out = bridge(tokens)
        if self.numerical:
            return torch.nn.functional.mse_loss(out[..., 0][defined], target[defined].float())
        return torch.nn.functional.cross_entropy(out[defined], target[defined])

    def accuracy(self, bridge: Any, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Fraction of defined positions right: the argmax class, or a value within
        :data:`NUMERICAL_TOLERANCE` of tracr's."""
        tokens, target, defined = batch
        out = bridge(tokens)
        if self.numerical:
            error = (out[..., 0][defined] - target[defined].float()).abs()
            return (error < NUMERICAL_TOLERANCE).float().mean()
        return (out.argmax(-1)[defined] == target[defined]).float().mean()

    def recovery(
        self,
        subnetwork: Subnetwork,
        scores: dict[str, Tensor] | None = None,
        *,
        relative: bool = False,
    ) -> dict[str, float]:
        """ROC AUC of ``subnetwork`` against :meth:`truth`: ``head_auc`` and ``neuron_auc``
        of ``si.analysis.head_scores`` / ``neuron_scores`` (kept fraction of each unit's
        non-zero weights; with ``relative``, over its layer's kept fraction), ``weight_auc`` of
        ``scores`` (a method's continuous weight scores, e.g. ``FindResult.scores``; default:
        the mask). Positives: the needed pieces; negatives: the planted noise; compiled pieces
        the data never needs are left out (keeping or dropping them is neither right nor
        wrong). ``nan`` where a side is empty."""
        from ..analysis.circuits import head_node, roc_auc
        from ..analysis.components import head_scores, neuron_scores

        truth = self.truth()
        cfg = self.bridge.cfg
        heads = head_scores(self.bridge, subnetwork, relative=relative)
        h_scores, h_labels = [], []
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_heads):
                node = head_node(layer, head)
                if node in truth["heads"] or node in self.planted.nodes:
                    h_scores.append(float(torch.nan_to_num(heads[layer, head], nan=0.0)))
                    h_labels.append(node in truth["heads"])
        neurons = neuron_scores(self.bridge, subnetwork, relative=relative)
        neurons = torch.nan_to_num(neurons, nan=0.0)
        candidates = truth["neurons"] | (self.live_neurons & ~self.used_neurons)
        w_scores, w_labels = [], []
        for name, needed in truth["weights"].items():
            noise = self.live_weights[name] & ~self.used_weights[name]
            keep = needed | noise
            source = scores[name] if scores is not None and name in scores else subnetwork[name]
            w_scores.append(source.detach().float().cpu()[keep])
            w_labels.append(needed[keep])
        return {
            "head_auc": roc_auc(torch.tensor(h_scores), torch.tensor(h_labels)),
            "neuron_auc": roc_auc(neurons[candidates], truth["neurons"][candidates]),
            "weight_auc": roc_auc(torch.cat(w_scores), torch.cat(w_labels)),
        }

    def evaluate(
        self, subnetwork: Subnetwork | None = None, *, ablation: Any = "zero"
    ) -> dict[str, float]:
        """``loss`` and ``accuracy`` over all batches (weighted by defined positions), of the
        model under ``subnetwork`` (with ``ablation``, an ``si.Ablation`` or ``"zero"``) or
        unmasked."""
        from .._masked import masked

        context = (
            masked(self.bridge, subnetwork, ablation=ablation) if subnetwork is not None else None
        )
        totals = {"loss": 0.0, "accuracy": 0.0}
        count = 0
        with context or contextlib.nullcontext(), torch.no_grad():
            for batch in self.batches:
                n = int(batch[2].sum())
                totals["loss"] += float(self.loss_fn(self.bridge, batch)) * n
                totals["accuracy"] += float(self.accuracy(self.bridge, batch)) * n
                count += n
        return {k: v / count for k, v in totals.items()}


def _canonical_weights(bridge: Any) -> dict[str, Tensor]:
    from .. import adapters
    from .._fingerprint import read_canonical
    from .._targets import targets

    root = adapters.resolve(bridge).root(bridge)
    return {name: read_canonical(root, t).detach().clone() for name, t in targets(bridge).items()}


def _neurons(weights: dict[str, Tensor], n_layers: int, d_mlp: int) -> Tensor:
    """``[layers, d_mlp]``: a neuron with a non-zero ``W_in`` column or ``W_out`` row."""
    out = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    for layer in range(n_layers):
        w_in, w_out = weights[f"blocks.{layer}.mlp.W_in"], weights[f"blocks.{layer}.mlp.W_out"]
        out[layer] = (w_in != 0).any(0) | (w_out != 0).any(1)
    return out


@contextlib.contextmanager
def _fresh_labels():
    """tracr labels every expression ``<name>_<id>`` from one process-wide counter, and the
    compiled layout follows the labels: without this, a program compiled after others gets other
    ids, another layout, and so other planted noise. Each library program is built and compiled
    with the counter started afresh (its expressions are new, so their ids stay unique among
    themselves), then the process's counter is put back."""
    from tracr.rasp import rasp

    saved = rasp.RASPExpr._ids
    rasp.RASPExpr._ids = itertools.count(1)
    try:
        yield
    finally:
        rasp.RASPExpr._ids = saved


def library_task(
    name: str,
    *,
    noise: float = 0.1,
    seed: int = 0,
    max_per_length: int = 512,
    batch_size: int = 256,
    mlp_exactness: int = 100,
    inert: bool = False,
) -> TracrTask:
    """Compile the library program ``name`` (:data:`PROGRAMS`), plant noise of standard
    deviation ``noise`` in its unused components (``noise=0``: none), and build its data: every
    input of each length, or ``max_per_length`` of them drawn with ``seed`` where there are
    more.

    ``inert=True``: the model gets :data:`INERT_SPARE_DIMS` spare residual dimensions and the
    noise writes only there (:func:`~subnet_interp.tasks.tracr.plant_noise`), so the noisy model
    computes the program exactly and the noise is unused rather than disturbing; its scale can
    then match the compiled weights' (``noise=1.0``), so that magnitude does not give it away.
    ``mlp_exactness`` is passed to tracr's compiler."""
    if name not in PROGRAMS:
        raise KeyError(f"Unknown tracr library program {name!r}; known: {program_names()}.")
    spec = PROGRAMS[name]
    with _fresh_labels():
        model = compile_program(
            spec.build(),
            set(spec.vocab),
            spec.max_seq_len,
            mlp_exactness=mlp_exactness,
            spare_dims=INERT_SPARE_DIMS if inert else 0,
        )
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for length in range(spec.min_len, spec.max_seq_len + 1):
        sequences = spec.inputs(length)
        if len(sequences) > max_per_length:
            pick = torch.randperm(len(sequences), generator=gen)[:max_per_length].sort().values
            sequences = [sequences[i] for i in pick.tolist()]
        for start in range(0, len(sequences), batch_size):
            tokens = model.encode(sequences[start : start + batch_size])
            target = model.reference(tokens)
            defined = torch.ones(tokens.shape, dtype=torch.bool)
            defined[:, 0] = False
            if not spec.numerical:
                with torch.no_grad():
                    top2 = model.bridge(tokens).topk(2, dim=-1).values
                defined &= (top2[..., 0] - top2[..., 1]) > 1e-3  # undefined values tie
                target = target.clamp(min=0)
            batches.append((tokens, target, defined))
    cfg = model.bridge.cfg
    used_weights = {k: w != 0 for k, w in _canonical_weights(model.bridge).items()}
    clean_state = copy.deepcopy(model.bridge.state_dict()) if noise > 0 else None
    planted = (
        plant_noise(model, noise, seed=seed, inert=inert) if noise > 0 else Circuit(frozenset())
    )
    live_weights = {k: w != 0 for k, w in _canonical_weights(model.bridge).items()}
    return TracrTask(
        name=name,
        spec=spec,
        model=model,
        batches=batches,
        used_neurons=_neurons(used_weights, cfg.n_layers, cfg.d_mlp),
        used_weights=used_weights,
        live_neurons=_neurons(live_weights, cfg.n_layers, cfg.d_mlp),
        live_weights=live_weights,
        planted=planted,
        clean_state=clean_state,
    )


__all__ = [
    "INERT_SPARE_DIMS",
    "NUMERICAL_TOLERANCE",
    "PROGRAMS",
    "LibraryProgram",
    "TracrTask",
    "library_task",
    "program_names",
]
