#!/usr/bin/env bash
# GPU benchmark driver (run from the repo root on a CUDA machine). Each subcommand writes JSON to $RES.
#
#   bash benchmarks/gpu.sh env                      # install carried wheels (if any), print versions
#   bash benchmarks/gpu.sh baseline NAME [args]     # variant (a): benchmarks/baseline_trainer.py
#   bash benchmarks/gpu.sh generate [args]          # batched generation via llmft.generate
#   bash benchmarks/gpu.sh attn                     # attention-kernel micro-benchmark
#   bash benchmarks/gpu.sh llmft NAME [key=value]   # variant (b): `python -m llmft train` with overrides
#   bash benchmarks/gpu.sh fsdp NAME [key=value]    # the same under accelerate launch, FSDP2, $NPROC processes (1)
#   bash benchmarks/gpu.sh py SCRIPT [args]         # any Python script with this environment (wheels, src/)
#   bash benchmarks/gpu.sh randckpt                 # save random 7B weights (for QLoRA through the stage)
#
# Expects .bench/ from benchmarks/make_assets.py (model config + tokenizer, Dolly rows). Where the machine
# lacks packages, wheels in .whl/ (and an unpacked bitsandbytes in .whlbnb/site) are installed first.
set -uo pipefail
RES=${RES:-${OUT:-benchmarks/results}}
MODEL=${MODEL:-.bench/llama2-7b}
RUNS=${RUNS:-/tmp/llmft_runs}
mkdir -p "$RES" "$RUNS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_ASYNC_LOGGING=false HF_HUB_DISABLE_TELEMETRY=1 DISABLE_MLFLOW_INTEGRATION=TRUE
if [ -z "${SKIP_WHL:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  if [ ! -f /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && touch /tmp/site/.done || exit 1
  fi
fi
# installed from .whl/, or landed already installed by `hop.sh land 1`
[ -z "${SKIP_WHL:-}" ] && [ -f /tmp/site/.done ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# FlashAttention-4's CuTe DSL, landed by `hop.sh land 2`: its .pth file adds this folder in a site-packages only
[ -z "${SKIP_WHL:-}" ] && [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] \
  && export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
[ -z "${SKIP_WHL:-}" ] && [ -d .whlbnb/site ] && export PYTHONPATH=$PWD/.whlbnb/site:$PYTHONPATH
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}

cmd=${1:-env}; shift || true
case "$cmd" in
  env)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 - <<'EOF' | tee "$RES/env.json"
import importlib.metadata as md, json, sys, torch
pk = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow-skinny", "liger-kernel", "bitsandbytes",
      "triton", "tokenizers", "huggingface-hub", "pyarrow", "fsspec", "sqlalchemy", "flash-attn", "kernels",
      "flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "apache-tvm-ffi"]
v = {}
for p in pk:
    try: v[p] = md.version(p)
    except md.PackageNotFoundError: v[p] = None
ok = {}
for m in ["trl", "datasets", "mlflow", "liger_kernel", "bitsandbytes", "llmft.train", "flash_attn.cute.interface"]:
    try: __import__(m); ok[m] = "ok"
    except Exception as e: ok[m] = f"{type(e).__name__}: {e}"[:300]
try:
    import mlflow, tempfile
    mlflow.set_tracking_uri("sqlite:////tmp/envcheck_mlflow.db")
    with mlflow.start_run(): mlflow.log_metric("x", 1.0)
    ok["mlflow_sqlite"] = "ok"
except Exception as e: ok["mlflow_sqlite"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps({"python": sys.version.split()[0], "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                  "versions": v, "imports": ok}, indent=1))
EOF
    ;;
  baseline)
    name=$1; shift
    python3 benchmarks/baseline_trainer.py --model "$MODEL" --out "$RES/$name.json" --name "$name" "$@" 2>&1 | tee "$RES/$name.log" | grep -vE "it/s\]|s/it\]"
    ;;
  generate)
    python3 benchmarks/generate_bench.py --model "$MODEL" --out "$RES/generate.json" "$@" 2>&1 | tee "$RES/generate.log" | grep -v "it/s"
    ;;
  attn)
    python3 benchmarks/attn_micro.py --out "$RES/attn_micro.json" 2>&1 | tee "$RES/attn_micro.log"
    ;;
  randckpt)
    python3 - <<'EOF'
import sys, time, torch
sys.path.insert(0, "benchmarks")
from baseline_trainer import random_model
t = time.time()
m = random_model(".bench/llama2-7b", None)
m.save_pretrained("/tmp/rand7b")
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(".bench/llama2-7b").save_pretrained("/tmp/rand7b")
print(f"random 7B checkpoint saved to /tmp/rand7b in {time.time() - t:.0f}s")
EOF
    ;;
  fsdp)
    # The same stage under `accelerate launch` with FSDP2 (configs/accelerate/fsdp.yaml; llmft refuses FSDP1).
    # NVLink multicast stays off (on the shared device hosts a program using it can take the GPUs out of service).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    LAUNCH="python3 -m accelerate.commands.launch --config_file ${FSDP_CONFIG:-configs/accelerate/fsdp.yaml} \
      --num_processes ${NPROC:-1} ${FSDP_ENTRY:--m llmft}" exec bash "$0" llmft "$@"
    ;;
  py)
    python3 "$@"
    ;;
  llmft)
    # Variant (b): the normal train stage. Eval/checkpoint cadence pushed out of the timed loop; every run
    # gets its own output folders and MLflow store so runs never resume one another.
    name=$1; shift
    d=$RUNS/$name; rm -rf "$d"; mkdir -p "$d"
    ${LAUNCH:-python3 -m llmft} train model.base="$MODEL" model.random_init=true \
      paths.data=.bench/data paths.adapter="$d/adapter" paths.checkpoints="$d/ckpt" \
      paths.train_metrics="$d/train.json" paths.train_plots="$d/plots" train.eval_steps=100000 \
      train.save_steps=100000 train.max_eval_rows=8 train.logging_steps=5 \
      tracking.uri="${TRACKING_URI:-sqlite:///$d/mlflow.db}" tracking.artifact_location="$d/mlartifacts" \
      paths.run_id="$d/run_id.txt" tracking.run_name="bench-$name" "$@" > "$d/log" 2>&1
    rc=$?
    grep -vE "it/s\]|s/it\]" "$d/log" > "$RES/llmft_$name.log"
    tail -n 25 "$RES/llmft_$name.log"
    python3 benchmarks/collect.py "$name" "$d" "$RES" "$rc" "$@" | tee -a "$RES/llmft_$name.log"
    ;;
  *) echo "unknown subcommand $cmd"; exit 2;;
esac
