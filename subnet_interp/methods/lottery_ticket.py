"""Lottery tickets by iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
Frankle, Dziugaite, Roy & Carbin 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checkpoint, _loop
from .._fingerprint import fingerprint
from .._registry import check_hparams, methods
from .._subnetwork import Subnetwork
from ._base import FindContext, FindResult, Method
from ._weights import canonical_weights, load_plain_state_dict, plain_state_dict, train_weights


def prune_smallest(
    weights: dict[str, Tensor],
    keep: dict[str, Tensor],
    fraction: float,
    target_density: float,
    scope: str,
) -> dict[str, Tensor]:
    """Remove the ``fraction`` of still-kept weights with the smallest ``|w|``, never going below
    ``target_density``: over all targets at once (``"global"``) or within each target."""
    if scope == "per_target":
        out = {}
        for name, w in weights.items():
            out.update(
                prune_smallest({name: w}, {name: keep[name]}, fraction, target_density, "global")
            )
        return out
    flat_w = torch.cat([w.abs().flatten().float() for w in weights.values()])
    flat_keep = torch.cat([keep[n].flatten() for n in weights])
    kept = int(flat_keep.sum())
    floor = round(target_density * flat_w.numel())
    remove = min(round(fraction * kept), max(0, kept - floor))
    new_keep = flat_keep.clone()
    if remove:
        scores = torch.where(flat_keep, flat_w, torch.full_like(flat_w, float("inf")))
        new_keep[torch.topk(scores, remove, largest=False, sorted=False).indices] = False
    out, offset = {}, 0
    for name, w in weights.items():
        out[name] = new_keep[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
    return out


@methods.register
@dataclass(frozen=True)
class LotteryTicket(Method):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019, "The Lottery
    Ticket Hypothesis", Alg. 1; rewinding to step k from Frankle, Dziugaite, Roy & Carbin, ICML
    2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"; defaults from
    facebookresearch/open_lth).

    Each round trains the (masked) network for ``steps`` steps, removes ``prune_fraction = 0.2``
    of the remaining weights with the smallest magnitude (``scope="global"`` as open_lth, or
    ``"per_target"``, Frankle & Carbin's layer-wise pruning), and rewinds every weight to its
    value at step ``rewind_step`` of the first round (0: the original initialisation). Rounds
    stop after ``rounds`` or when ``target_density`` is reached (the last round prunes just down
    to it). With ``retrain_final`` the final ticket is trained once more from the rewound
    weights and its loss recorded. Adam, ``lr = 1.2e-3`` (Frankle & Carbin's LeNet setting).

    ``FindResult.weights`` holds the rewound target weights and ``FindResult.state`` the full
    rewound ``state_dict``: the ticket to retrain. With ``checkpoint_dir`` set, each finished
    round is saved there (safetensors + JSON) and a later run with the same model and
    hyper-parameters resumes after the last saved round, at the data position an uninterrupted
    run has there. The files are ``subnet_interp._checkpoint`` files (atomic writes; another
    run's files are refused).

    Scores (``FindResult.scores``): a kept weight scores its ``|w|`` after the last round's
    training, the magnitude the last pruning ranked by (``>= 0``). A weight pruned in round
    ``r`` of ``R`` scores ``(r - R) + |w_r| / (1 + |w_r|)``, in ``[r - R, r - R + 1)``, with
    ``|w_r|`` its magnitude when it was pruned: negative, and the later it was pruned the
    higher (within a round, by magnitude). So kept weights score above all pruned ones and the
    mask is exactly the top ``kept()`` scores (ties only between kept weights of equal
    ``|w|``, at most one of which can sit at the cut when the cut is ``kept()``).
    """

    name = "lottery_ticket"
    trains_weights = True

    prune_fraction: float = 0.2
    rounds: int | None = None
    target_density: float | None = 0.2
    scope: str = "global"
    rewind_step: int = 0
    lr: float = 1.2e-3
    retrain_final: bool = True
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        if not 0.0 < self.prune_fraction < 1.0:
            raise ValueError(
                f"lottery_ticket: prune_fraction must be in (0, 1), got {self.prune_fraction}; "
                "pass e.g. 0.2 (the default, Frankle & Carbin)."
            )
        if self.rounds is None and self.target_density is None:
            raise ValueError(
                "lottery_ticket: both `rounds` and `target_density` are None; give one or both "
                "so pruning can stop (e.g. target_density=0.2)."
            )
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(
                f"lottery_ticket: target_density must be in (0, 1], got {self.target_density}; "
                "pass the fraction of weights the ticket keeps (e.g. 0.2)."
            )
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"lottery_ticket: rounds must be >= 1 (or None), got {self.rounds}.")
        if self.scope not in ("global", "per_target"):
            raise ValueError(
                f"lottery_ticket: scope must be 'global' or 'per_target', got {self.scope!r}."
            )
        if self.rewind_step < 0:
            raise ValueError(
                f"lottery_ticket: rewind_step must be >= 0 (0 rewinds to the initial weights), "
                f"got {self.rewind_step}."
            )

    def optimizer(self, params) -> torch.optim.Optimizer:
        """Adam at ``lr``: the optimiser that trains the weights in each round."""
        return torch.optim.Adam(params, lr=self.lr)

    def run(self, context: FindContext) -> FindResult:
        root = context.root
        total = sum(t.numel for t in context.targets.values())
        target_density = self.target_density or 0.0
        identity = self._identity(context, fingerprint(context.model))
        keep = {
            n: torch.ones(t.shape, dtype=torch.bool, device=context.device)
            for n, t in context.targets.items()
        }
        rewind_state = plain_state_dict(root)
        history: dict[str, list[float]] = {"round": [], "loss": [], "density": []}
        start_round = 0
        # what the scores are made of: each weight's |w| when it was last ranked, and the
        # round it was pruned in (-1 while kept)
        magnitude = {n: w.abs().float() for n, w in canonical_weights(context).items()}
        pruned_in = {n: torch.full_like(m, -1.0) for n, m in magnitude.items()}
        resumed = self._resume(context, identity)
        if resumed is not None:
            start_round, keep, rewind_state, history, ranked = resumed
            load_plain_state_dict(root, rewind_state)
            magnitude, pruned_in = _resumed_ranking(ranked, keep, magnitude, start_round)

        def snapshot_at(step: int) -> None:
            nonlocal rewind_state
            if step + 1 == self.rewind_step:
                rewind_state = plain_state_dict(root)

        round_index = start_round
        while not self._done(round_index, keep, total):
            loss = train_weights(
                context,
                context.steps,
                self.optimizer,
                keep=keep,
                on_step=snapshot_at if round_index == 0 and self.rewind_step > 0 else None,
                description=f"lottery_ticket round {round_index}",
            )
            with torch.no_grad():
                weights = canonical_weights(context)
                new_keep = prune_smallest(
                    weights, keep, self.prune_fraction, target_density, self.scope
                )
                for n, w in weights.items():
                    magnitude[n] = torch.where(keep[n], w.abs().float(), magnitude[n])
                    pruned_in[n] = torch.where(keep[n] & ~new_keep[n], round_index, pruned_in[n])
                keep = new_keep
                load_plain_state_dict(root, rewind_state)
            density = sum(int(k.sum()) for k in keep.values()) / total
            history["round"].append(float(round_index))
            history["loss"].append(float(loss))
            history["density"].append(density)
            _loop.report(round_index, {"loss": float(loss), "density": density}, context.callbacks)
            round_index += 1
            ranked = {"magnitude": magnitude, "pruned_in": pruned_in}
            self._save(identity, round_index, keep, rewind_state, history, ranked)
        scores = _scores(keep, magnitude, pruned_in, round_index)
        rewound = canonical_weights(context)
        state = plain_state_dict(root)
        if self.retrain_final:
            loss = train_weights(
                context, context.steps, self.optimizer, keep=keep, description="final ticket"
            )
            history["final_ticket_loss"] = [float(loss)]
        return FindResult(Subnetwork(keep), history, weights=rewound, state=state, scores=scores)

    def _done(self, round_index: int, keep: dict[str, Tensor], total: int) -> bool:
        if self.rounds is not None and round_index >= self.rounds:
            return True
        if self.target_density is not None:
            kept = sum(int(k.sum()) for k in keep.values())
            return kept <= round(self.target_density * total)
        return False

    # ------------------------------------------------------------ checkpoints
    def _identity(self, context: FindContext, model_fingerprint: str) -> dict:
        """What a checkpoint must match to be resumed from."""
        hparams = {k: v for k, v in self.hparams().items() if k != "checkpoint_dir"}
        return _checkpoint.jsonable(
            {
                "hparams": hparams,
                "fingerprint": model_fingerprint,
                "steps": context.steps,
                "targets": list(context.targets),
            }
        )

    def _save(self, identity, round_index, keep, rewind_state, history, ranked) -> None:
        """Checkpoint the run after ``round_index`` finished rounds (with ``checkpoint_dir``)."""
        if self.checkpoint_dir is None:
            return
        tensors = {f"keep/{n}": m for n, m in keep.items()}
        for kind, values in ranked.items():  # the scores' parts (files before scores lack them)
            tensors.update({f"{kind}/{n}": v for n, v in values.items()})
        tensors.update({f"rewind/{k}": v for k, v in rewind_state.items()})
        header = {"identity": identity, "round": round_index, "history": history}
        path = _checkpoint.round_file(self.checkpoint_dir, round_index)
        _checkpoint.write(path, tensors, _checkpoint.jsonable(header))

    def _resume(self, context: FindContext, identity):
        """``(rounds done, keep, rewind state, history, score parts)`` of the last checkpoint;
        ``None`` without one. The batches are advanced past the rounds done."""
        if self.checkpoint_dir is None:
            return None
        path = _checkpoint.last_round_file(self.checkpoint_dir)
        if path is None:
            return None
        tensors, header = _checkpoint.read_file(path)
        mismatched = _checkpoint.differing(header.get("identity", {}), identity)
        if mismatched:
            raise ValueError(
                f"Checkpoint {str(path)!r} belongs to another run (different {mismatched}); "
                "refusing to resume from it. Use a new checkpoint_dir or delete the old one."
            )
        keep = {n: tensors[f"keep/{n}"].to(context.device) for n in context.targets}
        rewind = {
            k[len("rewind/") :]: v.to(context.device)
            for k, v in tensors.items()
            if k.startswith("rewind/")
        }
        ranked = {
            kind: {n: tensors[f"{kind}/{n}"].to(context.device) for n in context.targets}
            for kind in ("magnitude", "pruned_in")
            if all(f"{kind}/{n}" in tensors for n in context.targets)
        }
        rounds = int(header["round"])
        _loop.skip(context.batches, rounds * context.steps)
        history = {k: list(v) for k, v in header["history"].items()}
        return rounds, keep, rewind, history, ranked


def _resumed_ranking(ranked, keep, magnitude, rounds):
    """The score parts of a resumed run; a checkpoint written before scores existed has none,
    and then every weight it pruned counts as pruned in its last round, at its initial |w|."""
    if len(ranked) == 2:
        return ranked["magnitude"], ranked["pruned_in"]
    pruned_in = {n: torch.where(keep[n], -1.0, rounds - 1.0) for n in magnitude}
    return magnitude, pruned_in


def _scores(keep, magnitude, pruned_in, rounds) -> dict[str, Tensor]:
    """Kept weights: ``|w|``; pruned in round ``r`` of ``rounds``: ``r - rounds + |w| / (1 + |w|)``
    (computed in float64 so that it stays below 0 in float32)."""
    scores = {}
    for n, kept in keep.items():
        m = magnitude[n].double()
        pruned = pruned_in[n].double() - rounds + m / (1.0 + m)
        scores[n] = torch.where(kept, m, pruned).float()
    return scores
