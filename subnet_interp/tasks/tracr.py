"""Ground-truth circuits: RASP programs compiled by tracr (Lindner et al. 2023), as bridges.

tracr compiles a RASP program into transformer weights whose every head and MLP has a known job,
so the set of components a program uses is a circuit known by construction. This module
compiles a program, copies its weights into a TransformerLens-native ``TransformerBridge`` (which
the adapters handle like any other bridge: canonical names, hooks, masks) and reads the ground
truth off the compiled weights.

Needs the optional extra ``tracr`` (``pip install subnet_interp[tracr]``, which installs the
``tracr-pypi`` package with jax and haiku).

The conversion follows tracr's architecture exactly: no layer norm, ReLU MLPs, learned absolute
positions, bidirectional attention unless the program was compiled with ``causal=True``, scores
scaled by ``1/sqrt(key_size)``; haiku's ``[in, out]`` matrices are transposed into
``nn.Linear``'s ``[out, in]``. tracr has no unembedding parameter, so the unembedding is
recovered by applying the compiled model's read-out to the identity of the residual space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..analysis.circuits import Circuit, head_node, mlp_node


def _require_tracr():
    try:
        from tracr.compiler import compiling  # noqa: F401
    except ImportError as error:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "subnet_interp.tasks.tracr needs tracr; install it with "
            "`pip install 'subnet_interp[tracr]'` (the tracr-pypi package)."
        ) from error
    return compiling


@dataclass
class TracrModel:
    """A compiled RASP program as a bridge, with its vocabulary and known circuit.

    ``circuit``: the heads and MLPs whose compiled weights are non-zero (the components the
    program uses). ``input_map`` / ``output_map`` translate between values and token / class ids.
    ``assembled`` is tracr's own model, kept to check the conversion against. ``spare_dims``:
    residual dimensions appended after tracr's, which no compiled weight reads or writes.
    """

    bridge: Any
    input_map: dict[Any, int]
    output_map: dict[Any, int]
    circuit: Circuit
    assembled: Any
    bos: str
    categorical: bool
    spare_dims: int = 0

    def encode(self, sequences: Sequence[Sequence[Any]]) -> Tensor:
        """Token ids ``[batch, 1 + length]`` with BOS prepended; all sequences equally long."""
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise ValueError(f"Sequences must all have the same length, got lengths {lengths}.")
        unknown = sorted({repr(v) for s in sequences for v in s if v not in self.input_map})
        if unknown:
            raise ValueError(
                f"Values {unknown[:5]} are not in the program's vocabulary "
                f"{sorted(repr(v) for v in self.input_map)}."
            )
        rows = [[self.input_map[self.bos], *(self.input_map[v] for v in s)] for s in sequences]
        return torch.tensor(rows, dtype=torch.long)

    def reference(self, tokens: Tensor) -> Tensor:
        """tracr's own output on ``tokens`` (``[batch, pos]`` class ids for a categorical program,
        else values), computed with jax; the BOS column is ``-1``."""
        import jax.numpy as jnp
        import numpy as np

        out = self.assembled.forward(self.assembled.params, jnp.asarray(tokens.numpy()))
        values = torch.from_numpy(np.asarray(out.unembedded_output).copy())
        if self.categorical:
            values = values.long()
            values[:, 0] = -1
        return values


def compile_program(
    program: Any,
    vocab: set[Any],
    max_seq_len: int,
    *,
    causal: bool = False,
    bos: str = "BOS",
    mlp_exactness: int = 100,
    spare_dims: int = 0,
) -> TracrModel:
    """Compile a RASP ``program`` with tracr and return it as a :class:`TracrModel`.

    The bridge reproduces tracr's outputs exactly (``argmax`` of its logits for categorical
    programs); ``bridge(tokens)`` returns ``[batch, pos, d_vocab_out]`` logits.
    ``mlp_exactness`` is tracr's: the slope ``L`` of the ramps with which its MLPs read a
    numerical value (``SelectorWidth``, numerical-to-categorical maps); tracr's default 100
    makes them steps. ``spare_dims``: see :func:`from_assembled`.
    """
    compiling = _require_tracr()
    assembled = compiling.compile_rasp_to_model(
        program,
        vocab=set(vocab),
        max_seq_len=max_seq_len,
        compiler_bos=bos,
        causal=causal,
        mlp_exactness=mlp_exactness,
    )
    return from_assembled(assembled, causal=causal, bos=bos, spare_dims=spare_dims)


def _unembedding(assembled: Any) -> Tensor:
    import haiku as hk
    import jax.numpy as jnp
    import numpy as np

    d_model = len(assembled.residual_labels)

    @hk.without_apply_rng
    @hk.transform
    def read_out(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    out = read_out.apply({}, jnp.eye(d_model))
    matrix = torch.from_numpy(np.asarray(out).copy()).float()
    return matrix[:, None] if matrix.ndim == 1 else matrix  # [d_model, d_out]


def from_assembled(
    assembled: Any, *, causal: bool = False, bos: str = "BOS", spare_dims: int = 0
) -> TracrModel:
    """Convert an already compiled tracr model (``AssembledTransformerModel``) into a bridge.

    ``spare_dims`` appends that many residual dimensions, zero in every compiled weight (the
    embeddings, every read and write, the unembedding): the program is unchanged, and a
    component writing only there cannot change the output (see :func:`plant_noise`)."""
    import numpy as np
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    params = {
        k: {p: torch.from_numpy(np.asarray(v).copy()).float() for p, v in d.items()}
        for k, d in assembled.params.items()
    }
    config = assembled.model_config
    input_map = dict(assembled.input_encoder.encoding_map)
    categorical = assembled.output_encoder is not None and hasattr(
        assembled.output_encoder, "encoding_map"
    )
    output_map = dict(assembled.output_encoder.encoding_map) if categorical else {}
    if spare_dims < 0:
        raise ValueError(f"spare_dims must be >= 0, got {spare_dims}.")
    unembed = _unembedding(assembled)
    d_tracr = unembed.shape[0]
    d_model = d_tracr + spare_dims
    n_ctx = params["pos_embed"]["embeddings"].shape[0]
    bridge_config = TransformerBridgeConfig(
        d_model=d_model,
        d_head=config.key_size,
        n_layers=config.num_layers,
        n_heads=config.num_heads,
        d_mlp=config.mlp_hidden_size,
        n_ctx=n_ctx,
        d_vocab=len(input_map),
        d_vocab_out=unembed.shape[1],
        act_fn="relu",
        normalization_type=None,
        positional_embedding_type="standard",
        attention_dir="causal" if causal else "bidirectional",
        default_prepend_bos=False,
    )
    bridge = TransformerBridge.boot_native(bridge_config)
    state = {
        "tok_embed.weight": params["token_embed"]["embeddings"],
        "pos.weight": params["pos_embed"]["embeddings"],
        "head.weight": unembed.T,
    }
    nodes = []
    for layer in range(config.num_layers):
        prefix = f"transformer/layer_{layer}"
        attn, mlp = f"{prefix}/attn", f"{prefix}/mlp"
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "linear")):
            state[f"layers.{layer}.attn.{ours}.weight"] = params[f"{attn}/{theirs}"]["w"].T
            state[f"layers.{layer}.attn.{ours}.bias"] = params[f"{attn}/{theirs}"]["b"]
        for ours, theirs in (("fc_in", "linear_1"), ("fc_out", "linear_2")):
            state[f"layers.{layer}.mlp.{ours}.weight"] = params[f"{mlp}/{theirs}"]["w"].T
            state[f"layers.{layer}.mlp.{ours}.bias"] = params[f"{mlp}/{theirs}"]["b"]
        value = params[f"{attn}/value"]["w"].view(d_tracr, config.num_heads, config.key_size)
        query = params[f"{attn}/query"]["w"].view(d_tracr, config.num_heads, config.key_size)
        for head in range(config.num_heads):
            if value[:, head].abs().sum() > 0 or query[:, head].abs().sum() > 0:
                nodes.append(head_node(layer, head))
        if params[f"{mlp}/linear_1"]["w"].abs().sum() > 0:
            nodes.append(mlp_node(layer))
    if spare_dims:
        state = {name: _pad_residual(name, t, d_tracr, spare_dims) for name, t in state.items()}
    _load(bridge, state)
    return TracrModel(
        bridge=bridge,
        input_map=input_map,
        output_map=output_map,
        circuit=Circuit(frozenset(nodes)),
        assembled=assembled,
        bos=bos,
        categorical=categorical,
        spare_dims=spare_dims,
    )


def _pad_residual(name: str, tensor: Tensor, d_tracr: int, spare: int) -> Tensor:
    """``tensor`` with zeros appended along its residual axis (the one of size ``d_tracr``:
    columns of embeddings, the unembedding and the reading weights, rows of the writing
    weights and their biases)."""
    reads = name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight", "fc_in.weight"))
    axis = 1 if reads or name in ("tok_embed.weight", "pos.weight", "head.weight") else 0
    writes = name.endswith(("attn.o.weight", "attn.o.bias", "fc_out.weight", "fc_out.bias"))
    if not (reads or writes or axis == 1):
        return tensor
    assert tensor.shape[axis] == d_tracr, (name, tuple(tensor.shape))
    pad = list(tensor.shape)
    pad[axis] = spare
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=axis)


def _load(bridge: Any, state: dict[str, Tensor]) -> None:
    own = {
        name.replace("._original_component", ""): p
        for name, p in bridge.original_model.named_parameters()
    }
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise RuntimeError(
            f"tracr conversion does not match the native bridge: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; transformer-lens may have changed its native model."
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise RuntimeError(
                    f"tracr weight {name} has shape {tuple(tensor.shape)}, the bridge expects "
                    f"{tuple(own[name].shape)}."
                )
            own[name].copy_(tensor)


def demo_program() -> Any:
    """A small categorical RASP program with a known layout, used by the tests and
    ``benchmarks/faithful_training.py``: three parallel reads in layer 0 (the previous, next and
    second-previous token), one in layer 1 (the previous position's "same neighbours" flag), and
    a ``SequenceMap`` in each MLP. Compile it over ``{"a", "b", "c"}`` with ``max_seq_len=6``
    (3 + 1 heads and both MLPs used)."""
    _require_tracr()
    from tracr.rasp import rasp

    def shift(d: int) -> Any:
        return rasp.Select(rasp.indices, rasp.indices, lambda k, q: q == k + d)

    prev, nxt, prev2 = (rasp.Aggregate(shift(d), rasp.tokens) for d in (1, -1, 2))
    same = rasp.categorical(rasp.SequenceMap(lambda a, b: int(a == b), prev, nxt))
    moved = rasp.categorical(rasp.Aggregate(shift(1), same))
    return rasp.categorical(rasp.SequenceMap(lambda m, p: int(m == 1 or p == "a"), moved, prev2))


def plant_noise(
    model: TracrModel, scale: float = 0.1, *, seed: int = 0, inert: bool = False
) -> Circuit:
    """Fill the heads and MLPs the program does not use with random weights of standard deviation
    ``scale`` (in place), so that dropping them is a choice a mask must make rather than free.
    Returns the circuit of planted (unused) components.

    By default the noise reads and writes the whole residual stream, so it disturbs the program
    (a mask must remove it to restore the output). ``inert=True`` (a model compiled with
    ``spare_dims``) writes only the spare dimensions, which nothing compiled reads: the output
    is exactly the program's, the noise is present but unused, as in a trained model's idle
    components, and its scale can match the compiled weights' without changing anything."""
    if inert and not model.spare_dims:
        raise ValueError(
            "plant_noise(inert=True) writes the noise into spare residual dimensions, but this "
            "model has none; compile it with compile_program(..., spare_dims=k) (k >= 1)."
        )
    d_tracr = model.bridge.cfg.d_model - model.spare_dims
    gen = torch.Generator().manual_seed(seed)
    bridge, cfg = model.bridge, model.bridge.cfg
    planted = []
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            block = bridge.original_model.layers[layer]
            block = getattr(block, "_original_component", block)
            attn = _inner(block.attn)
            for head in range(cfg.n_heads):
                if head_node(layer, head) in model.circuit.nodes:
                    continue
                rows = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
                for name in ("q", "k", "v"):
                    weight = _inner(getattr(attn, name)).weight
                    weight[rows] = scale * torch.randn(weight[rows].shape, generator=gen)
                out = _inner(attn.o).weight
                out[:, rows] = scale * torch.randn(out[:, rows].shape, generator=gen)
                if inert:
                    out[:d_tracr, rows] = 0.0
                planted.append(head_node(layer, head))
            if mlp_node(layer) not in model.circuit.nodes:
                mlp = _inner(block.mlp)
                for name in ("fc_in", "fc_out"):
                    weight = _inner(getattr(mlp, name)).weight
                    weight.copy_(scale * torch.randn(weight.shape, generator=gen))
                if inert:
                    _inner(mlp.fc_out).weight[:d_tracr] = 0.0
                planted.append(mlp_node(layer))
    return Circuit(frozenset(planted))


def _inner(module: Any) -> Any:
    return getattr(module, "_original_component", module)


__all__ = ["TracrModel", "compile_program", "demo_program", "from_assembled", "plant_noise"]
