"""Reading hidden states for probing: the residual stream after a block (the module each model
family's adapter names), captured by a forward hook, and the forward pass stopped there.

Nothing here knows model families: ``adapters.resolve(model)`` says where the blocks are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from . import adapters
from ._types import NotFoundError


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
    try:
        blocks = adapter.blocks(model)
    except TypeError as error:
        raise TypeError(
            f"`layer={layer}` is a block index. {error} In probing, `layer` may be the path of "
            "the module whose output is the hidden state, e.g. layer='encoder.2'."
        ) from None
    if not 0 <= layer < len(blocks):
        raise IndexError(
            f"`layer={layer}` is out of range: the model has {len(blocks)} blocks "
            f"(0 .. {len(blocks) - 1})."
        )
    module = adapter.block_output(model, blocks[layer])
    return root, module, _path(root, module)


def _path(root: nn.Module, module: nn.Module) -> str:
    """The path of ``module`` under ``root`` (for messages and ``CapturedHidden.path``)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    return type(module).__qualname__  # not under root: the adapter returned a foreign module


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
    module the model's adapter names (``Adapter.blocks`` and ``Adapter.block_output``: Hugging
    Face GPT-2 ``transformer.h[L]``, GPT-NeoX and Llama ``layers[L]``, BERT / RoBERTa
    ``encoder.layer[L]``, ViT ``layers[L]``; TransformerLens ``blocks.L.hook_resid_post``, the
    ``TransformerBridge``'s ``blocks.L.hook_out``; an nnsight wrapper's underlying module's).
    For the last block this is
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
    """``root`` called on a tensor, a tuple of positional arguments or a mapping of keywords."""
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


@contextlib.contextmanager
def evaluating(root: nn.Module) -> Iterator[None]:
    """Context manager: ``root`` in eval mode, each module's own mode restored afterwards."""
    modes = {name: module.training for name, module in root.named_modules()}
    root.eval()
    try:
        yield
    finally:
        for name, module in root.named_modules():
            if name in modes:
                module.training = modes[name]


def device_of(root: nn.Module) -> torch.device:
    """The device of ``root``'s first parameter (CPU if it has none)."""
    first = next(root.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


__all__ = ["CapturedHidden", "capture_hidden", "read_hidden"]
