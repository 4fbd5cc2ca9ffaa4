"""Mean, resample and patching ablation on mixture-of-experts layers: fused experts and routers.

transformers 5 computes a sparse-MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) as
``router(x) -> (logits, weights, indices)`` and ``experts(x, indices, weights)``, with every
expert's gated MLP in two fused tensors (``gate_up_proj`` ``[expert, 2 * neuron, d_model]``,
``down_proj`` ``[expert, d_model, neuron]``, see ``adapters/hf_moe.py``). Neither is a
``y = W x`` layer whose output can take an added term (``_sites.py``): the router's logits pass
through softmax and top-k inside its forward, and the experts' gate / up products pass through
the activation before ``down_proj``. So the masked-out terms are added where the maps are
computed, as the existing definition ``y = (m * W) x + ((1 - m) * W) x'`` says for each matrix:

- router ``W_router``: ``logits = (m * W) x + ((1 - m) * W) x'``, then the router's own softmax,
  top-k and normalisation on these logits (so masking it changes which experts run);
- expert ``E``'s ``gate_up_proj[E]`` (``W_gate``, ``W_in``) and ``down_proj[E]`` (``W_out``) on
  the tokens routed to ``E``: ``g = (m * W_gu) x + ((1 - m) * W_gu) x'``,
  ``h = act(g_gate) * g_up``, ``y = (m * W_d) h + ((1 - m) * W_d) h'``, scaled by the token's
  routing weight as transformers does.

What ``x'`` and ``h'`` are:

- mean: for the router, the mean block input over every token of the reference data (what the
  router reads); for expert ``E``, the means of its input ``x`` and of its ``down_proj`` input
  ``h`` over the tokens routed to ``E`` in the unmasked model's run on the reference data (what
  the expert received). A whole-expert mask thus gives each token routed to ``E`` the expert's
  mean output, times the token's routing weight.
- resample / patch: ``x'`` is the block input at the same position in the drawn example / the
  counterfactual twin, and ``h'`` expert ``E``'s hidden activation on that ``x'`` with the
  unmasked weights (what ``E`` would receive there, routed to it in that run or not).

While such an ablation is attached, a forward hook replaces the experts module's output by this
computation in transformers' eager form (a loop over the experts hit), whatever the model's
``experts_implementation``; the two agree up to float rounding. The module's own forward still
runs first (wrappers such as nnsight's keep working), so this costs about one more experts
forward. The router's tail is re-run on the new logits by a forward hook too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import _sites, adapters
from ._types import Target, model_class

if TYPE_CHECKING:
    from ._attach import _Slot

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
# transformers' top-k routers, and whether each normalises its top-k weights always (Mixtral)
# or as its config says (``norm_topk_prob``)
ROUTERS = {"MixtralTopKRouter": True, "Qwen2MoeTopKRouter": None, "Qwen3MoeTopKRouter": None}
_STANDARD = {
    "has_gate": True,
    "is_concatenated": True,
    "is_transposed": False,
    "has_bias": False,
    "has_post_expert_norm": False,
}


def _class_name(module: nn.Module) -> str:
    return model_class(module).__name__


def _is_experts(module: nn.Module, attribute: str) -> bool:
    """Fused experts: ``gate_up_proj`` and ``down_proj`` tensors with an expert axis."""
    tensors = [adapters.real_tensor(module, name) for name in EXPERT_TENSORS]
    return attribute in EXPERT_TENSORS and all(
        isinstance(t, Tensor) and t.dim() == 3 for t in tensors
    )


def _is_router(module: nn.Module, attribute: str) -> bool:
    return attribute == "weight" and (
        _class_name(module) in ROUTERS or _class_name(module).endswith("TopKRouter")
    )


def _block_of(root: nn.Module, path: str, ablation: str) -> str:
    """The sparse-MoE block (the module with ``gate`` and ``experts``) above ``path``."""
    parts = path.split(".")
    for end in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:end])
        module = root.get_submodule(candidate)
        if hasattr(module, "experts") and hasattr(module, "gate"):
            return candidate
    raise TypeError(
        f"{ablation} on {path!r}: found no sparse-MoE block (a module with `gate` and `experts`) "
        "above it, whose input the masked-out router and expert terms read. Use zero or reinit "
        "ablation for this target, or exclude it."
    )


def split_moe(
    ablation: object, root: nn.Module, targets: Mapping[str, Target]
) -> tuple[MoeInputs | None, dict[str, Target]]:
    """The MoE router / expert targets handled here and the rest (for ``_sites.py``)."""
    name = type(ablation).__name__
    moe: dict[tuple[str, str], list[Target]] = {}
    rest = {}
    for key, target in targets.items():
        module = root.get_submodule(target.module)
        if _is_experts(module, target.attribute) or _is_router(module, target.attribute):
            moe.setdefault(target.location, []).append(target)
        else:
            rest[key] = target
    if not moe:
        return None, rest
    return MoeInputs(name, root, moe), rest


class MoeInputs:
    """The routers and fused experts of one attachment, the inputs recorded for them, and the
    hooks that add their masked-out terms (mode ``"mean"``, ``"resample"`` or ``"patch"``)."""

    def __init__(self, ablation: str, root: nn.Module, moe: Mapping[tuple[str, str], list]):
        self.ablation = ablation
        self.routers: dict[tuple[str, str], str] = {}
        self._normalise: dict[tuple[str, str], bool | None] = {}
        self.experts: dict[str, str] = {}  # experts module path -> block path
        self.covered: dict[str, Tensor] = {}  # experts path -> which experts carry targets
        for location, members in moe.items():
            path, attribute = location
            module = root.get_submodule(path)
            block = _block_of(root, path, ablation)
            if _is_router(module, attribute):
                if _class_name(module) not in ROUTERS:
                    raise TypeError(
                        f"{ablation} on the router {path!r} ({_class_name(module)}): the "
                        "masked-out router term is added to the logits before the router's own "
                        f"softmax and top-k, which is written for {sorted(ROUTERS)} only. Use "
                        "zero or reinit ablation for it, or exclude the router target."
                    )
                self.routers[location] = block
                self._normalise[location] = ROUTERS[_class_name(module)]
                continue
            flags = {key: getattr(module, key, value) for key, value in _STANDARD.items()}
            if flags != _STANDARD or getattr(module, "_is_expert_parallel", False):
                raise TypeError(
                    f"{ablation} on the experts at {path!r} ({_class_name(module)}, {flags}): "
                    f"the masked-out expert terms are written for {_STANDARD} experts on one "
                    "device (transformers 5's Mixtral / Qwen-MoE). Use zero or reinit ablation "
                    "for these targets, or exclude them."
                )
            self.experts[path] = block
            real = adapters.real_tensor(module, attribute)
            count = torch.zeros(real.shape, dtype=torch.bool)
            for target in members:
                target.layout.to_canonical(count).fill_(True)
            previous = self.covered.get(path, torch.zeros(real.shape[0], dtype=torch.bool))
            self.covered[path] = previous | count.flatten(1).any(1)
        self.blocks = set(self.routers.values()) | set(self.experts.values())
        self.mode = ""
        self.generator: torch.Generator | None = None
        self.recording = False
        self._sums: dict[str, Any] = {}
        self._router_mean: dict[str, Tensor] = {}  # block -> mean input
        self._expert_mean: dict[str, tuple[Tensor, Tensor]] = {}  # experts -> (x, h) means
        self._pool: dict[str, Tensor] = {}  # block -> reference inputs [example, ...]
        self._recorded: dict[str, list[Tensor]] = {}  # block -> the twin's inputs (patch)
        self._calls: dict[str, int] = {}
        self._twin: dict[str, Tensor] = {}  # block -> this forward's x' [token, d_model]

    # ---- recording on the unmasked model ------------------------------------------------
    def capture_hooks(self, root: nn.Module, mode: str, generator=None) -> list:
        """Hooks recording what ``mode`` needs while the reference data runs unmasked."""
        self.mode, self.generator = mode, generator
        sums: dict[str, Any] = {}
        handles = []
        for block in self.blocks:

            def record(module, args, kwargs, block=block):
                x = _first(args, kwargs, "hidden_states").detach()
                if mode == "resample":
                    sums.setdefault(block, []).append(x)
                elif mode == "mean":
                    flat = x.reshape(-1, x.shape[-1])
                    total, count, _ = sums.get(block, (0, 0, None))
                    sums[block] = (total + flat.double().sum(0), count + flat.shape[0], x.dtype)

            module = root.get_submodule(block)
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
        if mode == "mean":
            for path in self.experts:
                experts = root.get_submodule(path)
                record = self._expert_recorder(experts, path, sums)
                handles.append(experts.register_forward_pre_hook(record, with_kwargs=True))
        self._sums = sums
        return handles

    def _expert_recorder(self, experts: nn.Module, path: str, sums: dict):
        def record(module, args, kwargs):
            hidden, index, _ = _expert_args(args, kwargs)
            hidden = hidden.detach()
            count = experts.gate_up_proj.shape[0]
            x_sum, h_sum, seen = sums.get(path) or (
                torch.zeros(count, hidden.shape[-1], dtype=torch.float64),
                torch.zeros(count, experts.down_proj.shape[-1], dtype=torch.float64),
                torch.zeros(count, dtype=torch.int64),
            )
            routed = F.one_hot(index, count + 1)[..., :count].sum(-2) > 0  # [token, expert]
            seen = seen + routed.sum(0).cpu()
            x_sum = x_sum + (routed.T.double() @ hidden.double()).cpu()
            for expert in routed.any(0).nonzero().flatten().tolist():
                h = _hidden(experts, experts.gate_up_proj[expert], hidden[routed[:, expert]])
                h_sum[expert] += h.double().sum(0).cpu()
            sums[path] = (x_sum, h_sum, seen)

        return record

    def finish_capture(self, root: nn.Module) -> None:
        """Turn what :meth:`capture_hooks` recorded into means / pools; clear errors where
        a block or a targeted expert saw no input."""
        sums, self._sums = self._sums, {}
        for block in self.blocks:
            if block not in sums:
                raise ValueError(
                    f"{self.ablation}: the MoE block {block!r} was never called while running "
                    "the reference data; check `forward`."
                )
        for path in self.experts:
            if self.mode != "mean":
                continue
            if path not in sums:
                raise ValueError(
                    f"{self.ablation}: the experts {path!r} were never called while running the "
                    "reference data; check `forward`."
                )
            real = adapters.real_tensor(root.get_submodule(path), "gate_up_proj")
            x_sum, h_sum, seen = sums[path]
            unseen = (self.covered[path] & (seen == 0)).nonzero().flatten().tolist()
            if unseen:
                raise ValueError(
                    f"{self.ablation}: the reference data routed no token to expert(s) {unseen} "
                    f"of {path!r}, so their mean input is undefined. Use more reference data, "
                    "or exclude those experts' targets."
                )
            scale = seen.clamp(min=1).double()[:, None]
            self._expert_mean[path] = (
                (x_sum / scale).to(device=real.device, dtype=real.dtype),
                (h_sum / scale).to(device=real.device, dtype=real.dtype),
            )
        for block in self.blocks:
            if self.mode == "resample":
                self._pool[block] = torch.cat(sums[block])
            elif self.mode == "mean":
                total, count, dtype = sums[block]
                self._router_mean[block] = (total / count).to(dtype)

    # ---- the masked model -----------------------------------------------------------------
    def hooks(self, root: nn.Module, slots: Mapping[tuple[str, str], _Slot], mode: str) -> list:
        """The hooks adding the masked-out terms while attached; returns their handles (and
        removes those it made if one cannot be added)."""
        self.mode = mode
        handles: list = []
        try:
            for path in self.experts:  # first: the one step that may refuse
                handles.append(_Claim(root.get_submodule(path), self.ablation))
            if mode != "mean":
                for block in self.blocks:
                    mine = [s for loc, s in slots.items() if self._block(loc) == block]
                    setter = self._twin_setter(block, mine)
                    module = root.get_submodule(block)
                    handles.append(module.register_forward_pre_hook(setter, with_kwargs=True))
            for location, block in self.routers.items():
                router = root.get_submodule(location[0])
                normalise = self._normalise[location]
                hook = self._router_hook(router, block, slots[location], normalise)
                handles.append(router.register_forward_hook(hook))
            for path, block in self.experts.items():
                experts = root.get_submodule(path)
                pair = tuple(slots.get((path, attribute)) for attribute in EXPERT_TENSORS)
                hook = self._experts_hook(experts, path, block, pair)
                handles.append(experts.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            for handle in reversed(handles):
                handle.remove()
            raise
        return handles

    def _block(self, location: tuple[str, str]) -> str | None:
        if location in self.routers:
            return self.routers[location]
        return self.experts.get(location[0])

    def _twin_setter(self, block: str, slots: list):
        def hook(module, args, kwargs):
            x = _first(args, kwargs, "hidden_states")
            if self.recording:
                self._recorded.setdefault(block, []).append(x.detach())
                return
            self._twin.pop(block, None)
            if self.mode == "resample":  # drawn even when the block keeps every weight, so
                # each block's draws are the same whichever blocks a configuration masks
                where = f"the MoE block {block!r}"
                index = _sites.resample_index(self._pool[block], x, self.generator, where)
            if all(slot.mask is None for slot in slots):
                return
            if self.mode == "resample":
                twin = self._pool[block][index.to(self._pool[block].device)]
            else:
                twin = self._paired(block, x)
            self._twin[block] = twin.reshape(-1, twin.shape[-1])

        return hook

    def _paired(self, block: str, x: Tensor) -> Tensor:
        recorded = self._recorded.get(block)
        if not recorded:
            raise RuntimeError(
                f"PatchAblation has no counterfactual input for the MoE block {block!r}: call "
                "`ablation.record(batch)` before running the model on `batch` (si.find, "
                "ablation_effect and faithfulness_curve do this for every batch)."
            )
        call = self._calls.get(block, 0)
        self._calls[block] = call + 1
        twin = recorded[call % len(recorded)]
        if twin.shape != x.shape:
            raise ValueError(
                f"PatchAblation at the MoE block {block!r}: the counterfactual run gave it an "
                f"input of shape {tuple(twin.shape)}, the clean run {tuple(x.shape)}. Pair each "
                "batch with a twin of the same shape (batch size and sequence length)."
            )
        return twin

    def start_recording(self) -> None:
        """Before a counterfactual run (patching): keep every block's input."""
        self._recorded, self._calls, self.recording = {}, {}, True

    def stop_recording(self) -> list[str]:
        """After it: the blocks the run never called."""
        self.recording = False
        return sorted(block for block in self.blocks if not self._recorded.get(block))

    def _source(self, block: str) -> Tensor:
        if self.mode == "mean":
            return self._router_mean[block][None]
        twin = self._twin.get(block)
        if twin is None:
            raise RuntimeError(
                f"The MoE block {block!r}'s router or experts ran without the block: call the "
                "whole model (the masked-out terms read the block's input)."
            )
        return twin

    def _router_hook(self, router: nn.Module, block: str, slot: _Slot, normalise: bool | None):
        def hook(module, args, output):
            if self.recording or slot.mask is None:
                return output
            logits = output[0]
            removed = _unmasked(router, "weight") * (1 - slot.mask)
            logits = logits + F.linear(self._source(block), removed)
            # the router's own tail on the new logits (MixtralTopKRouter, Qwen*MoeTopKRouter)
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            top, indices = torch.topk(probs, router.top_k, dim=-1)
            if normalise or (normalise is None and router.norm_topk_prob):
                top = top / top.sum(dim=-1, keepdim=True)
            if normalise is None:
                top = top.to(logits.dtype)
            return (logits, top, indices, *output[3:])

        return hook

    def _experts_hook(self, experts: nn.Module, path: str, block: str, slots: tuple):
        count = experts.gate_up_proj.shape[0]

        def hook(module, args, kwargs, output):
            masks = [None if slot is None else slot.mask for slot in slots]
            if self.recording or all(mask is None for mask in masks):
                return output
            hidden, index, weights = _expert_args(args, kwargs)
            gate_up, down = experts.gate_up_proj, experts.down_proj  # m * W
            removed = [
                None if mask is None else _unmasked(experts, attribute) * (1 - mask)
                for attribute, mask in zip(EXPERT_TENSORS, masks, strict=True)
            ]
            if self.mode == "mean":
                x_mean, h_mean = self._expert_mean[path]
            else:
                twin = self._source(block)
            result = torch.zeros_like(hidden)
            with torch.no_grad():
                hits = F.one_hot(index, num_classes=count + 1).permute(2, 1, 0)
                hit = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero()
            for expert in hit.flatten().tolist():
                if expert == count:
                    continue
                position, tokens = torch.where(hits[expert])
                mixed = F.linear(hidden[tokens], gate_up[expert])
                if self.mode == "mean":
                    x_twin, h_twin = x_mean[expert][None], h_mean[expert][None]
                else:
                    x_twin, h_twin = twin[tokens], None
                if removed[0] is not None:
                    mixed = mixed + F.linear(x_twin, removed[0][expert])
                out = F.linear(_gate(experts, mixed), down[expert])
                if removed[1] is not None:
                    if h_twin is None:
                        unmasked = _unmasked(experts, "gate_up_proj")[expert]
                        h_twin = _hidden(experts, unmasked, x_twin)
                    out = out + F.linear(h_twin, removed[1][expert])
                out = out * weights[tokens, position, None]
                result.index_add_(0, tokens, out.to(result.dtype))
            return result

        return hook

    def release(self) -> None:
        self._router_mean, self._expert_mean, self._pool = {}, {}, {}
        self._recorded, self._calls, self._twin = {}, {}, {}
        self.recording = False


