"""Where a steady LoRA step goes: torch.profiler over the train stage itself, kernel by kernel.

    python benchmarks/profile_step.py --out DIR --no-step-wait              # the 7B config on a CUDA GPU
    python benchmarks/profile_step.py --out DIR train.attn_implementation=varlen   # key=value: override the config
    python benchmarks/profile_step.py --analyze TRACE.json[.gz] --out DIR    # re-classify a saved trace

It runs llmft's own stage, `llmft.train.train(cfg, callbacks=[...])`, on --params (configs/llama2-7b-lora.yaml) with
what `bench.py` adds to it (random weights of --model, the Dolly rows of --data, outputs in DIR/run). One extra
callback:
  - skips the stage's step-0 validation and the epoch-end one (eval-mode compiles, outside any training step);
  - times every step from one `on_step_end` to the next (it synchronises CUDA there, so each window holds exactly
    one step's GPU work, data loading and logging included; that per-step wait is what train.overlap_steps removes,
    so its idle time is an upper bound there: --no-step-wait profiles the steps as the stage runs them);
  - after --warmup steps (compile, recompiles for dynamic shapes) starts torch.profiler (CPU + CUDA activities,
    record_shapes) with one profiler warm-up step, records --active steps, then stops training.
--smoke: the CPU check with a tiny --model (bench.py's CPU stand-ins; no GPU kernels to classify).

The trace is then classified kernel by kernel. Every GPU kernel is tied to the CPU call that launched it
(CUPTI correlation id -> the runtime/driver launch event -> the innermost CPU op or user range enclosing that
launch on its thread, and that op's ancestors):
  base_matmul / lm_head_matmul / lora_matmul: kernels launched under a GEMM op (aten::mm, addmm, bmm, ...),
      split by that op's recorded input shapes: any of M, K, N <= 64 is a LoRA GEMM (rank 16), a dimension equal
      to the vocabulary (32000) is the LM head, anything else a frozen base projection (attn: 4096x4096; mlp: an
      11008 dimension). FLOPs per GEMM = 2*M*K*N from the same shapes (achieved TFLOP/s per class).
  gemm_unknown_shape: a GEMM op or a GEMM-named kernel (gemm|nvjet|xmma|cutlass|gemv) without usable shapes.
  attention: kernel names with flex_attention / flash / fmha / attention, and inductor templates (triton_tem_)
      that are not matmul templates.
  optimizer: kernels launched under Optimizer.step / Optimizer.zero_grad, under the Trainer's gradient clipping
      (wrapped here in a `profile::clip_grad_norm` range), or by an aten::_foreach_* / fused Adam op.
  norm_act_rope_loss: Liger's kernels (rms_norm, swiglu, rope, cross entropy, element_mul), inductor's fused
      pointwise/reduction kernels (triton_poi/red/per_), and aten's elementwise/reduction kernels. Sub-classes
      are kept apart in the JSON.
  memcpy_memset_comm: CUPTI memcpy/memset records, NCCL kernels.
  other: everything else, the "unclassified" remainder (its top kernels are listed).
Phase (forward / backward / optimizer) comes from the launching thread and ancestors: backward runs on the
autograd engine's thread (or under a *Backward op).
GPU idle = step wall - union of all GPU activity intervals in the step window; split into before the first
kernel, after the last, and gaps between kernels by size.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (what a benchmark run adds to a config)
METHOD = " ".join(__doc__.split("The trace is then classified")[1].split())
VOCAB = 32000
LORA_MAX_DIM = 64
GEMM_OP = re.compile(r"^aten::(mm|addmm_?|bmm|baddbmm_?|addbmm|_scaled_mm|matmul|linear)$")
GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|gemv|s16816|wgmma|splitK", re.I)
ATTN_KERNEL = re.compile(r"flex_attention|flash|fmha|attention|attn", re.I)
LIGER_KERNEL = re.compile(r"rms_norm|rmsnorm|swiglu|silu_mul|rope|rotary|cross_entropy|element_mul|layer_norm|liger",
                          re.I)
INDUCTOR_KERNEL = re.compile(r"^triton_(poi|red|per)_")
ATEN_EW_KERNEL = re.compile(r"elementwise|reduce_kernel|Reduce|unrolled|vectorized|fill|copy_kernel|CatArray|"
                            r"index_elementwise|distribution", re.I)
OPT_RANGE = re.compile(r"^(Optimizer\.(step|zero_grad)|profile::clip_grad_norm)")
OPT_OP = re.compile(r"^aten::(_foreach_|_fused_adam)")
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATS = {"cpu_op", "user_annotation"}
TABLE = [("base_matmul", "frozen base projections (q/k/v/o, gate/up/down)"),
         ("lm_head_matmul", "LM head GEMMs (frozen; inside the fused loss)"),
         ("lora_matmul", "LoRA GEMMs (one of M/K/N = r = 16)"),
         ("gemm_unknown_shape", "GEMMs without usable shapes"),
         ("attention", "attention (flex or FlashAttention, fwd + bwd)"),
         ("norm_act_rope_loss", "norms / activations / rotary / loss / other elementwise"),
         ("optimizer", "optimizer step (AdamW, grad-norm clip, zero_grad)"),
         ("memcpy_memset_comm", "memcpy / memset / communication"),
         ("other", "other (unclassified)")]


def _gemm_named(name: str) -> bool:
    """A GEMM by its kernel's name; FlashAttention's kernels are templated on cutlass types, and are attention."""
    return bool(GEMM_KERNEL.search(name)) and not name.startswith("triton_") and not ATTN_KERNEL.search(name)


# --------------------------------------------------------------------------------------------- trace analysis
def _gemm_mkn(op: str, dims):
    """(M, K, N, batch) from a GEMM op's recorded input dims, or None."""
    if not dims:
        return None
    base = op.split("::")[-1]
    try:
        if base in ("mm", "_scaled_mm", "matmul"):
            a, b = dims[0], dims[1]
        elif base in ("addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm"):
            a, b = dims[1], dims[2]
        elif base == "bmm":
            a, b = dims[0], dims[1]
        elif base == "linear":  # input [..., K], weight [N, K]
            a, w = dims[0], dims[1]
            m = 1
            for x in a[:-1]:
                m *= x
            return m, a[-1], w[0], 1
        else:
            return None
        if len(a) < 2 or len(b) < 2:
            return None
        batch = 1
        for x in a[:-2]:
            batch *= x
        return a[-2], a[-1], b[-1], batch
    except (IndexError, TypeError):
        return None


