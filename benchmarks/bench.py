"""The 7B speed benchmark: every number of benchmarks/README.md is one named configuration here, run by name.

    python benchmarks/make_assets.py                 # once: .bench/ (7B config + tokenizer, no weights; Dolly rows)
    python benchmarks/bench.py baseline bf16 fp8     # on a CUDA GPU: one summary line a run, JSON in --out
    python benchmarks/bench.py --list                # every configuration and the commands it runs
    python benchmarks/bench.py fp8 --dry-run         # the commands only
    python benchmarks/bench.py bf16 train.batch_size=8   # key=value: added to every `llmft train` run

A training configuration runs `python -m llmft train --params CONFIG [key=value ...]` with random weights of the
config's shapes (model.random_init: no gated download, the same speed) on the Dolly rows of .bench/data, for --steps
optimizer steps; validation and checkpoints are pushed past the last step, out of the timing. Its speed is the stage's
own steady rate (metrics/train.json `steady_tokens_per_s`: real tokens, no padding, of the optimizer steps after the
first 2, so compiling, validation and saving are left out); its peak is torch.cuda.max_memory_allocated. The ratio is
to the `baseline` run of the same invocation (it runs first when named): GPUs of one kind differ by a few per cent.

--smoke is the CPU check of this driver and of the scripts it runs: the tiny model (--model, --data from
make_assets.py on any Dolly file), a few steps, and CPU stand-ins for the GPU-only switches (bf16, FP8,
FlashAttention, compile, QLoRA's 4-bit base), so its figures say nothing about speed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LORA, LEAN, QLORA = "configs/llama2-7b-lora.yaml", "configs/llama2-7b-lean.yaml", "configs/llama2-7b-qlora-24gb.yaml"
# CPU stand-ins for what needs a GPU; appended last, so they win over a configuration's own values.
SMOKE = ("train.precision=fp32", "train.attn_implementation=sdpa", "train.torch_compile=false",
         "train.compile_regions=false", "train.fp8=false", "train.use_liger_kernel=false", "train.qlora.enabled=false",
         "train.max_length=256", "train.batch_size=2")
# The loss check's reference: the 7B config's data layout (packing 2048, dropout 0, batch 4) with flex attention
# (no cross-document attention, as varlen) and every speed-only switch off.
SWITCHES_OFF = ("train.attn_implementation=flex_attention", "train.torch_compile=false", "train.compile_regions=false",
                "train.fused_lora=false", "train.overlap_steps=false", "train.use_liger_kernel=false")
ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
       "DISABLE_MLFLOW_INTEGRATION": "TRUE"}  # offline (the assets are local), and no second MLflow logger
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Ctx:
    """One invocation's settings; every path absolute, since the runs start in the repository root."""
    out: Path
    model: Path = ROOT / ".bench/llama2-7b"
    data: Path = ROOT / ".bench/data"
    split: Path = ROOT / ".bench/dolly_split"
    dolly: Path = ROOT.parent / "shared/data/dolly/dolly_sample.jsonl"
    steps: int = 30
    smoke: bool = False
    extra: list[str] = field(default_factory=list)
    nproc: int = 1
    py: str = sys.executable


@dataclass
class Step:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        """As a user would type it in the repository root, where the runs start."""
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        argv = ["python" if a == sys.executable else a.replace(f"{ROOT}/", "") for a in self.argv]
        return (env + " " if env else "") + shlex.join(argv)


def stage_overrides(ctx: Ctx, d: Path, name: str, overrides=(), steps: int | None = None) -> list[str]:
    """What a benchmark adds to a config: random weights, every output inside d, validation and saving past the last
    step (out of the timing), then the configuration's own overrides, the user's, and --smoke's stand-ins."""
    return [f"model.base={ctx.model}", "model.random_init=true", f"paths.data={ctx.data}",
            f"paths.adapter={d}/adapter", f"paths.checkpoints={d}/ckpt", f"paths.train_metrics={d}/train.json",
            f"paths.train_plots={d}/plots", f"paths.run_id={d}/run_id.txt",  # one MLflow store: created once
            f"tracking.uri=sqlite:///{ctx.out}/mlflow.db", f"tracking.artifact_location={ctx.out}/mlartifacts",
            f"tracking.run_name=bench-{name}", f"train.max_steps={steps or ctx.steps}", "train.eval_steps=100000",
            "train.save_steps=100000", "train.max_eval_rows=8", "train.logging_steps=5", *overrides, *ctx.extra,
            *(SMOKE if ctx.smoke else ())]


