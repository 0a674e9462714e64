"""train on a tiny random Llama with the real Llama-2 tokenizer: masking, EOS, resume after kill -9,
reproducibility, gradient accumulation, merge, 2-process gloo DDP, and QLoRA's CPU error."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import adapter_weights, max_diff, run_train, tiny_llama, train_overrides, varlen_reference
from llmft import train
from llmft.config import load_config
from llmft.errors import LlmftError

ROOT = Path(__file__).resolve().parents[1]


def test_prompt_masked_eos_learned_in_labels_pad_distinct(tmp_path, tiny_model_dir, processed, tracking_uri):
    cfg = load_config("none.yaml", train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri,
                                                   **{"train.max_length": 1024}))
    trainer, _ = train.build_trainer(cfg)
    tok = trainer.processing_class
    assert tok.pad_token_id != tok.eos_token_id
    rows = [json.loads(line) for line in (processed / "train.jsonl").open()][:48]
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        ids, labels = ids[:n].tolist(), labels[:n].tolist()
        first = next(i for i, lab in enumerate(labels) if lab != -100)
        prompt, completion = tok.decode(ids[:first]), tok.decode(ids[first:])
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, "exactly one BOS"
        assert all(lab != -100 for lab in labels[first:]), "every completion token is learned"
        assert labels[-1] == tok.eos_token_id, "EOS is appended and learned"
        row = next(r for r in rows if tok.decode(tok(r["prompt"]).input_ids) == prompt)
        assert prompt.endswith("[/INST]") and completion == row["completion"].strip() + "</s>"


def test_packing_is_padding_free_without_cross_contamination(tmp_path, tiny_model_dir, processed, tracking_uri):
    cfg = load_config("none.yaml", train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri,
                                                   **{"train.packing": True}))
    trainer, _ = train.build_trainer(cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch, "bfd packing: one row, positions restart"
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) > 1
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
            assert torch.allclose(packed[a:b], alone, atol=1e-4), "a packed sample must not attend to its neighbours"


@pytest.mark.slow
def test_compile_regions_compile_each_layer_and_keep_the_curve(tmp_path, tiny_model_dir, llama2_tok_dir, processed,
                                                              tracking_uri):
    """train.compile_regions: the decoder layers are compiled one by one (the model itself is not), the layers share
    their graphs (a 3-layer model compiles no more of them than the 2-layer one, through the recompiles that changing
    packed lengths bring; a graph per layer would add one set per layer), and the curves are those of the uncompiled
    stage."""
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    # the fastest configuration's other switches on both sides: the compiled layer traces fused_lora's autograd function
    common = {"train.packing": True, "train.max_steps": 3, "train.eval_steps": 3,
              "train.save_steps": 3, "train.fused_lora": True, "train.lora.dropout": 0.0, "train.overlap_steps": True}
    run_train(tmp_path / "eager", tiny_model_dir, processed, tracking_uri, **common)

    def compiled(tmp, model):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config("none.yaml", train_overrides(tmp, model, processed, tracking_uri, **common,
                                                 **{"train.torch_compile": True, "train.compile_regions": True}))
        trainer, _ = train.build_trainer(cfg)
        trainer.train()
        return trainer, counters["stats"]["unique_graphs"]

    three_layers = tiny_llama(tmp_path / "three_layers", llama2_tok_dir, num_hidden_layers=3)
    _, graphs_three = compiled(tmp_path / "regions3", three_layers)
    trainer, graphs = compiled(tmp_path / "regions", tiny_model_dir)
    wrapped = trainer.model_wrapped
    layers = wrapped.base_model.model.model.layers
    assert not isinstance(wrapped, OptimizedModule) and len(layers) == 2
    assert all(isinstance(layer, OptimizedModule) for layer in layers)
    assert graphs_three == graphs, (graphs_three, graphs)
    eager = dict(csv_rows(tmp_path / "eager" / "plots" / "train_loss.csv"))
    compiled_losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(eager) == sorted(compiled_losses) and len(eager) == 3
    assert max(abs(eager[s] - compiled_losses[s]) / eager[s] for s in eager) < 1e-4, (eager, compiled_losses)


@pytest.mark.slow
def test_varlen_attention_gets_each_documents_boundaries_and_keeps_the_curve(tmp_path, tiny_model_dir, processed,
                                                                             tracking_uri, monkeypatch):
    """train.attn_implementation=varlen: the packed batches keep TRL's document boundaries, they reach every layer's
    attention, and training and validation curves are those of sdpa on the same packed rows. torch's kernels need
    CUDA: on this CPU the reference kernel helpers.varlen_reference stands in for them."""
    from llmft.speed import varlen

    monkeypatch.setitem(varlen.KERNELS, "varlen", (varlen_reference, True))
    common = {"train.packing": True, "train.max_steps": 3, "train.eval_steps": 3, "train.save_steps": 3}
    cfg = load_config("none.yaml", train_overrides(tmp_path / "v", tiny_model_dir, processed, tracking_uri, **common,
                                             **{"train.attn_implementation": "varlen"}))
    trainer, _ = train.build_trainer(cfg)
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        for b in loader:
            starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
            assert b["cu_seq_lens_q"].tolist() == starts + [b["input_ids"].shape[1]] and len(starts) > 1
    run_train(tmp_path / "varlen", tiny_model_dir, processed, tracking_uri, **common,
              **{"train.attn_implementation": "varlen"})
    run_train(tmp_path / "sdpa", tiny_model_dir, processed, tracking_uri, **common)
    assert_same_curves(tmp_path / "sdpa", tmp_path / "varlen", min_rows=2)


@pytest.mark.slow
def test_trained_model_stops_at_eos(tmp_path, tiny_model_dir, tracking_uri):
    from llmft import generate, models
    from llmft.config import GenerationConfig
    from llmft.templates import format_example

    proc = tmp_path / "processed"
    proc.mkdir()
    for split, n in (("train", 32), ("validation", 4)):
        with (proc / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps(format_example("llama2_chat", f"Question number {i}?", "", "Yes.")) + "\n")
    run_train(tmp_path, tiny_model_dir, proc, tracking_uri, **{"train.max_steps": 60, "train.learning_rate": 1e-2,
              "train.batch_size": 8, "train.eval_steps": 30, "train.save_steps": 60, "train.lora.dropout": 0.0})
    prompts = [format_example("llama2_chat", "Question number 99?", "", "")["prompt"]]
    gen = GenerationConfig(max_new_tokens=20)
    model, tok = models.load_with_tokenizer(models.config_for(str(tiny_model_dir)), str(tmp_path / "adapter"), device="cpu")
    enc = tok(prompts, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:]
    assert out.tolist()[-1] == tok.eos_token_id and len(out) < 20, f"tuned model must stop: {tok.decode(out)!r}"
    assert generate.generate(model, tok, prompts, gen, progress=False) == ["Yes."]
    base, _ = models.load_with_tokenizer(models.config_for(str(tiny_model_dir)), device="cpu")
    out = base.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:]
    assert len(out) == 20, "the random base model does not stop (so stopping above was learned)"


@pytest.mark.slow
def test_same_seed_same_curve_and_outputs(tmp_path, tiny_model_dir, processed, tracking_uri):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ma = run_train(a, tiny_model_dir, processed, tracking_uri)
    run_train(b, tiny_model_dir, processed, tracking_uri)
    run_train(c, tiny_model_dir, processed, tracking_uri, **{"train.seed": 1})
    assert (a / "plots" / "train_loss.csv").read_text() == (b / "plots" / "train_loss.csv").read_text()
    assert max_diff(adapter_weights(a), adapter_weights(b)) == 0.0
    assert max_diff(adapter_weights(a), adapter_weights(c)) > 0.0
    assert (a / "plots" / "loss.png").stat().st_size > 1000 and ma["steps"] == 6 and ma["eval_loss"] > 0
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run((a / "run_id.txt").read_text().strip())
    assert len(mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")) == 6
    assert run.data.params["train.lora.r"] == "16" and "git.commit" in run.data.tags and "version.trl" in run.data.tags


@pytest.mark.slow
def test_gradient_accumulation_matches_large_batch(tmp_path, tiny_model_dir, processed, tracking_uri):
    # Completions differ in length, so averaging per-micro-batch means would give a different gradient.
    # SGD, as in the two-process test: Adam's 1/sqrt(v) grows fp32 reduction-order noise (which changes with the
    # thread count) on near-zero gradients to ~3e-5, too close to a real error; SGD keeps it at fp32 level.
    common = {"train.lora.dropout": 0.0, "train.max_steps": 4, "train.optim": "sgd", "train.learning_rate": 0.5}
    run_train(tmp_path / "big", tiny_model_dir, processed, tracking_uri, **common, **{"train.batch_size": 8})
    run_train(tmp_path / "acc", tiny_model_dir, processed, tracking_uri, **common,
              **{"train.batch_size": 4, "train.grad_accum": 2})
    big, acc = adapter_weights(tmp_path / "big"), adapter_weights(tmp_path / "acc")
    moved = max(v.abs().max().item() for k, v in big.items() if "lora_B" in k)  # B starts at 0
    # averaging per-micro-batch means instead of token sums would be off by ~10% of the update
    assert moved > 1e-4 and max_diff(big, acc) < 1e-3 * moved, (moved, max_diff(big, acc))


def test_merge_matches_unmerged_logits(tmp_path, tiny_model_dir, processed, tracking_uri):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ov = train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri)
    train.train(load_config("none.yaml", ov))
    train.merge(load_config("none.yaml", ov))
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432]])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter-merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        lu, lm, lb = unmerged(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(lu, lm, atol=1e-5)
    assert not torch.allclose(lu, lb, atol=1e-5), "the adapter must change the logits"


def _cli(args: list[str], **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "llmft", "train", *args], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_model_dir, processed, tracking_uri):
    extra = {"train.max_steps": 24, "train.save_steps": 4, "train.eval_steps": 100, "train.max_train_rows": 96}
    killed = tmp_path / "killed"
    proc = _cli(train_overrides(killed, tiny_model_dir, processed, tracking_uri, **extra))
    deadline = time.time() + 300
    while not (killed / "ckpt" / "checkpoint-8" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run was killed before it finished"
    done = _cli(train_overrides(killed, tiny_model_dir, processed, tracking_uri, **extra))
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0 and "resuming from" in out, out
    run_train(tmp_path / "whole", tiny_model_dir, processed, tracking_uri, **extra)
    assert max_diff(adapter_weights(killed), adapter_weights(tmp_path / "whole")) <= 1e-6
    resumed = json.loads((killed / "train.json").read_text())
    assert resumed["resumed_from"] and resumed["steps"] == 24
    assert (killed / "run_id.txt").read_text() == (killed / "ckpt" / "mlflow_run_id.txt").read_text(), \
        "the resumed run continues the killed run's MLflow run"


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path, tiny_model_dir, processed, tracking_uri):
    # SGD: Adam's m/sqrt(v) turns fp32 reduction-order noise on near-zero gradients into ~1% of a step on
    # some lora_B entries; SGD keeps the noise at fp32 level, so a real sync bug (a gradient not averaged, or
    # normalised by one process's tokens) stands out by orders of magnitude.
    common = {"train.lora.dropout": 0.0, "train.max_steps": 4, "train.batch_size": 4, "train.optim": "sgd",
              "train.learning_rate": 0.5}
    single = run_train(tmp_path / "one", tiny_model_dir, processed, tracking_uri, **common, **{"train.grad_accum": 2})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "llmft", "train",
                          *train_overrides(tmp_path / "two", tiny_model_dir, processed, tracking_uri, **common)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "train.json").read_text())
    curve = lambda d: [float(line.split(",")[1]) for line in (tmp_path / d / "plots" / "train_loss.csv").read_text().split()[1:]]
    one, two = curve("one"), curve("two")
    # Same 8 rows per step, token-normalised loss, gradients averaged across the two processes: the same
    # curve and adapter up to fp32 reduction order. (Without use_cpu=True each process trained alone and
    # logged twice the loss; with an evaluate() before train() the processes never synced gradients.)
    assert len(one) == len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert double["tokens_seen"] == single["tokens_seen"]
    one_w, two_w = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    moved = max(v.abs().max().item() for k, v in one_w.items() if "lora_B" in k)  # B starts at 0
    assert moved > 1e-4 and max_diff(one_w, two_w) < 1e-3 * moved, (moved, max_diff(one_w, two_w))


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir, processed, tracking_uri):
    cfg = load_config("none.yaml", train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri,
                                                   **{"train.qlora.enabled": True}))
    with pytest.raises(LlmftError, match="qlora.enabled=true needs a CUDA GPU"):
        train.train(cfg)


def test_unknown_scheduler_or_optimizer_fails_at_load(tmp_path, tiny_model_dir, processed, tracking_uri):
    for key, value, close in (("train.lr_scheduler", "cosyne", "cosine"), ("train.optim", "adamw_torchh", "adamw_torch")):
        with pytest.raises(LlmftError, match=f"'{key}' unknown .* '{value}' \\(did you mean '{close}'"):
            load_config("none.yaml", train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri, **{key: value}))


@pytest.mark.slow
def test_rerun_of_a_finished_train_changes_nothing(tmp_path, tiny_model_dir, processed, tracking_uri):
    """`llmft train` twice (or `dvc repro -f`) must give the same adapter, not train past max_steps."""
    first = run_train(tmp_path, tiny_model_dir, processed, tracking_uri)
    weights = adapter_weights(tmp_path)
    curve = (tmp_path / "plots" / "train_loss.csv").read_text()
    shutil.rmtree(tmp_path / "adapter")  # as `dvc repro -f` does before it runs the stage
    second = run_train(tmp_path, tiny_model_dir, processed, tracking_uri)
    assert second["steps"] == first["steps"] == 6 and second["train_loss"] == first["train_loss"]
    assert max_diff(adapter_weights(tmp_path), weights) == 0.0
    assert (tmp_path / "plots" / "train_loss.csv").read_text() == curve


@pytest.mark.slow
def test_curve_starts_at_the_untrained_adapter(tmp_path, tiny_model_dir, processed, tracking_uri):
    import mlflow

    m = run_train(tmp_path, tiny_model_dir, processed, tracking_uri)
    rows = (tmp_path / "plots" / "eval_loss.csv").read_text().split()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps[0] == 0 and steps[-1] == 6 and m["initial_eval_loss"] == float(rows[0].split(",")[1])
    run = mlflow.MlflowClient(tracking_uri).get_run((tmp_path / "run_id.txt").read_text().strip())
    assert run.info.run_name.startswith("train r16 lr1e-03 s6")  # a name a person can scan
    hist = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "eval_loss")
    assert min(h.step for h in hist) == 0


@pytest.mark.slow
def test_fp8_trains_close_to_full_precision(tmp_path, tiny_model_dir, processed, tracking_uri, capsys):
    """train.fp8 on the CPU (FP8 GEMMs emulated): every frozen projection converted, the adapter learns, and the
    curve stays within a few % of the same run without it, though not equal to it. Short rows in small batches:
    CPU torch's FP8 matmul is a slow reference (70-120 ms for one 512 x 64 by 64 x 128 product)."""
    small = {"train.max_length": 64, "train.batch_size": 2}
    full = run_train(tmp_path / "full", tiny_model_dir, processed, tracking_uri, **small)
    capsys.readouterr()
    low = run_train(tmp_path / "fp8", tiny_model_dir, processed, tracking_uri, **small, **{"train.fp8": True})
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert f"train: train.fp8: {7 * layers} frozen projections multiply in FP8" in capsys.readouterr().out
    assert low["eval_loss"] < low["initial_eval_loss"]
    assert abs(low["eval_loss"] - full["eval_loss"]) / full["eval_loss"] < 0.03
    assert max_diff(adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "fp8")) > 0.0
    # fused_lora over FP8 projections multiplies the same FP8 base (its own branch): only the sums' rounding differs
    fused = run_train(tmp_path / "fp8_fused", tiny_model_dir, processed, tracking_uri, **small,
                      **{"train.fp8": True, "train.fused_lora": True, "train.lora.dropout": 0.0})
    lean = run_train(tmp_path / "fp8_lean", tiny_model_dir, processed, tracking_uri, **small,
                     **{"train.fp8": True, "train.lora.dropout": 0.0})
    assert f"train.fused_lora: {7 * layers} of {7 * layers} LoRA layers fused" in capsys.readouterr().out
    assert_same_curves(tmp_path / "fp8_lean", tmp_path / "fp8_fused", min_rows=2)
    assert fused["eval_loss"] != full["eval_loss"] and lean["eval_loss"] != full["eval_loss"]