def classify_gemm(mkn) -> str:
    m, k, n, _ = mkn
    if min(m, k, n) <= LORA_MAX_DIM:
        return "lora_matmul"
    if VOCAB in (m, k, n):
        return "lm_head_matmul"
    return "base_matmul"


def base_kind(mkn) -> str:
    return "mlp" if 11008 in mkn[:3] else "attn_proj"


class Threads:
    """CPU ops and user ranges per thread, with parent links, to find what enclosed a launch."""

    def __init__(self, events):
        by_tid = collections.defaultdict(list)
        for e in events:
            by_tid[(e["pid"], e["tid"])].append(e)
        self.tracks = {}
        for key, evs in by_tid.items():
            evs.sort(key=lambda e: (e["ts"], -e["dur"]))
            parent, stack = [], []
            for e in evs:
                end = e["ts"] + e["dur"]
                while stack and evs[stack[-1]]["ts"] + evs[stack[-1]]["dur"] < end:
                    stack.pop()  # a child starts no earlier and ends no later than its parent
                parent.append(stack[-1] if stack else -1)
                stack.append(len(parent) - 1)
            self.tracks[key] = (evs, [e["ts"] for e in evs], parent)

    def stack_at(self, key, t):
        """The events enclosing time t on that thread, innermost first. The last event that starts by t is the
        innermost one if it is still open; otherwise whatever encloses t also encloses it, so is an ancestor."""
        if key not in self.tracks:
            return []
        evs, starts, parent = self.tracks[key]
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0 and evs[i]["ts"] + evs[i]["dur"] < t:
            i = parent[i]
        out = []
        while i >= 0:
            out.append(evs[i])
            i = parent[i]
        return out