def stage(ctx: Ctx, d: Path, name: str, params: str | None, overrides=(), steps: int | None = None) -> list[str]:
    """`python -m llmft train [--params CONFIG]` with stage_overrides."""
    return [ctx.py, "-m", "llmft", "train", *(["--params", params] if params else []),
            *stage_overrides(ctx, d, name, overrides, steps)]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class Train:
    """`llmft train` with a config file and overrides: a row of the speed tables."""
    doc: str
    params: str
    overrides: tuple[str, ...] = ()
    weights_on_disk: bool = False  # QLoRA quantises weights as it loads them: random ones are saved first
    kind = "train"

    def steps(self, ctx: Ctx, name: str) -> list[Step]:
        d = ctx.out / name
        if not self.weights_on_disk:
            return [Step(stage(ctx, d, name, self.params, self.overrides))]
        save = Step([ctx.py, str(HERE / "make_assets.py"), "--random-weights", f"{d}/base", "--model", str(ctx.model)])
        train = stage(ctx, d, name, self.params, (*self.overrides, f"model.base={d}/base", "model.random_init=false"))
        return [save, Step(train)]

    def read(self, ctx: Ctx, name: str) -> dict:
        d = ctx.out / name
        shutil.rmtree(d / "base", ignore_errors=True)  # 13 GB of random 7B weights
        m = read_json(d / "train.json")
        return {"tokens_per_s": m.get("steady_tokens_per_s"), "peak_gib": m.get("peak_gpu_gib"), "train_json": m}


@dataclass
class Baseline:
    doc: str
    kind = "baseline"

    def steps(self, ctx: Ctx, name: str) -> list[Step]:
        size = ["--batch-size", "2", "--steps", "4", "--warmup", "1", "--max-length", "128"] if ctx.smoke else \
            ["--batch-size", "8", "--steps", "40", "--warmup", "5"]
        return [Step([ctx.py, str(HERE / "baseline_trainer.py"), "--model", str(ctx.model), "--data",
                      f"{ctx.data}/train.jsonl", "--lengths", f"{ctx.data}/lengths.json", "--out",
                      f"{ctx.out}/{name}/baseline.json", "--name", name, *size])]

    def read(self, ctx: Ctx, name: str) -> dict:
        r = read_json(ctx.out / name / "baseline.json")
        return {"tokens_per_s": r.get("real_tokens_per_s"), "peak_gib": r.get("peak_mem_gib"), "baseline_json": r}


@dataclass
class Generate:
    doc: str
    kind = "generate"

    def steps(self, ctx: Ctx, name: str) -> list[Step]:
        # on a GPU: transformers' continuous batching over the same prompts, and the embedded SmolLM2's agreement
        size = (["--new-tokens", "16", "--fast-runs", "16x8", "--kv-caches", "model", "fp8"] if ctx.smoke else
                ["--decode-kernels", "auto", "flash", "--kv-caches", "model", "fp8", "--generate-batch",
                 "--smollm2", "256"])
        return [Step([ctx.py, str(HERE / "generate_fast_bench.py"), "speed", "--model", str(ctx.model), "--data",
                      f"{ctx.data}/train.jsonl", "--out", f"{ctx.out}/{name}/speed.json", *size])]

    def read(self, ctx: Ctx, name: str) -> dict:
        r = read_json(ctx.out / name / "speed.json")
        rows = {row["path"]: row for row in r.get("rows", [])}
        plain = rows.get("plain generate", {})
        fast = next((row for row in r.get("rows", []) if row["path"] == "fast"), {})  # the first decode kernel's
        return {"tokens_per_s": fast.get("new_tokens_per_s"), "peak_gib": fast.get("peak_gib"),
                "plain_new_tokens_per_s": plain.get("new_tokens_per_s"),
                "generate_batch_new_tokens_per_s": rows.get("transformers generate_batch", {}).get("new_tokens_per_s"),
                "first_pass_new_tokens_per_s": fast.get("first_pass", {}).get("new_tokens_per_s"),
                "fp8_cache_new_tokens_per_s": next((row["new_tokens_per_s"] for row in r.get("rows", [])
                                                    if row.get("kv_cache") == "fp8"), None),
                "tiny_fp32_equal": r.get("tiny_fp32_equal", {}).get("equal"), "speed_json": r}