@pytest.mark.slow
def test_fused_lora_and_overlap_steps_keep_the_curve(tmp_path, tiny_model_dir, processed, tracking_uri, capsys):
    """The two speed switches that do not change the math: the same curve, adapter and token count as without them
    (fp32 on the CPU: only rounding apart), and the count saved in the checkpoints stays right though it is read
    only at logging and checkpoint steps. logging_steps=2 and an epoch end leave steps where nothing is read."""
    common = {"train.lora.dropout": 0.0, "train.lora.alpha": 24, "train.logging_steps": 2,
              "train.max_steps": 7, "train.max_train_rows": 24}  # 6 steps an epoch: the 7th starts the next one
    plain = run_train(tmp_path / "plain", tiny_model_dir, processed, tracking_uri, **common)
    capsys.readouterr()
    fast = run_train(tmp_path / "fast", tiny_model_dir, processed, tracking_uri, **common,
                     **{"train.fused_lora": True, "train.overlap_steps": True})
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert f"train: train.fused_lora: {7 * layers} of {7 * layers} LoRA layers fused" in capsys.readouterr().out
    assert_same_curves(tmp_path / "plain", tmp_path / "fast", min_rows=3)
    moved = max(v.abs().max().item() for k, v in adapter_weights(tmp_path / "plain").items() if "lora_B" in k)
    assert 1e-4 < moved and max_diff(adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "fast")) < 1e-3 * moved
    assert fast["tokens_seen"] == plain["tokens_seen"] > 0 and fast["steady_tokens_per_s"] > 0
    for ckpt in ("checkpoint-6", "checkpoint-7"):  # save_steps=3: the last two are kept
        states = [json.loads((t / "ckpt" / ckpt / "trainer_state.json").read_text())
                  for t in (tmp_path / "plain", tmp_path / "fast")]
        assert states[0]["num_input_tokens_seen"] == states[1]["num_input_tokens_seen"] > 0


def assert_same_curves(a_dir: Path, b_dir: Path, min_rows: int, rel: float = 1e-4) -> None:
    """Two runs' training and validation curves: the same steps, at least min_rows, values within rel (relative)."""
    for name in ("train_loss.csv", "eval_loss.csv"):
        a, b = (csv_rows(d / "plots" / name) for d in (a_dir, b_dir))
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= min_rows, (name, a, b)
        assert max(abs(x - y) / x for (_, x), (_, y) in zip(a, b)) < rel, (name, a, b)


def csv_rows(path: Path) -> list[tuple[int, float]]:
    lines = path.read_text().splitlines()[1:]
    return [(int(a), float(b)) for a, b in (line.split(",")[:2] for line in lines)]