def _union(intervals):
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def analyze(trace: dict, tokens_per_step=None, flops_per_token=None, peak=989e12, measured_peak=790e12,
            skip=()) -> dict:
    """The breakdown of a chrome trace. `skip`: ProfilerStep#N names left out (a step with a one-off stall);
    `tokens_per_step`: real tokens of each kept step, in order."""
    evs = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "ts" in e]
    for e in evs:
        e["ts"] = float(e["ts"])
        e["dur"] = float(e.get("dur", 0) or 0)
    gpu = [e for e in evs if e.get("cat") in GPU_CATS]
    cpu = [e for e in evs if e.get("cat") in CPU_CATS]
    launches = {}
    for e in evs:
        if e.get("cat") not in GPU_CATS and e.get("cat") not in CPU_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = e
    all_steps = sorted((e for e in cpu if e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
    steps = [e for e in all_steps if e["name"] not in set(skip)]
    if not steps:
        raise SystemExit("no ProfilerStep# ranges in the trace")
    main_key = (all_steps[0]["pid"], all_steps[0]["tid"])
    threads = Threads(cpu)

    per_class = collections.defaultdict(float)  # us, over all steps
    sub = collections.defaultdict(float)
    phase_class = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: {"us": 0.0, "calls": 0, "class": None})
    gemm_flops = collections.defaultdict(float)
    gemm_ops_seen = set()
    base_split = collections.defaultdict(float)
    lora_shapes = collections.defaultdict(lambda: {"us": 0.0, "calls": 0})
    linked = unlinked = 0
    step_rows = []
    windows = [(s["ts"], s["ts"] + s["dur"], s["name"]) for s in steps]
    starts = [w[0] for w in windows]

    def window_of(t):
        i = bisect.bisect_right(starts, t) - 1
        return i if i >= 0 and t < windows[i][1] else None

    in_window = [g for g in gpu if window_of(g["ts"]) is not None]
    lora_bytes = 0.0

    for g in in_window:
        args = g.get("args") or {}
        name = g["name"]
        cat = g["cat"]
        dur = g["dur"]
        stack = []
        launch = launches.get(args.get("correlation"))
        if launch is not None:
            stack = threads.stack_at((launch["pid"], launch["tid"]), launch["ts"])
            linked += 1
        else:
            unlinked += 1
        names = [s["name"] for s in stack]
        on_main = launch is not None and (launch["pid"], launch["tid"]) == main_key
        if any(OPT_RANGE.match(n) for n in names):
            phase = "optimizer"
        elif any("Backward" in n or n.startswith("autograd::engine") for n in names) or (launch is not None and not on_main):
            phase = "backward"
        else:
            phase = "forward"
        cpu_ops = [s for s in stack if s.get("cat") == "cpu_op"]
        gemm_op = None  # the launching op is a GEMM, or a GEMM-named kernel (a split-K reduction...) under one
        if cpu_ops and GEMM_OP.match(cpu_ops[0]["name"]):
            gemm_op = cpu_ops[0]
        elif _gemm_named(name):
            gemm_op = next((s for s in cpu_ops if GEMM_OP.match(s["name"])), None)
        subclass = None
        if cat in ("gpu_memcpy", "gpu_memset") or "nccl" in name.lower():
            cls = "memcpy_memset_comm"
        elif phase == "optimizer" or any(OPT_OP.match(n) for n in names):
            cls = "optimizer"
        elif gemm_op is not None:
            mkn = _gemm_mkn(gemm_op["name"], (gemm_op.get("args") or {}).get("Input Dims"))
            if mkn is None:
                cls = "gemm_unknown_shape"
            else:
                cls = classify_gemm(mkn)
                key = id(gemm_op)
                if key not in gemm_ops_seen:  # FLOPs once per op, however many kernels it launched
                    gemm_ops_seen.add(key)
                    gemm_flops[cls] += 2.0 * mkn[0] * mkn[1] * mkn[2] * mkn[3]
                if cls == "base_matmul":
                    base_split[base_kind(mkn)] += dur
                if cls == "lora_matmul":
                    dims3 = sorted(mkn[:3])  # the operand that is not rank-thin: the two large dims
                    lora_bytes += 2.0 * dims3[1] * dims3[2] * mkn[3]
                    t_ = lambda x: str(x) if x in (16, 4096, 11008, VOCAB) else "T"  # noqa: E731 (T: the tokens)
                    shp = f"{gemm_op['name']} M={t_(mkn[0])} K={t_(mkn[1])} N={t_(mkn[2])}"
                    lora_shapes[shp]["us"] += dur
                    lora_shapes[shp]["calls"] += 1
        elif _gemm_named(name):
            cls = "gemm_unknown_shape"
        elif ATTN_KERNEL.search(name) or (name.startswith("triton_tem_") and "mm" not in name):
            cls = "attention"
        elif LIGER_KERNEL.search(name):
            cls, subclass = "norm_act_rope_loss", "liger"
        elif INDUCTOR_KERNEL.match(name):
            cls, subclass = "norm_act_rope_loss", "inductor_fused"
        elif ATEN_EW_KERNEL.search(name):
            cls, subclass = "norm_act_rope_loss", "aten_elementwise_reduce"
        else:
            cls = "other"
        g["_phase"], g["_cls"] = phase, cls
        g["_compiled"] = any(n.startswith("Torch-Compiled Region") for n in names)
        per_class[cls] += dur
        if subclass:
            sub[subclass] += dur
        phase_class[f"{phase}/{cls}"] += dur
        k = kernels[(name, cls)]
        k["us"] += dur
        k["calls"] += 1
        k["class"] = cls

    n = len(windows)
    cpu_main = threads.tracks.get(main_key)
    for i, (ws, we, sname) in enumerate(windows):
        evw = sorted(((max(g["ts"], ws), min(g["ts"] + g["dur"], we), g["name"]) for g in in_window
                      if g["ts"] + g["dur"] > ws and g["ts"] < we))
        ivs = [(s, e) for s, e, _ in evw]
        busy = _union(ivs)
        kern_sum = sum(e - s for s, e in ivs)
        lead = (ivs[0][0] - ws) if ivs else we - ws
        trail = (we - max(e for _, e in ivs)) if ivs else 0.0
        gaps, big = [], []
        cur_end, prev_name = (ivs[0][1], evw[0][2]) if ivs else (ws, None)
        for s, e, nm in evw[1:]:
            if s > cur_end:
                gaps.append(s - cur_end)
                if s - cur_end >= 200 and cpu_main:
                    at = [x["name"] for x in threads.stack_at(main_key, cur_end + 1)][:4]
                    big.append({"at_ms": round((cur_end - ws) / 1e3, 2), "gap_ms": round((s - cur_end) / 1e3, 3),
                                "after": prev_name[:80], "before": nm[:80], "main_thread_cpu_stack": at})
            if e >= cur_end:
                cur_end, prev_name = e, nm
        hist = {"lt_10us": 0.0, "10_100us": 0.0, "100us_1ms": 0.0, "ge_1ms": 0.0}
        for gp in gaps:
            hist["lt_10us" if gp < 10 else "10_100us" if gp < 100 else "100us_1ms" if gp < 1000 else "ge_1ms"] += gp
        # Idle by region: step start (data, H2D, dynamo guards) up to the first compiled-region kernel; forward +
        # backward up to the first optimizer-phase kernel (clip, AdamW); from there to the step's end.
        mine = [g for g in in_window if ws <= g["ts"] < we]
        f0 = min((g["ts"] for g in mine if g["_compiled"]), default=ws)
        o0 = min((g["ts"] for g in mine if g["_phase"] == "optimizer" and g["ts"] >= f0), default=we)
        region_idle = {}
        for rname, (rs, re_) in {"step_start": (ws, f0), "forward_backward": (f0, o0), "clip_optimizer_end": (o0, we)}.items():
            b = _union([(max(s_, rs), min(e_, re_)) for s_, e_ in ivs if e_ > rs and s_ < re_])
            region_idle[rname] = {"wall_ms": (re_ - rs) / 1e3, "idle_ms": (re_ - rs - b) / 1e3}
        step_rows.append({"step": sname, "idle_by_region": region_idle, "wall_ms": (we - ws) / 1e3, "gpu_busy_ms": busy / 1e3,
                          "kernel_sum_ms": kern_sum / 1e3, "idle_ms": (we - ws - busy) / 1e3,
                          "idle_before_first_kernel_ms": lead / 1e3, "idle_after_last_kernel_ms": trail / 1e3,
                          "gaps_between_kernels_ms": {k2: v / 1e3 for k2, v in hist.items()},
                          "n_gaps": len(gaps), "gpu_activities": len(ivs),
                          "gaps_ge_200us": sorted(big, key=lambda g: -g["gap_ms"])[:8]})

    wall_us = sum(we - ws for ws, we, _ in windows)
    step_ms = wall_us / n / 1e3
    idle_ms = sum(r["idle_ms"] for r in step_rows) / n
    rows = {}
    for cls, _ in TABLE:
        ms = per_class.get(cls, 0.0) / n / 1e3
        rows[cls] = {"ms_per_step": ms, "pct_of_step": 100 * ms / step_ms}
    rows["gpu_idle"] = {"ms_per_step": idle_ms, "pct_of_step": 100 * idle_ms / step_ms}
    kern_total = sum(per_class.values()) / n / 1e3
    tflops = {}
    for cls, fl in gemm_flops.items():
        t = per_class.get(cls, 0.0) / 1e6
        tflops[cls] = {"tflop_per_step": fl / n / 1e12, "achieved_tflop_s": fl / t / 1e12 if t else None}
    out = {
        "profiled_steps": n, "step_wall_ms": step_ms, "steps": step_rows,
        "breakdown": rows,
        "kernel_time_sum_ms_per_step": kern_total,
        "overlap_ms_per_step": kern_total - (step_ms - idle_ms),
        "norm_act_rope_loss_subclasses_ms_per_step": {k: v / n / 1e3 for k, v in sub.items()},
        "base_matmul_split_ms_per_step": {k: v / n / 1e3 for k, v in base_split.items()},
        "phase_class_ms_per_step": {k: v / n / 1e3 for k, v in sorted(phase_class.items())},
        "gemm_flops_from_shapes": tflops,
        "lora_large_operand_bytes_per_step": lora_bytes / n,
        "lora_implied_tb_s": lora_bytes / per_class["lora_matmul"] / 1e6 if per_class.get("lora_matmul") else None,
        "idle_by_region_ms_per_step": {r: sum(s_["idle_by_region"][r]["idle_ms"] for s_ in step_rows) / n
                                       for r in ("step_start", "forward_backward", "clip_optimizer_end")},
        "region_wall_ms_per_step": {r: sum(s_["idle_by_region"][r]["wall_ms"] for s_ in step_rows) / n
                                    for r in ("step_start", "forward_backward", "clip_optimizer_end")},
        "skipped_steps": list(skip),
        "lora_gemm_roles": sorted(({"shape": k, "ms_per_step": v["us"] / n / 1e3, "calls_per_step": v["calls"] / n}
                                        for k, v in lora_shapes.items()), key=lambda r: -r["ms_per_step"]),
        "kernels_per_step": sum(k["calls"] for k in kernels.values()) / n,
        "launch_links": {"linked": linked, "unlinked": unlinked},
        "unclassified_ms_per_step": rows["other"]["ms_per_step"] + rows["gemm_unknown_shape"]["ms_per_step"],
        "top_kernels": [{"name": name[:160], "class": v["class"], "ms_per_step": v["us"] / n / 1e3,
                         "calls_per_step": v["calls"] / n, "mean_us": v["us"] / v["calls"],
                         "pct_of_step": 100 * v["us"] / n / 1e3 / step_ms}
                        for (name, _), v in sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:40]],
        "top_other_kernels": [{"name": name[:160], "ms_per_step": v["us"] / n / 1e3, "calls_per_step": v["calls"] / n}
                              for (name, cls), v in sorted(kernels.items(), key=lambda kv: -kv[1]["us"])
                              if cls in ("other", "gemm_unknown_shape")][:15],
    }
    if tokens_per_step:
        tok = sum(tokens_per_step) / len(tokens_per_step)
        out["tokens_per_step"] = tok
        out["tokens_per_s"] = tok / (step_ms / 1e3)
        if flops_per_token:
            out["mfu_vs_989"] = out["tokens_per_s"] * flops_per_token / peak
            out["mfu_vs_measured_790"] = out["tokens_per_s"] * flops_per_token / measured_peak
            out["model_tflop_per_step"] = tok * flops_per_token / 1e12
    return out


