"""train: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer, tracked in one MLflow run.

    python -m llmft train
    python -m llmft train train.lora.r=8 train.max_steps=50

Reads paths.data/{train,validation}.jsonl (prompt/completion), trains a PEFT adapter with the loss on
completion tokens only (EOS appended and learned), and writes:
  paths.adapter        the adapter in PEFT format + tokenizer
  paths.checkpoints    resumable checkpoints (optimizer, scheduler, RNG state)
  paths.train_metrics  final metrics (DVC metrics)
  paths.train_plots    train_loss.csv, eval_loss.csv (dvc plots) and loss.png
A rerun with an unchanged config resumes from the last complete checkpoint; one whose training already
finished re-exports the final checkpoint and trains nothing more. Runs unchanged under `accelerate
launch` / `torchrun` with DDP (rank 0 alone writes and logs), and under `accelerate launch` with FSDP2
(configs/accelerate/fsdp.yaml; cpu-fsdp.yaml on CPU processes).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import time
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from . import models, speed
from .config import Config, to_dict
from .errors import LlmftError
from .io import atomic_dir, write_atomic, write_json


def train(cfg: Config, callbacks=(), on_run=None) -> dict:
    """The stage: resume point, trainer, one MLflow run, training, outputs. Returns the final metrics.
    `tune` passes its pruning callback, and `on_run(run_id)` to hear of the MLflow run as soon as it exists."""
    from . import tracking

    is_main = int(os.environ.get("RANK", "0")) == 0
    fingerprint = _fingerprint(cfg)
    resume = _resume_point(cfg, fingerprint, is_main)
    trainer, resolved = build_trainer(cfg)
    curve = LossCurve(trainer, Path(cfg.paths.checkpoints) / "mlflow_run_id.txt")
    for cb in (curve, *callbacks):
        trainer.add_callback(cb)
    metrics = {}
    run_ctx = tracking.start_run(cfg, run_id=curve.previous_run_id(resume)) if is_main else nullcontext()
    with run_ctx as run:
        if run:
            curve.attach(run.info.run_id)
            if on_run:
                on_run(run.info.run_id)
            _log_start(cfg, fingerprint, trainer, resolved)
            print(f"train: {'resuming from ' + resume if resume else 'starting'}; MLflow run {run.info.run_name} "
                  f"({run.info.run_id})", flush=True)
        start = time.time()
        if resume and _is_finished(resume):
            # Training already ran to its end with this config (a second `llmft train`, `dvc repro -f`):
            # Trainer.train() on the final checkpoint would take one more step, so re-export it instead.
            _restore(trainer, resume)
            if is_main:
                print(f"train: already finished at step {trainer.state.global_step} with this config; re-exporting "
                      f"{resume}, training nothing", flush=True)
                metrics = _finish(cfg, trainer, curve, 0.0, resume, fingerprint, replay=True)
            return metrics
        # Validation loss of the untrained adapter, so the curve starts at the base model: asked of train()
        # (eval_on_start), which evaluates after wrapping the model. An evaluate() before train() left the model
        # unwrapped under DDP (the processes never synced gradients) and fails under FSDP2 ("a model and optimizer
        # must be passed together to Accelerator.prepare()").
        trainer.args.eval_on_start = not resume
        trainer.train(resume_from_checkpoint=resume)
        adapter = _full_adapter(trainer)  # a collective under FSDP: every process gathers
        if is_main:
            metrics = _finish(cfg, trainer, curve, time.time() - start, resume, fingerprint, adapter=adapter)
    return metrics


FINAL = "final_metrics.json"  # written into the last checkpoint when a training finishes


def _is_finished(checkpoint: str) -> bool:
    """Whether the checkpoint is where its training stops (its trainer_state says step >= max_steps)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _final_metrics(checkpoint: str) -> dict | None:
    """The finished run's metrics (its speed and runtime among them), if it lived to write them."""
    try:
        return json.loads((Path(checkpoint) / FINAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _restore(trainer, checkpoint: str) -> None:
    """The checkpoint's adapter weights and trainer state (log history, step, tokens) into the trainer."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = Path(checkpoint) / "adapter_model.safetensors"
    if not weights.exists():  # an FSDP checkpoint holds sharded weights that only the Trainer's loop reloads
        raise LlmftError(f"{checkpoint} is a finished FSDP checkpoint, which cannot be re-exported on its own: "
                         f"delete {Path(checkpoint).parent} to train again")
    set_peft_model_state_dict(trainer.model, load_file(str(weights)))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def _precision(tc) -> str:
    import torch

    if tc.precision != "auto":
        if tc.precision in ("bf16", "fp16") and not torch.cuda.is_available():
            raise LlmftError(f"train.precision={tc.precision} needs a CUDA GPU; use fp32 or auto on CPU")
        return tc.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _read_split(path: Path, limit: int | None):
    from datasets import Dataset

    if not path.exists():
        raise LlmftError(f"{path} not found: run `llmft prepare` first")
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise LlmftError(f"{path}: no rows")
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def _fsdp_version() -> int | None:
    """The FSDP version `accelerate launch` was asked for (it exports its config as ACCELERATE_USE_FSDP and
    FSDP_*, read again by the Trainer's Accelerator), or None without FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's own default


def _fingerprint(cfg: Config) -> str:
    """What a checkpoint must match to be resumed: everything that shapes the optimisation (the train and
    model blocks and the training data). Where outputs go lives in `paths`, so nothing is left out by hand."""
    data = Path(cfg.paths.data) / "train.jsonl"
    fp = {"train": to_dict(cfg.train), "model": to_dict(cfg.model),
          "data": hashlib.sha256(data.read_bytes()).hexdigest() if data.exists() else None}
    # FSDP checkpoints are sharded (torch.distributed.checkpoint), others are plain PEFT files: neither loads
    # as the other, so switching FSDP on or off starts fresh. Only added under FSDP: other fingerprints are unchanged.
    if _fsdp_version():
        fp["fsdp"] = _fsdp_version()
    blob = json.dumps(fp, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint whose trainer_state.json (written last by Trainer) parses; a kill mid-save
    leaves a newer, incomplete folder that must be skipped."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for p in found:
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # Under several processes every rank writes its own rng_state_<rank>.pth, and rank 0 may write
        # trainer_state.json while another is still writing: a kill then leaves a torn one (torch.save writes zips),
        # on which the resumed run would crash (the FSDP resume test hit it).
        if all(zipfile.is_zipfile(f) for f in p.glob("rng_state*.pth")):
            return str(p)
    return None


def _resume_point(cfg: Config, fingerprint: str, is_main: bool) -> str | None:
    ckpt_dir = Path(cfg.paths.checkpoints)
    stamp = ckpt_dir / "fingerprint.txt"
    old = stamp.read_text().strip() if stamp.exists() else None
    resume = last_complete_checkpoint(ckpt_dir) if cfg.train.resume and old == fingerprint else None
    if is_main and resume is None:
        if ckpt_dir.exists():
            if old and old != fingerprint:
                print(f"train: checkpoints in {ckpt_dir} come from a different config; starting fresh")
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
        write_atomic(stamp, fingerprint + "\n")
    return resume


def build_trainer(cfg: Config):
    """(SFTTrainer, what was resolved): data, base model, LoRA and training arguments from the config, with the speed
    switches' hooks (llmft/speed) at their places."""
    from trl import SFTTrainer

    tc = cfg.train
    switches = speed.active(tc)
    _refuse_under_fsdp(tc, switches)
    for s in switches:
        s.before_model_load(cfg)
    precision = _precision(tc)
    train_ds = _read_split(Path(cfg.paths.data) / "train.jsonl", tc.max_train_rows)
    eval_ds = _read_split(Path(cfg.paths.data) / "validation.jsonl", tc.max_eval_rows)
    _say(f"loading {models.resolve_base(cfg)} ({precision}"
         + (", 4-bit" if tc.qlora.enabled else "") + (", random weights" if cfg.model.random_init else "") + ")")
    model = models.load(cfg, dtype=precision, device=None, attn_implementation=tc.attn_implementation,
                        qlora=tc.qlora if tc.qlora.enabled else None)
    args = _training_args(cfg, precision, switches)
    trainer_cls = SFTTrainer
    for s in switches:
        trainer_cls = s.trainer_class(trainer_cls)
    _say(f"preparing {len(train_ds):,} training and {len(eval_ds):,} validation rows"
         + (f"; speed switches: {', '.join(s.name for s in switches)}" if switches else ""))
    with _quiet_datasets():  # TRL tokenises, adds EOS, truncates and packs each split: a bar apiece, the line above says it
        trainer = trainer_cls(model=model, args=args, train_dataset=train_ds,
                              eval_dataset=eval_ds, processing_class=models.tokenizer(cfg), peft_config=peft_config(tc))
    if not str(tc.attn_implementation).startswith(("flash", "varlen")):
        trainer.data_collator = _NoVarlenKeys(trainer.data_collator)
    for s in switches:
        if line := s.after_trainer(cfg, trainer):
            _say(line)
    if int(os.environ.get("RANK", "0")) == 0:  # the bar, without a dict of every log line printed under it
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
    if _fsdp_version() and not trainer.is_fsdp_enabled:  # accelerate fell back to DDP or one plain process: say so
        raise LlmftError("FSDP was requested (ACCELERATE_USE_FSDP=true) but accelerate did not enable it for this "
                         "process: launch with `accelerate launch --config_file configs/accelerate/fsdp.yaml -m llmft "
                         "train` (cpu-fsdp.yaml on CPUs)")
    return trainer, {"base_path": models.resolve_base(cfg), "precision": precision}


@contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()


def _say(line: str) -> None:
    """One line per phase, from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {line}", flush=True)


def _refuse_under_fsdp(tc, switches) -> None:
    """What FSDP cannot run fails before anything loads; CPU processes get FSDP at all (accelerate drops it there)."""
    import torch

    fsdp = _fsdp_version()
    if not fsdp:
        return
    if fsdp == 1:
        raise LlmftError("FSDP1 (fsdp_version: 1) is not supported: PEFT keeps the LoRA weights in fp32 over a bf16 base "
                         "and FSDP1 stops with 'Must flatten tensors with uniform dtype'. Use FSDP2 (fsdp_version: 2, "
                         "as in configs/accelerate/fsdp.yaml), which shards parameter by parameter.")
    if tc.qlora.enabled:
        raise LlmftError("train.qlora.enabled=true is not supported under FSDP: llmft stores the 4-bit weights as uint8, "
                         "which FSDP2 cannot shard (every GPU would hold the whole quantised base), and QLoRA+FSDP is "
                         "untested here. Train QLoRA on one GPU without accelerate's FSDP config, or plain LoRA under "
                         "FSDP (train.qlora.enabled=false).")
    for s in switches:
        if not s.fsdp:
            raise LlmftError(f"train.{s.name}=true is not supported under FSDP: set train.{s.name}=false, or train on "
                             "one GPU or under DDP")
    if not torch.cuda.is_available():
        _fsdp_on_cpu()


def peft_config(tc):
    """PEFT's LoraConfig of train.lora."""
    from peft import LoraConfig

    return LoraConfig(r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
                      target_modules=tc.lora.target_modules, bias=tc.lora.bias, use_rslora=tc.lora.use_rslora,
                      use_dora=tc.lora.use_dora, task_type="CAUSAL_LM")


def _training_args(cfg: Config, precision: str, switches):
    import torch
    from trl import SFTConfig

    tc = cfg.train
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    extra = {}
    for s in switches:
        extra.update(s.trainer_args(cfg))
    args = dict(
        output_dir=cfg.paths.checkpoints,
        num_train_epochs=tc.epochs, max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size, per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.learning_rate, lr_scheduler_type=tc.lr_scheduler, warmup_steps=tc.warmup_ratio,  # < 1 means a ratio
        weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, optim=tc.optim,
        bf16=precision == "bf16", fp16=precision == "fp16",
        activation_checkpointing=tc.gradient_checkpointing,
        # Prompt tokens are masked; TRL appends EOS to every completion, so the model learns to stop.
        completion_only_loss=True, max_length=tc.max_length,
        packing=tc.packing, packing_strategy="bfd",
        logging_steps=tc.logging_steps, eval_strategy="steps", eval_steps=tc.eval_steps,
        save_strategy="steps", save_steps=tc.save_steps, save_total_limit=tc.save_total_limit,
        seed=tc.seed, data_seed=tc.seed, dataloader_num_workers=tc.dataloader_workers,
        include_num_input_tokens_seen="non_padding", report_to="none",
        disable_tqdm=int(os.environ.get("RANK", "0")) != 0,
        logging_nan_inf_filter=False,  # a NaN loss must show (tune fails such a trial), not be averaged away
        # Multi-process CPU runs need gloo, and use_cpu: without it accelerate sees no distributed setup
        # and each process silently trains its own copy on all the data.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False if distributed else None,
    )
    return SFTConfig(**{**args, **extra})  # a switch's keywords win over the defaults above


class _NoVarlenKeys:
    """TRL's padding-free collator, without the sequence boundaries that only the varlen kernels read (flash, varlen)
    (`cu_seq_lens_q/k`, `max_length_q/k`): sdpa, eager and flex attention mask from position_ids. Their sizes change
    with the number of packed examples: passed along, they made the compiled decoder layers recompile (7B log,
    benchmarks/results) and kept their shapes dynamic."""

    KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        for k in self.KEYS:
            batch.pop(k, None)
        return batch

    def __getattr__(self, name):
        if name == "collator":  # unpickled in a dataloader worker, before __dict__ is back: no recursion
            raise AttributeError(name)
        return getattr(self.collator, name)


def _fsdp_on_cpu() -> None:
    """Let FSDP2 run on CPU processes (gloo), as configs/accelerate/cpu-fsdp.yaml asks.

    accelerate 1.15 maps CPU processes to MULTI_CPU and then drops the FSDP plugin without a word: the run
    trains as DDP. torch's fully_shard itself runs on CPU with gloo, so promote the state to FSDP once it is
    built; everything after that (sharding, sharded checkpoints, loading) is accelerate's and the Trainer's own.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "llmft_cpu_fsdp", False):
        return

    def promoted(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    promoted.llmft_cpu_fsdp = True
    AcceleratorState.__init__ = promoted


def _full_adapter(trainer):
    """Under FSDP each process holds a shard of every adapter tensor, and save_pretrained on rank 0 alone would
    write rank 0's shard (or fail on DTensors). Gather the trainable (adapter) tensors whole onto rank 0's CPU.
    A collective: every process must call it. None without FSDP (save_pretrained reads the model itself)."""
    if not trainer.is_fsdp_enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(trainer.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


class QuietProgress(ProgressCallback):
    """Transformers' progress bars; the loss shows in the bar (LossCurve), not as printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class LossCurve(TrainerCallback):
    """Streams train/validation loss to MLflow as it is logged; shows tokens/s in the progress bar.

    The steady rate is timed in windows that end where the loop waits for the GPU anyway (a logging, evaluation,
    checkpoint or last step, an epoch end) and reopen when that work is done: the time in the windows is the training
    loop's alone, data loading included, and no step is made to wait for the GPU to be timed (train.overlap_steps)."""

    WARMUP_STEPS = 2  # compile / autotune / allocator warm-up, left out of the steady-state rate

    def __init__(self, trainer, run_id_file: Path):
        self.trainer, self.run_id_file, self.run_id = trainer, run_id_file, None
        self.t0, self.tokens0 = time.time(), 0
        self.window = (0.0, 0, 0)  # (perf_counter, tokens seen, steps seen) where the open window starts
        self.steady_time, self.steady_tokens, self.steps_seen = 0.0, 0, 0

    def previous_run_id(self, resume) -> str | None:
        """A resumed training continues the MLflow run of the killed one, so its curves stay together."""
        if resume and self.run_id_file.exists():
            return self.run_id_file.read_text().strip() or None
        return None

    def attach(self, run_id: str) -> None:
        self.run_id = run_id
        write_atomic(self.run_id_file, run_id + "\n")

    def _open(self, state) -> None:
        self.window = (time.perf_counter(), state.num_input_tokens_seen, self.steps_seen)

    def _close(self, state) -> None:
        """Wait for the GPU, bring the token count up to date, and add the window if it lies past the warm-up."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if hasattr(self.trainer, "flush_tokens"):
            self.trainer.flush_tokens()
        t, tokens, steps = self.window
        if steps >= self.WARMUP_STEPS and self.steps_seen > steps:
            self.steady_time += time.perf_counter() - t
            self.steady_tokens += state.num_input_tokens_seen - tokens
        self._open(state)

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.tokens0 = time.time(), state.num_input_tokens_seen
        self._open(state)

    def on_epoch_end(self, args, state, control, **kw):
        self._close(state)
        control.should_evaluate = True  # validation loss at every epoch end too, not only every eval_steps

    def on_train_end(self, args, state, control, **kw):
        self._close(state)  # a stop asked by another callback (tune's pruning) ends on an unflushed step

    def on_evaluate(self, args, state, control, **kw):
        self._open(state)

    def on_save(self, args, state, control, **kw):
        self._open(state)

    def tokens_per_s(self, state) -> float:
        return (state.num_input_tokens_seen - self.tokens0) / max(time.time() - self.t0, 1e-9)

    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s of the optimizer steps alone (no validation, saving or warm-up): the speed to compare."""
        return self.steady_tokens / self.steady_time if self.steady_time > 0 else None

    def on_step_end(self, args, state, control, **kw):
        self.steps_seen += 1
        # DefaultFlowCallback, which runs before this one, has set what follows this step
        if (self.steps_seen == self.WARMUP_STEPS or control.should_log or control.should_evaluate
                or control.should_save or control.should_training_stop):
            self._close(state)
        if not state.is_world_process_zero:
            return
        losses = [h["loss"] for h in state.log_history[-3:] if "loss" in h]
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                cb.training_bar.set_postfix(**({"loss": f"{losses[-1]:.4g}"} if losses else {}),
                                            tok_s=f"{self.tokens_per_s(state):,.0f}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kw):
        try:
            self._log(state, logs)
        finally:
            self._open(state)  # the time to log is not training time

    def _log(self, state, logs) -> None:
        if not self.run_id or not state.is_world_process_zero or not logs:
            return
        import mlflow

        keep = {"loss": "train_loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate",
                "grad_norm": "grad_norm", "epoch": "epoch"}
        metrics = {keep[k]: float(v) for k, v in logs.items() if k in keep and isinstance(v, (int, float))}
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step, run_id=self.run_id)


def _log_start(cfg: Config, fingerprint: str, trainer, resolved: dict) -> None:
    import mlflow
    import yaml

    from . import tracking
    from .config import flatten

    # The blocks that shape this run's training (what the fingerprint covers): a resumed run re-logs the same
    # values, and MLflow refuses to change a logged param. Later stages log their settings as artifacts.
    params = tracking.scrub(flatten({k: to_dict(getattr(cfg, k)) for k in ("data", "model", "train")}))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    params.update({"resolved.base_path": resolved["base_path"], "resolved.precision": resolved["precision"],
                   "resolved.trainable_params": trainable, "resolved.total_params": total,
                   "resolved.train_rows": len(trainer.train_dataset), "resolved.eval_rows": len(trainer.eval_dataset)})
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    mlflow.set_tags({**tracking.lineage_tags([cfg.paths.data]), **tracking.environment(),
                     "llmft.stage": "train", "llmft.fingerprint": fingerprint})
    mlflow.log_text(yaml.safe_dump(tracking.scrub_nested(to_dict(cfg)), sort_keys=False), "config/params.resolved.yaml")


def _peak_memory() -> dict[str, float]:
    import torch

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # ru_maxrss is KiB
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _finish(cfg: Config, trainer, curve: LossCurve, runtime: float, resume, fingerprint: str,
            replay: bool = False, adapter: dict | None = None) -> dict:
    """Adapter, curves and metrics out. `replay`: a finished run re-exported from its final checkpoint (`resume`),
    whose own metrics, speeds included, are kept (nothing was trained this time); `adapter`: the gathered FSDP
    tensors."""
    import mlflow

    from .plots import loss_curves

    paths = cfg.paths
    state = trainer.state
    out = Path(paths.adapter)
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, state_dict=adapter)  # adapter: the gathered FSDP tensors, or None
        trainer.processing_class.save_pretrained(tmp)
        _sort_target_modules(tmp / "adapter_config.json")

    history = state.log_history
    # dict: an evaluation at an epoch end that is also an eval step is logged twice.
    train_pts = sorted({h["step"]: h["loss"] for h in history if "loss" in h}.items())
    eval_pts = sorted({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}.items())
    loss_curves(train_pts, eval_pts, Path(paths.train_plots))
    tokens = int(state.num_input_tokens_seen)
    metrics = {
        "train_loss": train_pts[-1][1] if train_pts else None,
        "eval_loss": eval_pts[-1][1] if eval_pts else None,
        "best_eval_loss": min((v for _, v in eval_pts), default=None),
        "initial_eval_loss": eval_pts[0][1] if eval_pts and eval_pts[0][0] == 0 else None,
        "steps": state.global_step, "epochs": round(state.epoch or 0, 4),
        "tokens_seen": tokens, "runtime_s": round(runtime, 1),
        # This process's throughput (after a resume: tokens since the restart), model load excluded.
        "tokens_per_s": round(curve.tokens_per_s(state), 1),
        "steady_tokens_per_s": round(curve.steady_tokens_per_s() or 0, 1),
        "resumed_from": resume or "",
        "fingerprint": fingerprint,
        **_peak_memory(),
    }
    if replay:
        final = _final_metrics(resume)
        if final is None:  # killed after the final checkpoint but before writing its metrics: the speeds are unknown
            final = {**metrics, "tokens_per_s": None, "steady_tokens_per_s": None, "runtime_s": None}
            # kept, so the next replay writes the same train.json (its peak memory differs every time): else DVC
            # sees train's metrics change on every `dvc repro -f` and reruns register and report
            write_json(Path(resume) / FINAL, final)
        metrics = final
    else:
        last = last_complete_checkpoint(Path(paths.checkpoints))
        if last and int(last.rsplit("-", 1)[1]) == state.global_step:
            write_json(Path(last) / FINAL, metrics)
    write_json(paths.train_metrics, metrics)
    # "final/...": one section of the UI's charts (a "/" prefix groups them), apart from the loss curves
    mlflow.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    mlflow.log_artifacts(str(out), "adapter")
    mlflow.log_artifacts(paths.train_plots, "plots")
    mlflow.log_artifact(paths.train_metrics, "metrics")
    rate = lambda v: f"{v:,.0f}" if v else "–"  # noqa: E731 (too few steps for a steady rate: none)
    print(f"train: {metrics['steps']} steps, {tokens:,} tokens in {runtime:.0f}s ({rate(metrics['tokens_per_s'])} tok/s "
          f"overall, {rate(metrics['steady_tokens_per_s'])} tok/s in steady steps), train loss {metrics['train_loss']}, "
          f"eval loss {metrics['eval_loss']}, peak "
          + ", ".join(f"{k.removeprefix('peak_').removesuffix('_gib')} {v} GiB" for k, v in _peak_memory().items())
          + f"; adapter -> {out}")
    return metrics


def _sort_target_modules(config_file: Path) -> None:
    """PEFT resolves `all-linear` to a set of module names and saves it in set order, which string hashing
    randomises per process: the same adapter got another adapter_config.json, hence another DVC hash, in every
    run, so a resumed or replayed train (`dvc repro` after a kill, `dvc repro -f`) made DVC rerun evaluate,
    register and report for an identical adapter. Sorted, the file is the same bytes for the same adapter."""
    conf = json.loads(config_file.read_text())
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
        write_atomic(config_file, json.dumps(conf, indent=2, sort_keys=True) + "\n")


def merge(cfg: Config) -> None:
    """Write base + adapter merged into plain weights at `{paths.adapter}-merged`."""
    adapter = Path(cfg.paths.adapter)
    merged = models.load(cfg, adapter, dtype="fp32", device="cpu", merge=True)
    out = adapter.with_name(adapter.name + "-merged")
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        models.tokenizer(cfg, adapter).save_pretrained(tmp)
    print(f"merge: {adapter} + {models.resolve_base(cfg)} -> {out}")
