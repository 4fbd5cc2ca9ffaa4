"""First-order attribution of the loss to every weight (SNIP / Taylor pruning; under patching,
attribution patching at the level of weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _distributed, _loop
from .._attach import Attachment
from .._ranking import top_masks
from .._registry import check_hparams, methods
from .._subnetwork import Subnetwork
from ._base import FindContext, FindResult, Method
from .magnitude import check_density, check_scope


@methods.register
@dataclass(frozen=True)
class Attribution(Method):
    """One-shot attribution: how much the loss would change, to first order, if each weight
    were removed, accumulated over ``steps`` batches of the data.

    Every target gets a mask of ones that requires grad; the score of a weight is
    ``|E_batches[dL/dm]|`` at ``m = 1``, the gradient taken through the ablation ``si.find``
    trains under (``ablation=``):

    - zero ablation: ``dL/dm = w * dL/dw``, the connection sensitivity of SNIP (Lee, Ajanthan &
      Torr, ICLR 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
      Eq. 6) and the first-order Taylor criterion of Molchanov et al. (ICLR 2017, "Pruning
      Convolutional Neural Networks for Resource Efficient Inference"; CVPR 2019);
    - ``si.PatchAblation``: ``dL/dm = w * dL/dy (x - x')``, attribution patching (Nanda 2023;
      Syed, Rager & Conmy 2023, "Attribution Patching Outperforms Automated Circuit
      Discovery") of each weight between the clean and the counterfactual run;
    - mean / resample ablation likewise, with ``x'`` the mean or resampled input.

    Signed gradients are averaged over the batches before the absolute value (``accumulate=
    "signed"``, as EAP and MIB's EAP-IG sum signed attributions over examples and rank by their
    absolute value); ``accumulate="absolute"`` averages per-batch absolute values instead
    (SNIP's magnitude on every batch). The mask keeps exactly the ``round(density * n)``
    top-scored weights, globally or per target (``scope``), ties broken by position. The
    weights never change. The scores can warm-start a learnable method:
    ``si.find(..., init_scores=result.scores)``.

    Scores (``FindResult.scores``): the attribution above (float32); the mask is exactly their
    top ``kept()`` (``from_scores(scores, density=density, per_target=scope == "per_target")``).
    """

    name = "attribution"
    scores_from_gradient = True

    density: float = 0.2
    scope: str = "global"
    accumulate: str = "signed"

    def __post_init__(self) -> None:
        check_hparams(self, types_only=True)  # so the range checks below never compare a str
        check_density(self.density)
        check_scope(self.name, self.scope)
        if self.accumulate not in ("signed", "absolute"):
            raise ValueError(
                f"attribution: accumulate must be 'signed' (average the gradients, then take "
                f"|.|) or 'absolute' (average |gradient|), got {self.accumulate!r}."
            )

    def run(self, context: FindContext) -> FindResult:
        names = list(context.targets)
        ones = {
            name: torch.ones(t.shape, device=context.device, requires_grad=True)
            for name, t in context.targets.items()
        }
        totals = {
            name: torch.zeros(t.shape, device=context.device) for name, t in context.targets.items()
        }
        losses = []
        world = _distributed.world()
        watch = _loop.FiniteWatch()
        attachment = Attachment(
            context.root, context.targets, context.ablation, adapter=context.adapter,
            model=context.model,
        )  # fmt: skip
        bar = _loop.progress_bar(context.steps, self.name, show=context.progress)
        try:
            for step in range(context.steps):
                batch = next(context.batches)
                attachment.set_masks(ones)
                attachment.on_batch(batch)
                loss = context.loss_fn(context.model, batch)
                _loop.check_loss(loss, step)
                watch.observe(loss, step, world)
                grads = torch.autograd.grad(loss, [ones[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads, strict=True):
                    if grad is not None:
                        totals[name] += grad.abs() if self.accumulate == "absolute" else grad
                losses.append(loss.detach())
                if step % context.log_every == 0 or step == context.steps - 1:
                    watch.check(lambda: Subnetwork(_all_kept(ones)))  # the host reads it here
                bar.update(1)
        finally:
            bar.close()
            attachment.remove()
        # the mean over the ranks' batches (each rank accumulated over its own shard)
        totals = {n: _distributed.average(t, world) for n, t in totals.items()}
        scores = {n: (t / max(1, context.steps)).abs().float() for n, t in totals.items()}
        masks = top_masks(scores, density=self.density, per_target=self.scope == "per_target")
        kept = sum(int(m.sum()) for m in masks.values()) / max(
            1, sum(m.numel() for m in masks.values())
        )
        # per batch: its loss, and the density of the mask cut from the scores so far (the size
        # is fixed by ``density``; the model itself computed with every weight)
        history = {
            "step": [float(i) for i in range(len(losses))],
            "loss": torch.stack(losses).float().cpu().tolist() if losses else [],
            "density": [kept] * len(losses),
        }
        return FindResult(Subnetwork(masks), history, scores=scores)


def _all_kept(ones: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.ones_like(m, dtype=torch.bool) for n, m in ones.items()}