def markdown(res: dict) -> str:
    a = res["analysis"]
    lines = [f"# One steady step of the train stage ({res.get('gpu', '?')})", ""]
    if "tokens_per_s" in a:
        lines.append(f"{a['profiled_steps']} profiled steps, {a['step_wall_ms']:.1f} ms per step, "
                     f"{a['tokens_per_step']:,.0f} real tokens per step, {a['tokens_per_s']:,.0f} tok/s, "
                     f"MFU {100 * a.get('mfu_vs_989', 0):.1f}% of 989 TFLOP/s "
                     f"({100 * a.get('mfu_vs_measured_790', 0):.1f}% of the measured 790).")
    if res.get("no_step_wait"):
        lines.append("Profiled without a wait between steps (--no-step-wait), as the stage runs them: the CPU queues "
                     "ahead of the GPU, so each per-step row is a CPU window; the totals per step are what hold.")
    un = res.get("unprofiled_steady")
    if un:
        lines.append(f"Unprofiled steady steps {un['steps']}: {un['step_ms']:.1f} ms per step, {un['tokens_per_s']:,.0f} tok/s.")
    lines += ["", "| where | ms / step | % of step |", "|---|---:|---:|"]
    for cls, label in TABLE + [("gpu_idle", "GPU idle within the step (wall - union of GPU activity)")]:
        r = a["breakdown"][cls]
        lines.append(f"| {label} | {r['ms_per_step']:.1f} | {r['pct_of_step']:.1f}% |")
    lines.append(f"| **step wall** | **{a['step_wall_ms']:.1f}** | 100% |")
    lines.append("")
    lines.append(f"Kernel time summed: {a['kernel_time_sum_ms_per_step']:.1f} ms/step (overlap between streams "
                 f"{a['overlap_ms_per_step']:.1f} ms); unclassified (other + GEMMs without shapes): "
                 f"{a['unclassified_ms_per_step']:.1f} ms/step; {a['kernels_per_step']:,.0f} GPU activities per step.")
    if "idle_by_region_ms_per_step" in a:
        w = a["region_wall_ms_per_step"]
        lines.append("GPU idle by region (ms/step, idle of region wall): " + ", ".join(
            f"{k} {v:.1f} of {w[k]:.1f}" for k, v in a["idle_by_region_ms_per_step"].items()))
    if a.get("lora_implied_tb_s"):
        lines.append(f"LoRA GEMMs move {a['lora_large_operand_bytes_per_step'] / 1e9:.1f} GB/step of their large "
                     f"operand: {a['lora_implied_tb_s']:.2f} TB/s.")
    if a.get("skipped_steps"):
        lines.append(f"Left out: {', '.join(a['skipped_steps'])}.")
    lines.append("")
    lines.append("Sub-classes (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in
                 {**a["norm_act_rope_loss_subclasses_ms_per_step"], **{f"base_{k}": v for k, v in
                  a["base_matmul_split_ms_per_step"].items()}}.items()))
    lines.append("")
    lines.append("GEMM FLOPs from recorded shapes: " + "; ".join(
        f"{k} {v['tflop_per_step']:.1f} TFLOP/step at {v['achieved_tflop_s'] or 0:.0f} TFLOP/s"
        for k, v in a["gemm_flops_from_shapes"].items()))
    lines += ["", "| top kernels | class | ms / step | calls / step | mean µs | % of step |", "|---|---|---:|---:|---:|---:|"]
    for k in a["top_kernels"][:30]:
        nm = k["name"].replace("|", "\\|")[:100]
        lines.append(f"| `{nm}` | {k['class']} | {k['ms_per_step']:.2f} | {k['calls_per_step']:.0f} | "
                     f"{k['mean_us']:.1f} | {k['pct_of_step']:.1f}% |")
    lines += ["", "| step | wall ms | GPU busy ms | idle ms | idle before 1st kernel | after last | gaps <10µs | "
              "10-100µs | 0.1-1 ms | ≥1 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in a["steps"]:
        g = s["gaps_between_kernels_ms"]
        lines.append(f"| {s['step']} | {s['wall_ms']:.1f} | {s['gpu_busy_ms']:.1f} | {s['idle_ms']:.1f} | "
                     f"{s['idle_before_first_kernel_ms']:.1f} | {s['idle_after_last_kernel_ms']:.1f} | "
                     f"{g['lt_10us']:.1f} | {g['10_100us']:.1f} | {g['100us_1ms']:.1f} | {g['ge_1ms']:.1f} |")
    big = sorted((dict(g, step=s["step"]) for s in a["steps"] for g in s.get("gaps_ge_200us", [])),
                 key=lambda g: -g["gap_ms"])[:6]
    if big:
        lines += ["", "Largest GPU gaps between kernels (≥ 200 µs):"]
        lines += [f"- {g['step']} at {g['at_ms']:.1f} ms: {g['gap_ms']:.2f} ms after `{g['after'][:60]}`, before "
                  f"`{g['before'][:60]}`; main-thread CPU stack {g['main_thread_cpu_stack']}" for g in big]
    if a["top_other_kernels"]:
        lines += ["", "Top unclassified kernels (ms/step): " + "; ".join(
            f"`{k['name'][:70]}` {k['ms_per_step']:.2f}" for k in a["top_other_kernels"][:8])]
    lines += ["", "Phase × class (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in a["phase_class_ms_per_step"].items()
                                                          if v >= 0.05)]
    lines += ["", "Classification: " + res.get("method", ""), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the GPU run
def run(args, overrides):
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile, record_function, schedule
    from transformers import TrainerCallback

    import flops
    from common import environment
    from llmft.config import load_config
    from llmft.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.params, overrides)
    lengths = json.loads((args.data / "lengths.json").read_text())
    # flops.py counts Llama-2-7B's shapes: no FLOP count (nor MFU) for another model, such as the smoke test's
    fl = flops.llama2_7b(cfg.train.lora.r, lengths, cfg.train.max_length) if not args.smoke else {"flops_per_token": None}
    t_start = time.time()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    # The Trainer's gradient clipping, marked so its kernels count as optimizer work.
    clip = transformers.Trainer._clip_grad_norm

    def marked_clip(self, model):
        with record_function("profile::clip_grad_norm"):
            return clip(self, model)

    transformers.Trainer._clip_grad_norm = marked_clip

    class Profile(TrainerCallback):
        def __init__(self):
            self.last_end = None
            self.tokens_last = 0
            self.walls, self.tokens = [], []
            self.prof = None
            self.done = False
            self.result = None
            self.trainer = None

        def on_train_begin(self, a, state, control, **kw):
            a.eval_on_start = False  # the stage's step-0 validation: an eval-mode compile, no training step
            sync()
            self.last_end, self.tokens_last = time.perf_counter(), state.num_input_tokens_seen

        def on_epoch_end(self, a, state, control, **kw):
            control.should_evaluate = False  # LossCurve asks for it; not needed here

        def on_step_end(self, a, state, control, **kw):
            step = state.global_step
            # one step per window; with --no-step-wait only around the profiled steps, which then run as the stage
            # runs them (the CPU ahead of the GPU): their per-step rows are CPU windows, their totals hold
            if not args.no_step_wait or step <= args.warmup + 1 or step >= args.warmup + 1 + args.active:
                sync()
                if hasattr(self.trainer, "flush_tokens"):  # a host read: only where the loop waits anyway
                    self.trainer.flush_tokens()
            now = time.perf_counter()
            self.walls.append(now - self.last_end)
            self.tokens.append(state.num_input_tokens_seen - self.tokens_last)
            self.last_end, self.tokens_last = now, state.num_input_tokens_seen
            print(f"profile_step: step {step} {self.walls[-1] * 1e3:.1f} ms {self.tokens[-1]} tokens "
                  f"(t={time.time() - t_start:.0f}s)", flush=True)
            if self.done:
                control.should_training_stop = True
                return
            if step == args.warmup:
                self.prof = profile(activities=activities, record_shapes=True,
                                    schedule=schedule(wait=0, warmup=1, active=args.active, repeat=1),
                                    on_trace_ready=self.ready)
                self.prof.start()
                self.prof_first = step + 2  # step + 1 is the profiler's own warm-up step
            elif self.prof is not None:
                self.prof.step()
                if self.done:
                    self.prof.stop()
                    control.should_training_stop = True

        def ready(self, prof):
            self.done = True
            try:
                self._ready(prof)
            except Exception:  # noqa: BLE001 - keep the trace for --analyze; never lose the run to the analysis
                import traceback

                traceback.print_exc()
                (out / "profile_error.txt").write_text(traceback.format_exc())
                trace = out / "trace.json"
                if trace.exists() and not (out / "trace.json.gz").exists():
                    with open(trace, "rb") as f, gzip.open(out / "trace.json.gz", "wb", compresslevel=6) as g:
                        g.write(f.read())
                if (out / "trace.json.gz").exists() and (out / "trace.json.gz").stat().st_size > 15 * 2**20:
                    (out / "trace.json.gz").unlink()

        def _ready(self, prof):
            t0 = time.time()
            trace = out / "trace.json"
            prof.export_chrome_trace(str(trace))
            t_export = time.time() - t0
            size = trace.stat().st_size
            with open(trace, "rb") as f, gzip.open(out / "trace.json.gz", "wb", compresslevel=6) as g:
                g.write(f.read())
            trace_json = json.loads(trace.read_text())
            trace.unlink()  # tens of MiB; the .gz stays (if small enough, below)
            lo = self.prof_first - 1  # index into walls/tokens (step numbers start at 1)
            steps_tokens = self.tokens[lo:lo + args.active]
            a = analyze(trace_json, steps_tokens, fl["flops_per_token"])
            un_lo = max(args.warmup - args.unprofiled, 2)  # steps un_lo+1 .. warmup: steady, no profiler
            uw, ut = self.walls[un_lo:args.warmup], self.tokens[un_lo:args.warmup]
            res = {"env": environment(), "overrides": overrides, "flops": fl, "no_step_wait": args.no_step_wait,
                   "gpu": torch.cuda.get_device_name() if cuda else "cpu",
                   "profiled_step_numbers": list(range(self.prof_first, self.prof_first + args.active)),
                   "step_walls_ms_all": [round(w * 1e3, 2) for w in self.walls],
                   "step_tokens_all": self.tokens,
                   "unprofiled_steady": {"steps": f"{un_lo + 1}-{args.warmup}", "step_ms": 1e3 * sum(uw) / len(uw),
                                         "tokens_per_s": sum(ut) / sum(uw),
                                         "mfu_vs_989": sum(ut) / sum(uw) * fl["flops_per_token"] / 989e12
                                         if fl["flops_per_token"] else None}
                   if uw else None,
                   "peak_gpu_gib_so_far": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   "trace_bytes": size, "trace_export_s": t_export,
                   "method": METHOD,
                   "analysis": a}
            gz = out / "trace.json.gz"
            res["trace_gz_bytes"] = gz.stat().st_size
            if gz.stat().st_size > 25 * 2**20:  # 4 profiled steps came to 2.9 MB (profile17)
                gz.unlink()
                res["trace_saved"] = False
            else:
                res["trace_saved"] = True
            (out / "profile.json").write_text(json.dumps(res, indent=1) + "\n")
            (out / "profile.md").write_text(markdown(res))
            print(markdown(res), flush=True)
            print(f"profile_step: analysis done in {time.time() - t0:.0f}s (trace {size / 2**20:.1f} MiB)", flush=True)
            self.result = res

    cb = Profile()
    # Under train.overlap_steps the token count is read only at logging steps: the callback needs the trainer to
    # bring it up to date after its own per-step wait (LossCurve is the one callback that is handed the trainer).
    import llmft.train as stage

    init = stage.LossCurve.__init__

    def keep_trainer(self, trainer, *a, **k):
        cb.trainer = trainer
        init(self, trainer, *a, **k)

    stage.LossCurve.__init__ = keep_trainer
    metrics = train(cfg, callbacks=[cb])
    if cb.result is not None:
        cb.result["stage_metrics"] = metrics
        (out / "profile.json").write_text(json.dumps(cb.result, indent=1) + "\n")
    print(f"profile_step: total {time.time() - t_start:.0f}s; stage metrics {json.dumps(metrics)}", flush=True)
    return 0 if cb.result is not None else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="profile.json, profile.md, trace.json.gz; the run in run/")
    ap.add_argument("--params", default=str(bench.ROOT / bench.LORA), help="the config to profile")
    ap.add_argument("--model", type=Path, default=bench.Ctx.model, help="model folder: config.json (random weights)")
    ap.add_argument("--data", type=Path, default=bench.Ctx.data, help="make_assets.py's rows and lengths.json")
    ap.add_argument("--smoke", action="store_true", help="CPU check with a tiny --model (bench.py's stand-ins)")
    ap.add_argument("--warmup", type=int, default=8, help="steps before the profiler starts (compile included)")
    ap.add_argument("--unprofiled", type=int, default=4, help="steady steps timed without the profiler, before it")
    ap.add_argument("--active", type=int, default=4, help="profiled steps")
    ap.add_argument("--no-step-wait", action="store_true",
                    help="no wait for the GPU between profiled steps (as train.overlap_steps runs them): the idle "
                         "time is the stage's own, summed over the steps; per-step rows are CPU windows")
    ap.add_argument("--analyze", help="classify a saved chrome trace (.json or .json.gz) instead of running")
    ap.add_argument("--skip", nargs="*", default=[], help="with --analyze: ProfilerStep#N ranges to leave out")
    ap.add_argument("--from-json", help="with --analyze: the run's profile.json (tokens per step, FLOPs, env)")
    args, rest = ap.parse_known_args()
    if args.analyze:
        opener = gzip.open if args.analyze.endswith(".gz") else open
        prev = json.loads(Path(args.from_json).read_text()) if args.from_json else {}
        tokens = fpt = None
        if prev:
            first = prev["profiled_step_numbers"]
            keep = [i for i, _ in enumerate(first) if f"ProfilerStep#{i + 1}" not in args.skip]
            tokens = [prev["step_tokens_all"][first[i] - 1] for i in keep]
            fpt = prev["flops"]["flops_per_token"]
        with opener(args.analyze, "rt") as f:
            a = analyze(json.load(f), tokens, fpt, skip=args.skip)
        res = {"analysis": a, "method": METHOD, "gpu": prev.get("gpu"), "env": prev.get("env"),
               "source": {"trace": args.analyze, "profile_json": args.from_json}}
        if prev.get("unprofiled_steady"):
            res["unprofiled_steady"] = prev["unprofiled_steady"]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "reanalysis" + ("_skip_" + "_".join(x.split("#")[-1] for x in args.skip) if args.skip else "")
        (Path(args.out) / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
        (Path(args.out) / f"{name}.md").write_text(markdown(res))
        print(markdown(res))
        return 0
    unknown = [r for r in rest if "=" not in r]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    out = args.out.resolve()
    ctx = bench.Ctx(out=out, model=args.model.resolve(), data=args.data.resolve(), smoke=args.smoke, extra=rest)
    # as many steps as the profile needs, and a few more: the callback stops training after the profiled ones
    return run(args, bench.stage_overrides(ctx, out / "run", "profile", steps=args.warmup + args.active + 4))


if __name__ == "__main__":
    sys.exit(main())
