"""Tiny Hugging Face models (random weights) and hand-built masked references, for tests."""

from __future__ import annotations

import torch
import transformers
from einops import rearrange

import subnet_interp as si

VOCAB, D, HEADS, LAYERS = 40, 32, 4, 2
D_HEAD = D // HEADS


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=D,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def neox():
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        hidden_size=D,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTNeoXForCausalLM(cfg).eval()


def llama(**config):
    """A tiny Llama; ``config`` adds to or overrides its config (e.g. ``attention_bias=True``)."""
    torch.manual_seed(0)
    sizes = dict(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        hidden_size=D,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**sizes, **config})).eval()


BUILDERS = {"gpt2": gpt2, "neox": neox, "llama": llama}
TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


# Encoders of subnet_interp.adapters.hf_encoders: BERT and RoBERTa (base model, masked-LM and
# sequence-classification heads) and ViT (base model and image classifier), dropout off.
ENCODER_D_MLP, LABELS = 64, 3
IMAGE, PATCH, CHANNELS = 16, 8, 3
ENCODER_SIZES = dict(
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    hidden_size=D,
    intermediate_size=ENCODER_D_MLP,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
TEXT_ENCODER_CLASSES = {
    "bert": ("BertConfig", "BertModel"),
    "bert_mlm": ("BertConfig", "BertForMaskedLM"),
    "bert_cls": ("BertConfig", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "roberta_mlm": ("RobertaConfig", "RobertaForMaskedLM"),
    "roberta_cls": ("RobertaConfig", "RobertaForSequenceClassification"),
}
ENCODER_KINDS = [*TEXT_ENCODER_CLASSES, "vit", "vit_cls"]
PIXELS = torch.randn(2, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))


def encoder(kind):
    """A tiny ``kind`` encoder (one of :data:`ENCODER_KINDS`); text encoders take tokens in
    ``[0, VOCAB)`` (use ``TOKENS % (VOCAB - 2) + 2`` to keep off the special ids), ViT takes
    :data:`PIXELS`-shaped images."""
    torch.manual_seed(0)
    if kind.startswith("vit"):
        cfg = transformers.ViTConfig(
            image_size=IMAGE,
            patch_size=PATCH,
            num_channels=CHANNELS,
            num_labels=LABELS,
            **ENCODER_SIZES,
        )
        cls = transformers.ViTForImageClassification if kind == "vit_cls" else transformers.ViTModel
        return cls(cfg).eval()
    config_name, model_name = TEXT_ENCODER_CLASSES[kind]
    cfg = getattr(transformers, config_name)(
        vocab_size=VOCAB, max_position_embeddings=16, num_labels=LABELS, **ENCODER_SIZES
    )
    return getattr(transformers, model_name)(cfg).eval()


def random_masks(model, include=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(t.shape, generator=gen) < 0.6
        for n, t in si.targets(model, include=include).items()
    }


def hand_zeroed(kind, model, masks):
    """Zero the real tensors' entries by index arithmetic written from each model's forward."""
    with torch.no_grad():
        for layer in range(LAYERS):
            m = {
                k.split(".", 2)[2]: v.float()
                for k, v in masks.items()
                if k.startswith(f"blocks.{layer}.")
            }
            if kind == "gpt2":
                block = model.transformer.h[layer]
                qkv = torch.cat(
                    [rearrange(m[f"attn.W_{x}"], "h d e -> d (h e)") for x in "QKV"], dim=1
                )
                block.attn.c_attn.weight.mul_(qkv)
                block.attn.c_proj.weight.mul_(rearrange(m["attn.W_O"], "h e d -> (h e) d"))
                block.mlp.c_fc.weight.mul_(m["mlp.W_in"])
                block.mlp.c_proj.weight.mul_(m["mlp.W_out"])
            elif kind == "neox":
                block = model.gpt_neox.layers[layer]
                qkv = torch.stack([m[f"attn.W_{x}"] for x in "QKV"])
                block.attention.query_key_value.weight.mul_(rearrange(qkv, "t h d e -> (h t e) d"))
                block.attention.dense.weight.mul_(rearrange(m["attn.W_O"], "h e d -> d (h e)"))
                block.mlp.dense_h_to_4h.weight.mul_(m["mlp.W_in"].T)
                block.mlp.dense_4h_to_h.weight.mul_(m["mlp.W_out"].T)
            else:
                attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
                for x, proj in zip("QKV", (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
                    proj.weight.mul_(rearrange(m[f"attn.W_{x}"], "h d e -> (h e) d"))
                attn.o_proj.weight.mul_(rearrange(m["attn.W_O"], "h e d -> d (h e)"))
                mlp.gate_proj.weight.mul_(m["mlp.W_gate"].T)
                mlp.up_proj.weight.mul_(m["mlp.W_in"].T)
                mlp.down_proj.weight.mul_(m["mlp.W_out"].T)


# Decoders of subnet_interp.adapters.hf_decoders and the Llama-named families (Qwen2, Mistral,
# Gemma, Gemma-2). Grouped-query attention with KV_HEADS key/value heads; Gemma's head_dim is
# not D // HEADS, as in the real models.
KV_HEADS, D_MLP, GEMMA_D_HEAD = 2, 48, 12
DECODER_CLASSES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": GEMMA_D_HEAD}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # small caps so that soft-capping bends the scores and logits of these random weights
        {
            "head_dim": GEMMA_D_HEAD,
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 0.5,
            "sliding_window": 4,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": D_MLP, "word_embed_proj_dim": D}),
}


def decoder(kind, **config):
    """A tiny ``kind`` causal LM whose biases and norm weights are random too (transformers
    initialises them to constants), so that masks that touched them would show; ``config``
    adds to or overrides its config."""
    torch.manual_seed(0)
    config_name, model_name, extra = DECODER_CLASSES[kind]
    sizes = dict(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        hidden_size=D,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if kind != "opt":
        sizes.update(num_key_value_heads=KV_HEADS, intermediate_size=D_MLP)
    cfg = getattr(transformers, config_name)(**{**sizes, **extra, **config})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name or "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def decoder_layer(kind, model, layer):
    """The ``layer``-th block of a :func:`decoder` model."""
    return (model.model.decoder.layers if kind == "opt" else model.model.layers)[layer]


def hand_zeroed_decoder(kind, model, masks):
    """Zero the real tensors' entries of a :func:`decoder` model, written from each model's
    forward: Phi-3's ``qkv_proj`` rows are ``[q; k; v]`` and ``gate_up_proj`` rows
    ``[gate; up]``; OPT reads positional-embedding row ``position + 2``."""
    with torch.no_grad():
        if "pos_embed.W_pos" in masks:
            model.model.decoder.embed_positions.weight[2:].mul_(masks["pos_embed.W_pos"])
        for layer in range(LAYERS):
            m = {
                k.split(".", 2)[2]: v.float()
                for k, v in masks.items()
                if k.startswith(f"blocks.{layer}.")
            }
            block = decoder_layer(kind, model, layer)
            rows = {x: rearrange(m[f"attn.W_{x}"], "h d e -> (h e) d") for x in "QKV"}
            o_rows = rearrange(m["attn.W_O"], "h e d -> d (h e)")
            if kind == "opt":
                attn = block.self_attn
                for x in "QKV":
                    getattr(attn, f"{x.lower()}_proj").weight.mul_(rows[x])
                attn.out_proj.weight.mul_(o_rows)
                block.fc1.weight.mul_(m["mlp.W_in"].T)
                block.fc2.weight.mul_(m["mlp.W_out"].T)
                continue
            attn, mlp = block.self_attn, block.mlp
            if kind == "phi3":
                attn.qkv_proj.weight.mul_(torch.cat([rows["Q"], rows["K"], rows["V"]]))
                mlp.gate_up_proj.weight.mul_(torch.cat([m["mlp.W_gate"].T, m["mlp.W_in"].T]))
            else:
                for x in "QKV":
                    getattr(attn, f"{x.lower()}_proj").weight.mul_(rows[x])
                mlp.gate_proj.weight.mul_(m["mlp.W_gate"].T)
                mlp.up_proj.weight.mul_(m["mlp.W_in"].T)
            attn.o_proj.weight.mul_(o_rows)
            mlp.down_proj.weight.mul_(m["mlp.W_out"].T)


# norms of the Llama-named families, canonical -> module of the block (Gemma-2 has four)
_LLAMA_NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_GEMMA2_NORMS = {
    "ln1": "input_layernorm",
    "ln1_post": "post_attention_layernorm",
    "ln2": "pre_feedforward_layernorm",
    "ln2_post": "post_feedforward_layernorm",
}


def hand_zeroed_biases(kind, model, masks):
    """Zero the bias and norm-weight entries of a GPT-2, GPT-NeoX, OPT or Llama-named model that
    the canonical ``masks`` remove, written from each model's forward: GPT-2's fused
    ``c_attn.bias`` is ``[q | k | v]``, each ``(head d_head)``; GPT-NeoX's ``query_key_value``
    output is split per head as ``[q | k | v]`` (``(head qkv d_head)``); every other bias and
    norm is its own vector. Every mask must be used (an unknown name fails)."""
    left = dict(masks)

    def take(name):
        mask = left.pop(name).float()
        return rearrange(mask, "h e -> (h e)") if mask.dim() == 2 else mask

    def scale(name, module, attribute="bias"):
        if name in left:
            getattr(module, attribute).mul_(take(name))

    def norm(name, module):
        scale(f"{name}.w", module, "weight")
        scale(f"{name}.b", module, "bias")

    with torch.no_grad():
        if kind == "gpt2":
            layers, final = model.transformer.h, model.transformer.ln_f
        elif kind == "neox":
            layers, final = model.gpt_neox.layers, model.gpt_neox.final_layer_norm
        elif kind == "opt":
            layers, final = model.model.decoder.layers, model.model.decoder.final_layer_norm
        else:
            layers, final = model.model.layers, model.model.norm
        for layer, block in enumerate(layers):
            p = f"blocks.{layer}."
            if kind == "gpt2":
                qkv = [take(f"{p}attn.b_{x}") for x in "QKV"]
                block.attn.c_attn.bias.mul_(torch.cat(qkv))
                attn_out, mlp_in, mlp_out = block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj
                norms = {"ln1": block.ln_1, "ln2": block.ln_2}
            elif kind == "neox":
                qkv = torch.stack([left.pop(f"{p}attn.b_{x}").float() for x in "QKV"])
                block.attention.query_key_value.bias.mul_(rearrange(qkv, "t h e -> (h t e)"))
                attn_out = block.attention.dense
                mlp_in, mlp_out = block.mlp.dense_h_to_4h, block.mlp.dense_4h_to_h
                norms = {"ln1": block.input_layernorm, "ln2": block.post_attention_layernorm}
            else:
                attn = block.self_attn
                for x in "QKV":
                    scale(f"{p}attn.b_{x}", getattr(attn, f"{x.lower()}_proj"))
                if kind == "opt":
                    attn_out, mlp_in, mlp_out = attn.out_proj, block.fc1, block.fc2
                    norms = {"ln1": block.self_attn_layer_norm, "ln2": block.final_layer_norm}
                else:
                    attn_out, mlp_in, mlp_out = attn.o_proj, block.mlp.up_proj, block.mlp.down_proj
                    scale(f"{p}mlp.b_gate", block.mlp.gate_proj)
                    names = _GEMMA2_NORMS if kind == "gemma2" else _LLAMA_NORMS
                    norms = {c: getattr(block, m) for c, m in names.items()}
            scale(f"{p}attn.b_O", attn_out)
            scale(f"{p}mlp.b_in", mlp_in)
            scale(f"{p}mlp.b_out", mlp_out)
            for canonical, module in norms.items():
                norm(f"{p}{canonical}", module)
        norm("ln_final", final)
    assert not left, f"masks the reference does not know: {sorted(left)}"
