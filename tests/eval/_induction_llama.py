"""A LlamaForCausalLM whose weights are set by hand to an induction circuit: a model known to copy.

Two layers, the textbook mechanism by which trained transformers retrieve a pass key:

- layer 0, head 0 / head 1: attend to the token 1 / 2 positions back (RoPE's fast frequency pairs
  give a score that peaks at exactly that offset) and write its identity into the residual;
- layer 1, head 0: the query (current token, previous token) matches the key (token j-1, token j-2)
  of every earlier position j (RoPE's slow pairs, where rotation is negligible, carry the content);
  the value is token j, which the LM head reads out. So after "... key is" the model emits the token
  that followed "key is" earlier, then the next one, and so on: the needle, copied by generation.

Token identities are random +-1 vectors of ``d`` dims (nearly orthogonal), so the residual is small.
It is a plain ``LlamaForCausalLM`` run by transformers' own forward and ``generate`` (KV cache, RoPE).
"""

from __future__ import annotations

import math

import torch


def induction_llama(vocab_size: int, d: int = 128, head_dim: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(seed)
    R = (torch.randint(0, 2, (vocab_size, d), generator=g) * 2 - 1).float()  # token codes, |R[x]|^2 = d
    TOK, CONST, PREV, PREV2, OUT = 0, d, d + 1, 2 * d + 1, 3 * d + 1  # residual slots
    H = 4 * d + 2  # (even: a multiple of the head count, as LlamaConfig requires)
    c = math.sqrt(d)  # the constant input of the positional heads
    theta = 1e10
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=H, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    model = LlamaForCausalLM(cfg).eval()
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    fast = [i for i in range(half) if inv_freq[i] >= 0.3]  # sharp positional peak (margin ~2.7 per unit)
    slow = [i for i in range(half) if inv_freq[i] * 4096 < 0.05]  # content: rotation below 0.05 rad
    assert 2 * len(slow) >= 2 * d, "head_dim too small for the content dims"
    slow_dims = slow + [i + half for i in slow]
    scale = math.sqrt(head_dim)  # undo sdpa's 1/sqrt(head_dim)

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.model.norm] + [l.input_layernorm for l in model.model.layers] + \
                [l.post_attention_layernorm for l in model.model.layers]:
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, TOK:TOK + d] = R
        emb[:, CONST] = c
        # RMSNorm divides by the residual's rms; with hard attention it is the same at every position
        n0 = math.sqrt((d + c * c) / H)
        n1 = math.sqrt((3 * d + c * c) / H)
        n2 = math.sqrt((4 * d + c * c) / H)

        a0 = model.model.layers[0].self_attn
        A_pos = 30.0 / 2.66 * scale  # ~30 nats between the wanted offset and its neighbours
        for h, shift in ((0, 1), (1, 2)):
            for i in fast:
                a0.q_proj.weight[h * head_dim + i, CONST] = A_pos / (c / n0)
                ang = float(inv_freq[i]) * shift  # key rotated ahead by `shift` positions
                a0.k_proj.weight[h * head_dim + i, CONST] = math.cos(ang) / (c / n0)
                a0.k_proj.weight[h * head_dim + i + half, CONST] = math.sin(ang) / (c / n0)
            for k in range(d):
                a0.v_proj.weight[h * head_dim + k, TOK + k] = n0
                a0.o_proj.weight[(PREV if h == 0 else PREV2) + k, h * head_dim + k] = 1.0

        a1 = model.model.layers[1].self_attn
        A_ind = 25.0 / d * scale  # a full 2-token match beats a 1-token match by ~25 nats
        S1, S2 = slow_dims[:d], slow_dims[d:2 * d]
        for k in range(d):
            a1.q_proj.weight[S1[k], TOK + k] = A_ind * n1
            a1.q_proj.weight[S2[k], PREV + k] = A_ind * n1
            a1.k_proj.weight[S1[k], PREV + k] = n1
            a1.k_proj.weight[S2[k], PREV2 + k] = n1
            a1.v_proj.weight[k, TOK + k] = n1
            a1.o_proj.weight[OUT + k, k] = 1.0
        model.lm_head.weight[:, OUT:OUT + d] = R * (0.5 * n2)
    return model