_CLAIM = "_subnet_interp_moe_ablation"


class _Claim:
    """Marks an experts module as recomputed by one input ablation until :meth:`remove`: a
    second one (a nested ``si.masked``) would recompute its output without the first's terms."""

    def __init__(self, module: nn.Module, ablation: str):
        if _CLAIM in module.__dict__:
            raise RuntimeError(
                f"{ablation}: the experts {_class_name(module)} already compute under "
                f"{module.__dict__[_CLAIM]} (e.g. an enclosing si.masked); nested mean / "
                "resample / patch ablations of one experts module are not supported. Use zero "
                "ablation in one of them, or mask the experts in one attachment."
            )
        self.module = module
        module.__dict__[_CLAIM] = ablation

    def remove(self) -> None:
        self.module.__dict__.pop(_CLAIM, None)


def _unmasked(module: nn.Module, attribute: str) -> Tensor:
    """The real tensor behind ``module.<attribute>``, parametrized or not."""
    if parametrize.is_parametrized(module, attribute):
        return module.parametrizations[attribute].original
    return getattr(module, attribute)


def _gate(experts: nn.Module, mixed: Tensor) -> Tensor:
    """``act(gate) * up`` as the experts module computes it."""
    apply = getattr(experts, "_apply_gate", None)
    if apply is not None:
        return apply(mixed)
    gate, up = mixed.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _hidden(experts: nn.Module, gate_up: Tensor, x: Tensor) -> Tensor:
    """An expert's ``down_proj`` input on ``x`` for its ``gate_up`` rows."""
    return _gate(experts, F.linear(x, gate_up))


def _first(args: tuple, kwargs: dict, name: str) -> Tensor:
    return args[0] if args else kwargs[name]


def _expert_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[name] for name in names[len(args) :]]
    return values[0], values[1], values[2]


__all__ = ["EXPERT_TENSORS", "ROUTERS", "MoeInputs", "split_moe"]