@dataclass
class LossCheck:
    """Same loss with the speed switches? Real weights (the embedded SmolLM2-135M), the Dolly split, curves compared
    by loss_equivalence.py. Batch 4 for all: the batch size changes the optimisation, so the check keeps one."""
    doc: str
    runs: dict[str, tuple[str, ...]]
    kind = "loss"
    steps_n = 50

    def model(self, ctx: Ctx) -> list[str]:
        return [f"model.base={ctx.model}" if ctx.smoke else "model.base=embedded", f"paths.base_cache={ctx.out}/base"]

    def common(self, ctx: Ctx, d: Path, run: str) -> list[str]:
        steps, every = (6, 3) if ctx.smoke else (self.steps_n, 5)
        return [*stage(ctx, d / run, f"loss-{run}", LORA, self.runs[run], steps=steps), *self.model(ctx),
                "model.random_init=false", f"paths.data={ctx.split}", f"paths.train_plots={d}/curves/{run}",
                f"train.eval_steps={every}", "train.logging_steps=1", "train.max_eval_rows=null", "train.seed=42"]

    def names(self, ctx: Ctx) -> list[str]:
        return [n for n in self.runs if not (ctx.smoke and "train.fp8=true" in self.runs[n])]  # no FP8 on a CPU

    def steps(self, ctx: Ctx, name: str) -> list[Step]:
        d = ctx.out / name
        out = []
        if not (ctx.split / "train.jsonl").exists():
            out.append(Step([ctx.py, "-m", "llmft", "prepare", "--params", LORA, f"data.source={ctx.dolly}",
                             f"paths.data={ctx.split}", f"paths.data_metrics={d}/data.json", *self.model(ctx)]))
        out += [Step(self.common(ctx, d, run)) for run in self.names(ctx)]
        ref, *others = self.names(ctx)
        out.append(Step([ctx.py, str(HERE / "loss_equivalence.py"), "--runs", f"{d}/curves", "--ref", ref,
                         "--names", *others, "--out", str(d)]))
        return out

    def read(self, ctx: Ctx, name: str) -> dict:
        r = read_json(ctx.out / name / "loss_equivalence.json")
        return {"tokens_per_s": None, "peak_gib": None, "loss_equivalence": r}


@dataclass
class Fsdp:
    """One process without FSDP against N processes with FSDP2, then the FSDP adapter reloaded without FSDP."""
    doc: str
    overrides: tuple[str, ...]
    kind = "fsdp"

    def steps(self, ctx: Ctx, name: str) -> list[Step]:
        d = ctx.out / name
        accel = "configs/accelerate/cpu-fsdp.yaml" if ctx.smoke else "configs/accelerate/fsdp.yaml"
        n = 1 if ctx.smoke else ctx.nproc
        fsdp = stage_overrides(ctx, d / "fsdp2", f"{name}-fsdp2", self.overrides)
        launch = [ctx.py, "-m", "accelerate.commands.launch", "--config_file", accel, "--num_processes", str(n)]
        # the reload gets the FSDP run's overrides: the same config, so the same seeded random base
        return [Step(stage(ctx, d / "plain", f"{name}-plain", None, self.overrides)),
                Step([*launch, str(HERE / "fsdp_check.py"), "train", *fsdp], NO_MULTICAST),
                Step([ctx.py, str(HERE / "fsdp_check.py"), "reload", *fsdp])]

    def read(self, ctx: Ctx, name: str) -> dict:
        d = ctx.out / name
        plain, fsdp = read_json(d / "plain" / "train.json"), read_json(d / "fsdp2" / "train.json")
        return {"tokens_per_s": fsdp.get("steady_tokens_per_s"), "peak_gib": fsdp.get("peak_gpu_gib"),
                "plain_tokens_per_s": plain.get("steady_tokens_per_s"), "plain_peak_gib": plain.get("peak_gpu_gib"),
                "reload_check": read_json(d / "fsdp2" / "reload_check.json")}


