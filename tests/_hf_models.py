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


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
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
    return transformers.LlamaForCausalLM(cfg).eval()


BUILDERS = {"gpt2": gpt2, "neox": neox, "llama": llama}
TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


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
