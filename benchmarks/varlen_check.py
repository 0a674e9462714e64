"""train.attn_implementation=varlen (and varlen_fa4) on the GPU: are the FlashAttention varlen kernels as exact as
flex, and how much faster, on packed rows of Dolly-length documents? Attention alone, forward + backward, through
llmft's own attention function (llmft/varlen.py) with torch's kernels (`varlen`) and, where flash-attn-4 imports,
FlashAttention-4's (`fa4`), and through flex with the document-causal block mask that transformers builds.

    bash benchmarks/gpu.sh py benchmarks/varlen_check.py --out DIR

- exactness: output and q/k/v gradients of each, in bf16, against causal sdpa run per document in fp32; the largest
  absolute error over the row, at Llama-2-7B's heads (32 x 128) and at SmolLM2's (9 query heads over 3 key/value
  heads, 64 wide: the grouped-heads path that the real-weights loss check runs).
- speed: ms per layer call at 7B's heads for rows of 8,192, 12,288 and 16,384 tokens; x 32 layers for a step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from attn_micro import cli, doc_lengths, time_it
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from llmft import varlen
from llmft.errors import LlmftError

flex = torch.compile(flex_attention)


def packed(docs, heads, kv_heads, dim):
    t = sum(docs)
    q, k, v = (torch.randn(1, h, t, dim, device="cuda") for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def by_kernel(name):
    """llmft's varlen attention with one registered kernel: `varlen` (torch's) or `varlen_fa4` (FlashAttention-4's)."""
    def attend(q, k, v, cu, docs):
        return varlen.attention(None, q, k, v, None, scaling=q.shape[-1] ** -0.5, cu_seq_lens_q=cu,
                                max_length_q=max(docs), impl=name)[0][0]  # [T, H, D]
    return attend


METHODS = {}  # name -> attention function, filled by main()
MASKS = {}  # transformers builds the block mask once a step, not once a layer: built once here too


def by_flex(q, k, v, cu, docs):
    key = tuple(docs)
    if key not in MASKS:
        doc_id = torch.repeat_interleave(torch.arange(len(docs), device="cuda"), torch.tensor(docs, device="cuda"))
        MASKS[key] = create_block_mask(lambda b, h, qi, ki: (doc_id[qi] == doc_id[ki]) & (qi >= ki), 1, None,
                                       q.shape[2], q.shape[2], device="cuda")
    return flex(q, k, v, block_mask=MASKS[key], enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1)


def by_sdpa_per_doc(q, k, v, cu, docs):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                   enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1))
    return torch.cat(outs)


def out_and_grads(fn, q, k, v, cu, docs, dtype, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, docs)
    out.backward(grad_out.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def exactness(lengths, heads, kv_heads, dim, tokens=8192):
    docs = doc_lengths(lengths, tokens, 2048, seed=1)
    q, k, v, cu = packed(docs, heads, kv_heads, dim)
    g = torch.randn(sum(docs), heads, dim, device="cuda")
    ref = out_and_grads(by_sdpa_per_doc, q, k, v, cu, docs, torch.float32, g)
    row = {"heads": heads, "kv_heads": kv_heads, "dim": dim, "tokens": sum(docs), "documents": len(docs)}
    for name, fn in METHODS.items():
        got = out_and_grads(fn, q, k, v, cu, docs, torch.bfloat16, g)
        row[name] = {part: float((a - b).abs().max()) for part, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    return row


def speed(lengths, tokens):
    docs = doc_lengths(lengths, tokens, 2048)
    q, k, v, cu = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in packed(docs, 32, 32, 128))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    row = {"tokens": tokens, "documents": len(docs)}
    for name, fn in METHODS.items():
        def run():
            fn(q, k, v, cu, docs).sum().backward()
        row[f"{name}_ms_per_layer"] = time_it(run)
        row[f"{name}_ms_per_step_32_layers"] = 32 * row[f"{name}_ms_per_layer"]
    return row


def main():
    args, lengths = cli()
    varlen.register("varlen")
    try:
        varlen.register("varlen_fa4")
    except LlmftError as e:  # measured where it runs, reported where it does not
        print(f"varlen_check: no FlashAttention-4 here ({e})", flush=True)
    # named as in the committed results: varlen (torch's kernels), fa4
    METHODS.update({{"varlen_fa4": "fa4"}.get(name, name): by_kernel(name) for name in varlen.KERNELS})
    METHODS["flex"] = by_flex
    torch.manual_seed(0)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "exactness": [exactness(lengths, 32, 32, 128), exactness(lengths, 9, 3, 64)],
              "speed": [speed(lengths, t) for t in (8192, 12288, 16384)]}
    for part in ("exactness", "speed"):
        for r in result[part]:
            print("RESULT", part, json.dumps(r), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "varlen_check.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