# The named configurations. Each row of benchmarks/README.md names one; the commands are `--list`'s.
CONFIGS = {
    "baseline": Baseline("seed-style HF Trainer + PEFT: every row padded to 512, SDPA, batch 8 (baseline_trainer.py)"),
    "bf16": Train(f"{LORA} as it is: packing 2048, FlashAttention-4 varlen, compiled layers, bf16", LORA),
    "bf16_bs6": Train(f"{LORA}, batch 6", LORA, ("train.batch_size=6",)),
    "fp8": Train(f"{LORA} with FP8 base projections, batch 6 (fits 80 GB)", LORA,
                 ("train.fp8=true", "train.batch_size=6")),
    "varlen": Train(f"{LORA} with torch's own FlashAttention-2 varlen kernels: where flash-attn-4 is not installed",
                    LORA, ("train.attn_implementation=varlen",)),
    "varlen_fp8": Train(f"{LORA} with torch's varlen kernels and FP8, batch 6", LORA,
                        ("train.attn_implementation=varlen", "train.fp8=true", "train.batch_size=6")),
    "lean": Train(f"{LEAN}: gradient checkpointing, flex attention, no compile (about 17 GiB)", LEAN),
    "qlora": Train(f"{QLORA}: NF4 base (bitsandbytes), random weights saved to disk first", QLORA,
                   weights_on_disk=True),
    "generate": Generate("generation: llmft's fast path against plain generate, 256 new tokens, 512 Dolly prompts"),
    "loss": LossCheck(f"the {LORA} switches against the same config with every switch off, real SmolLM2 weights, "
                      "50 steps: training and validation curves", {"ref": SWITCHES_OFF, "bf16": (),
                                                                    "fp8": ("train.fp8=true",)}),
    "fsdp": Fsdp("FSDP2 (configs/accelerate/fsdp.yaml, --nproc processes) against one plain process, packing 2048, "
                 "flex attention, batch 4; then the adapter reloaded without FSDP",
                 ("train.packing=true", "train.max_length=2048", "train.attn_implementation=flex_attention",
                  "train.lora.dropout=0.0", "train.batch_size=4")),
}


class PowerLog:
    """nvidia-smi every 200 ms (power, SM clock, clock-limit reasons) into OUT/smi.csv: whether a run is held back by
    the GPU's power cap. Each run's summary keeps the samples inside it where the GPU is at least 90 % busy."""
    FIELDS = "timestamp,power.draw,power.limit,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu,"
    SW_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap

    def __init__(self, path: Path):
        self.path, self.proc = path, None
        for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):  # the older drivers' name
            q = ["nvidia-smi", f"--query-gpu={self.FIELDS}{reasons}", "--format=csv"]
            try:
                ok = subprocess.run(q, capture_output=True).returncode == 0
            except OSError:  # no nvidia-smi at all
                break
            if ok:
                self.proc = subprocess.Popen([*q, "-lms", "200"], stdout=path.open("w"))
                return
        print("bench: --smi: nvidia-smi answers no power query here; no power log", flush=True)

    def summary(self, t0: float, t1: float) -> dict | None:
        return power_summary(self.path, t0, t1) if self.proc is not None else None

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()


