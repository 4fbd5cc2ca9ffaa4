"""NeuroSurgeon 0.1.0's continuous-sparsification masks on a Hugging Face GPT-2, configured the
one way the benchmarks compare against: every block matrix (the layers
``continuous_sparsification_lepori`` masks by default), weight-level masks starting at 0, no
bias masks, frozen base, L0 penalty. Not a benchmark itself (``_``-prefixed helpers are not run
with ``--quick``)."""

from __future__ import annotations


def circuit_model(model, l0_lambda: float = 1e-8):
    """``model`` (an HF GPT-2, used as given: pass a copy to keep it) wrapped by NeuroSurgeon's
    ``CircuitModel``."""
    from NeuroSurgeon.Models import circuit_model as ns_circuit_model
    from NeuroSurgeon.Models import model_configs

    layers = [
        f"transformer.h.{i}.{m}"
        for i in range(model.config.n_layer)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    config = model_configs.CircuitConfig(
        mask_method="continuous_sparsification",
        mask_hparams={
            "ablation": "none",
            "mask_unit": "weight",
            "mask_bias": False,
            "mask_init_value": 0.0,
        },
        target_layers=layers,
        freeze_base=True,
        add_l0=True,
        l0_lambda=l0_lambda,
    )
    return ns_circuit_model.CircuitModel(config, model)


def trainer(wrapped):
    """One training step of ``wrapped`` (a :func:`circuit_model`), as a function of a batch of
    token ids: the next-token loss every benchmark configuration uses, plus the L0 term its
    forward adds, then Adam at NeuroSurgeon's mask learning rate."""
    import torch
    from mask_training_cost import next_token_loss  # the benchmarks' folder is on the path

    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)

    def step(batch) -> None:
        loss = next_token_loss(wrapped(input_ids=batch).logits, batch)
        loss = loss + wrapped.config.l0_lambda * wrapped._compute_l0_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
