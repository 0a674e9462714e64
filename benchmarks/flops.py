"""The FLOP count every variant's MFU uses (stated in benchmarks/README.md).

Per real token of a sequence of length s, LoRA training of a frozen base with N matmul parameters:
  4*N        base linears: forward (2N) + gradient w.r.t. activations (2N); frozen weights get no
             weight gradient. N counts every linear weight incl. lm_head, not the embedding lookup.
  6*N_lora   the adapters: forward, activation and weight gradients.
  6*L*d*s    causal attention scores and values: forward 2*s*d per layer per token (QK^T and AV,
             halved for causality), backward twice that. Averaged over tokens: 6*L*d*E[s^2]/E[s].
Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

H100_BF16_DENSE = 989e12  # H100 SXM datasheet, dense bf16


def lora_params(hidden: int, inter: int, layers: int, r: int) -> int:
    attn = 4 * r * (hidden + hidden)  # q, k, v, o (Llama-2-7B has no GQA)
    mlp = 2 * r * (hidden + inter) + r * (inter + hidden)  # gate, up, down
    return layers * (attn + mlp)


def flops_per_token(n_matmul: int, n_lora: int, layers: int, hidden: int, mean_s2_over_s: float) -> float:
    return 4 * n_matmul + 6 * n_lora + 6 * layers * hidden * mean_s2_over_s


def llama2_7b(r: int = 16, lengths=None, max_len: int = 512) -> dict:
    L, d, f, V = 32, 4096, 11008, 32000
    n_matmul = L * (4 * d * d + 3 * d * f) + V * d  # 6.607e9
    n_lora = lora_params(d, f, L, r)
    s2 = 0.0
    if lengths:
        ls = [min(x, max_len) for x in lengths]
        s2 = sum(x * x for x in ls) / sum(ls)
    return {"n_matmul": n_matmul, "n_lora": n_lora, "E_s2_over_E_s": s2,
            "flops_per_token": flops_per_token(n_matmul, n_lora, L, d, s2)}


def mfu(tokens_per_s: float, flops_tok: float, peak: float = H100_BF16_DENSE) -> float:
    return tokens_per_s * flops_tok / peak