def power_summary(path: Path, t0: float, t1: float) -> dict:
    """The samples of PowerLog's CSV between t0 and t1 (epoch seconds) where the GPU is at least 90 % busy: mean power,
    SM clock, and how many name the software power cap among the clock-limit reasons."""
    busy = []
    with path.open() as f:
        for row in csv.reader(f, skipinitialspace=True):
            try:
                t = datetime.datetime.strptime(row[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # the machine's local time
                power, limit, clock, util = (float(x.split()[0]) for x in row[1:4] + row[6:7])  # "81.08 W"
                capped = int(row[7], 16) & PowerLog.SW_POWER_CAP != 0
            except (ValueError, IndexError):
                continue  # a torn last line, or [N/A]
            if t0 <= t <= t1 and util >= 90:
                busy.append((power, limit, clock, capped))
    if not busy:
        return {"busy_samples": 0}
    return {"busy_samples": len(busy), "power_w_mean": round(sum(b[0] for b in busy) / len(busy)),
            "power_limit_w": busy[0][1], "sm_clock_mhz_mean": round(sum(b[2] for b in busy) / len(busy)),
            "sm_clock_mhz_min": min(b[2] for b in busy), "power_capped_samples": sum(b[3] for b in busy)}


def run(ctx: Ctx, name: str, env: dict, timeout: float | None, power: PowerLog | None) -> dict:
    conf = CONFIGS[name]
    d = ctx.out / name
    shutil.rmtree(d, ignore_errors=True)  # a run never resumes an earlier one's checkpoints
    d.mkdir(parents=True)
    steps = conf.steps(ctx, name)
    rec = {"name": name, "kind": conf.kind, "doc": conf.doc, "commands": [str(s) for s in steps], "rc": 0}
    t0 = time.time()
    with (d / "log").open("w") as log:
        for s in steps:
            print(f"bench: {name}: {s}", flush=True)
            log.write(f"$ {s}\n")
            log.flush()
            try:
                rc = subprocess.run(s.argv, cwd=ROOT, env={**env, **s.env}, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            if rc != 0:
                rec["rc"] = rc
                tail = [ln for ln in (d / "log").read_text(errors="replace").replace("\r", "\n").splitlines()
                        if ln.strip() and "it/s]" not in ln and "s/it]" not in ln][-15:]
                print(f"bench: {name} failed (rc {rc}); the end of {d / 'log'}:\n  " + "\n  ".join(tail), flush=True)
                break
    t1 = time.time()
    rec["seconds"], rec["epoch_start_end"] = round(t1 - t0, 1), [t0, t1]  # to summarise smi.csv again later
    rec.update(conf.read(ctx, name))
    if power is not None:
        rec["power"] = power.summary(t0, t1)
    return rec


def line(rec: dict, base: float | None) -> str:
    """One summary line: what a run measured, against the baseline of the same invocation."""
    name, tps, peak = rec["name"], rec.get("tokens_per_s"), rec.get("peak_gib")
    if rec["rc"] != 0:
        return f"bench: {name:<10} failed (rc {rec['rc']}) after {rec['seconds']:.0f} s: {rec.get('log', '')}"
    if rec["kind"] == "loss":
        eq = rec["loss_equivalence"]

        def worst(c: dict) -> str:
            return f"{c['max_rel']:.2%} (mean {c['mean_rel']:.2%})" if c.get("steps") else "no curve"
        said = "; ".join(f"{n} vs {eq['ref']}: training {worst(r['train'])}, validation {worst(r['eval'])}"
                         for n, r in eq.get("runs", {}).items())
        return f"bench: {name:<10} largest loss difference: {said or 'no curves'}"
    unit = "new tok/s" if rec["kind"] == "generate" else "tok/s"
    parts = [f"{tps:,.0f} {unit}" if tps else f"no {unit}", f"{peak:.1f} GiB" if peak else "peak -"]
    if rec["kind"] in ("train", "baseline", "fsdp") and tps and base:
        parts.append(f"{tps / base:.2f}x baseline")
    if rec["kind"] == "generate" and rec.get("plain_new_tokens_per_s"):
        parts.append(f"plain generate {rec['plain_new_tokens_per_s']:,.0f}")
    if rec["kind"] == "fsdp" and rec.get("plain_tokens_per_s"):
        parts.append(f"one plain process {rec['plain_tokens_per_s']:,.0f}; reload ok: "
                     f"{rec['reload_check'].get('ok')}")
    if rec.get("power") and rec["power"].get("busy_samples"):
        p = rec["power"]
        parts.append(f"{p['power_w_mean']} W of {p['power_limit_w']:.0f}, SM {p['sm_clock_mhz_mean']} MHz, "
                     f"power-capped {p['power_capped_samples']}/{p['busy_samples']}")
    return f"bench: {name:<10} " + ", ".join(parts) + f" ({rec['seconds']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME|key=value",
                    help=f"configurations to run ({', '.join(CONFIGS)}); key=value: an override for every llmft "
                         "train run")
    ap.add_argument("--list", action="store_true", help="print every configuration and its commands, run nothing")
    ap.add_argument("--dry-run", action="store_true", help="print the named configurations' commands, run nothing")
    ap.add_argument("--out", type=Path, help="results folder (default: runs/bench/<UTC date and time>)")
    ap.add_argument("--model", type=Path, default=ROOT / ".bench/llama2-7b",
                    help="model folder: config.json and tokenizer (weights are random)")
    ap.add_argument("--data", type=Path, default=ROOT / ".bench/data", help="make_assets.py's prompt/completion rows")
    ap.add_argument("--split", type=Path, default=ROOT / ".bench/dolly_split",
                    help="`loss`: `llmft prepare`'s split of --dolly (made when missing)")
    ap.add_argument("--dolly", type=Path, default=ROOT.parent / "shared/data/dolly/dolly_sample.jsonl",
                    help="`loss`: the Dolly rows to split")
    ap.add_argument("--steps", type=int, help="optimizer steps of a training run (default 30; --smoke 4)")
    ap.add_argument("--nproc", type=int, help="`fsdp`: processes (default: the visible GPUs)")
    ap.add_argument("--timeout", type=float, default=0, help="seconds per command, 0 for none (rc 124 when cut)")
    ap.add_argument("--smi", action="store_true", help="log power and SM clock with nvidia-smi, summarised per run")
    ap.add_argument("--smoke", action="store_true", help="CPU check with a tiny --model: few steps, CPU stand-ins")
    a = ap.parse_args(argv)
    names = [n for n in a.names if "=" not in n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not (names or a.list):
        ap.error(f"unknown configuration {', '.join(unknown)}" if unknown else "name at least one configuration")
    names = sorted(dict.fromkeys(names), key=lambda n: n != "baseline")  # the baseline first: the others' ratio
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = (a.out or ROOT / "runs/bench" / stamp).resolve()
    nproc = a.nproc or int(os.environ.get("NPROC", 0)) or gpu_count()
    ctx = Ctx(out=out, model=a.model.resolve(), data=a.data.resolve(), split=a.split.resolve(),
              dolly=a.dolly.resolve(), steps=a.steps or (4 if a.smoke else 30), smoke=a.smoke,
              extra=[n for n in a.names if "=" in n], nproc=nproc)
    if a.list or a.dry_run:
        for name in names if a.dry_run else CONFIGS:
            print(f"{name}: {CONFIGS[name].doc}")
            for s in CONFIGS[name].steps(ctx, name):
                print(f"  {s}")
        return 0

    sys.path.insert(0, str(HERE))
    from common import environment  # torch: imported only when something runs

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: v for k, v in ENV.items() if k not in os.environ},
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = {"env": environment(), "argv": sys.argv[1:] if argv is None else argv, "smoke": a.smoke, "runs": []}
    print(f"bench: {result['env']['gpu']}, commit {result['env']['commit']}, results in {out}", flush=True)
    power = PowerLog(out / "smi.csv") if a.smi else None
    base = None
    try:
        for name in names:
            rec = run(ctx, name, env, a.timeout or None, power)
            rec["log"] = str(out / name / "log")
            if name == "baseline" and rec["rc"] == 0:
                base = rec.get("tokens_per_s")
            if base and rec.get("tokens_per_s") and rec["kind"] in ("train", "baseline", "fsdp"):
                rec["x_baseline"] = round(rec["tokens_per_s"] / base, 3)
            result["runs"].append(rec)
            (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")  # kept if a later run is killed
            print(line(rec, base), flush=True)
    finally:
        if power is not None:
            power.stop()
    print("\n".join(["bench: summary", *(line(r, base) for r in result["runs"])]), flush=True)
    return 0 if all(r["rc"] == 0 for r in result["runs"]) else 1


def gpu_count() -> int:
    try:
        q = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        return max(1, sum(ln.startswith("GPU") for ln in q.stdout.splitlines()))
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
