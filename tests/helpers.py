"""Helpers shared by the test modules: one copy of each, imported as `from helpers import ...` (no test module
imports another; tests/test_house.py checks it). Fixtures live in conftest.py; these are plain functions.

    processes      child_env, sh, llmft, free_port, start_process, stop_process, wait_until_up, tracking_server,
                   model_server
    tiny models    find_llama2_vocab, llama2_tokenizer, tiny_llama, make_adapter
    projects       project_overrides, project_config, prepare_sample, dvc_project
    stages         train_overrides, run_train, adapter_weights, max_diff; registry_config, write_eval,
                   register_with, champion_version, version_tags; varlen_reference, packed; show_result
    reliability    KEY, project_sh, start, finish, kill_when, log_has, comparable, store_states, snapshot,
                   dolly_with_enormous_rows, reliability_project, undisturbed, assert_no_half_written,
                   race_registers, seed_champion, check_registry

Importable without pytest (benchmarks/ builds its tiny models with it on the GPU machine): pytest is imported
where a helper fails a test.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
NO_PARAMS = "/nonexistent/params.yaml"  # no params file: the defaults plus the overrides


# ------------------------------------------------------------------------------------------- processes
def child_env(project: Path | None = None, **extra: str) -> dict:
    """The environment of a child process: this venv's bin first on PATH, llmft from a copied project's own src/
    (or this checkout's), the hub offline, a git identity; then `extra`."""
    src = project / "src" if project is not None and (project / "src").is_dir() else ROOT / "src"
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
            **extra}


def sh(*cmd, cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 900,
       log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end (env: `child_env(cwd)` unless given); unless check=False, fail with the tail of its
    output if it exits non-zero. log_dir keeps its output there, one file per call."""
    res = subprocess.run(cmd, cwd=cwd, env=env if env is not None else child_env(cwd), capture_output=True,
                         text=True, timeout=timeout)
    if log_dir is not None:
        log_dir.mkdir(exist_ok=True)
        (log_dir / f"{time.monotonic_ns()}.log").write_text(res.stdout + res.stderr)
    assert not check or res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


def llmft(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m llmft ARGS` as a user runs it, whatever its exit status (the caller checks it)."""
    return sh(sys.executable, "-m", "llmft", *args, cwd=cwd, env=env, check=False, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(args: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Its own process group, so stopping it also stops the workers it spawns (uvicorn)."""
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the whole group, wait until every member is gone (the leader may exit before its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, else it lingers as a zombie member of the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import pytest
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def tracking_server(backend_uri: str, root: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with `backend_uri` and artifacts proxied into root/artifacts; yields its URL once
    /health answers, stops it after."""
    port, log = free_port(), root / "server.log"
    proc = start_process([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                          "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], log, cwd=root,
                         # No background job runners (GenAI scoring): 7 idle processes on a 2-core runner.
                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, work: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve` of `model_uri` on 127.0.0.1, as a user runs it: no PYTHONPATH (llmft comes from the
    model's code_paths), no hub. Yields (url, process) once /ping answers; stops the whole group after."""
    port, log = free_port(), work / "serve.log"
    child = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
    child.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{child.get('PATH', '')}",
                 MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = start_process([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                          "-h", "127.0.0.1", "-p", str(port), *extra], log, cwd=work, env=child)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop_process(proc)


# ----------------------------------------------------------------------------------------- tiny models
LLAMA2_VOCAB = "ggml-vocab-llama-spm.gguf"


def find_llama2_vocab() -> Path:
    """The vocab GGUF that `make setup` extracts from the llama-cpp-python sdist (or $LLMFT_LLAMA2_VOCAB)."""
    cands = [os.environ.get("LLMFT_LLAMA2_VOCAB", ""), Path.home() / ".cache" / "llmft" / LLAMA2_VOCAB]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError(f"{LLAMA2_VOCAB} not found (looked at {[str(c) for c in cands if c]}); run `make setup`")


def llama2_tokenizer(vocab_gguf: str | Path, out_dir: str | Path) -> Path:
    """A Llama-2 tokenizer folder from llama.cpp's vocab-only GGUF, with its leading-space bug fixed.

    transformers' GGUF conversion drops the SentencePiece dummy prefix (' Hello' -> [15043] instead of
    [29871, 15043]); Llama-2's real normalizer prepends '▁' and maps spaces to '▁'.
    """
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from llmft.io import atomic_dir

    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        return out
    vocab_gguf = Path(vocab_gguf)
    tok = AutoTokenizer.from_pretrained(vocab_gguf.parent, gguf_file=vocab_gguf.name)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return out


def tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A tiny random LlamaForCausalLM with a real tokenizer, saved as a normal model folder (tests, benchmarks)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(base: Path, out: Path, seed: int, untrained: bool = False) -> Path:
    """A LoRA adapter with random non-zero B matrices (B=0 at init would make it a no-op), A and B drawn from `seed`;
    `untrained` keeps PEFT's B = 0: an adapter that changes nothing, as one saved before any training step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)  # A too: PEFT draws it from the global RNG, whatever ran before
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.empty(p.shape).uniform_(-1, 1, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name and not untrained:
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


# -------------------------------------------------------------------------------------------- projects
def project_overrides(root: Path | None = None, *items: str | dict, model=None, adapter=None, store=None) -> list[str]:
    """key=value overrides for load_config: every artifact path under `root` in the default layout, the base model,
    the adapter, the MLflow store, then `items` ("key=value" strings or {key: value} dicts; a later one wins).

    store: a tracking URI, (URI, artifact location), or a folder that holds mlflow.db and mlartifacts/."""
    from llmft.config import rebased_paths

    out = rebased_paths(root) if root is not None else []
    out += [f"model.base={model}"] if model is not None else []
    out += [f"paths.adapter={adapter}"] if adapter is not None else []
    if isinstance(store, Path):
        store = (f"sqlite:///{store / 'mlflow.db'}", store / "mlartifacts")
    uri, artifacts = store if isinstance(store, tuple) else (store, None)
    out += [f"tracking.uri={uri}"] if uri else []
    out += [f"tracking.artifact_location={artifacts}"] if artifacts else []
    for item in items:
        out += [f"{k}={v}" for k, v in item.items()] if isinstance(item, dict) else [item]
    return out


def project_config(root: Path | None = None, *items: str | dict, model=None, adapter=None, store=None):
    """The Config of project_overrides(...), with no params file."""
    from llmft.config import load_config

    return load_config(NO_PARAMS, project_overrides(root, *items, model=model, adapter=adapter, store=store))


def prepare_sample(out: Path, template: str = "llama2_chat") -> Path:
    """The embedded sample prepared into `out` (train/validation/test.jsonl, stats.json; data.json beside it)."""
    from llmft import data

    data.prepare(project_config(None, f"paths.data={out}", f"paths.data_metrics={out.parent / 'data.json'}",
                                "data.stats_tokenizer=false", f"data.template={template}"))
    return out


def dvc_project(root: Path, params: dict[str, dict] | None = None) -> Path:
    """A git + DVC project in `root`: this checkout's dvc.yaml, params.yaml, .gitignore, .dvcignore and src/,
    committed. `params`: {block: {key: value}} set in params.yaml first (the token-length stats are off: they
    need the embedded model)."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"]["stats_tokenizer"] = False
    for block, values in (params or {}).items():
        p[block] = {**p.get(block, {}), **values}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "init", cwd=root)
    return root


# ---------------------------------------------------------------------------------------------- stages
def train_overrides(tmp: Path, model: Path, processed: Path, uri: str, **extra) -> list[str]:
    """A short train run on `processed` (Llama-2 chat format) whose outputs land in `tmp`: adapter/, ckpt/,
    train.json, plots/, run_id.txt. `extra`: {"train.max_steps": 4, ...}."""
    ov = {"model.base": model, "paths.data": processed, "data.template": "llama2_chat",
          "paths.adapter": tmp / "adapter", "paths.checkpoints": tmp / "ckpt", "paths.train_metrics": tmp / "train.json",
          "paths.train_plots": tmp / "plots", "train.max_steps": 6, "train.batch_size": 4, "train.max_length": 128,
          "train.logging_steps": 1, "train.eval_steps": 3, "train.save_steps": 3, "train.learning_rate": 1e-3,
          "train.max_train_rows": 48, "train.max_eval_rows": 8, "train.warmup_ratio": 0.0,
          "tracking.uri": uri, "paths.run_id": tmp / "run_id.txt", "tracking.artifact_location": tmp.parent / "art"}
    return project_overrides(None, ov, extra)


def run_train(tmp, model, processed, uri, **extra) -> dict:
    from llmft import train
    from llmft.config import load_config

    train.train(load_config("none.yaml", train_overrides(tmp, model, processed, uri, **extra)))
    return json.loads((tmp / "train.json").read_text())


def adapter_weights(tmp: Path) -> dict:
    """The tensors of the adapter a train_overrides run wrote."""
    from safetensors.torch import load_file

    return load_file(tmp / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def registry_config(root: Path, store, base: Path, adapter: Path, name: str, metric: str = "test_loss.tuned"):
    """A config registering as `name` in `store` (see project_overrides), with the pipeline's run opened as `train`
    opens it (its id written for later stages)."""
    from llmft import tracking

    cfg = project_config(root, f"tracking.experiment=test-{name}", "evaluate.generation.max_new_tokens=8",
                         f"register.model_name={name}", f"register.metric={metric}", model=base, adapter=adapter,
                         store=store)
    with tracking.start_run(cfg, new=True):
        pass
    return cfg


def write_eval(cfg, tuned) -> None:
    """An eval table whose register.metric row has `tuned` as the tuned value (mt_bench skipped)."""
    from llmft import io, metrics

    ref = metrics.parse(cfg.register.metric)
    row = {"base": 3.0, "tuned": tuned, "delta": None, "ci95": [0, 1], "n": 4,
           "higher_is_better": bool(metrics.known_higher_is_better(ref))}
    io.write_json(Path(cfg.paths.eval_dir) / "table.json",
                  {ref.row: row, "mt_bench": {"status": "skipped", "reason": "no judge"}})


def register_with(cfg, tuned=None, adapter: Path | None = None) -> dict:
    from llmft import registry

    if tuned is not None:
        write_eval(cfg, tuned)
    if adapter is not None:
        cfg.paths.adapter = str(adapter)
    result = registry.register(cfg)
    assert json.loads(Path(cfg.paths.register_metrics).read_text()) == json.loads(json.dumps(result))
    return result


def champion_version(name: str) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def version_tags(name: str, version: int) -> dict:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, str(version)).tags


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, enable_gqa=False):
    """torch's varlen_attn signature on the CPU: [T, H, D] in and out; every document attends causally to itself
    only, through sdpa (the kernels need CUDA)."""
    import torch
    import torch.nn.functional as F

    assert torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        q1, k1, v1 = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1)
    return out


def packed(lengths, heads, kv_heads, dim=8):
    """transformers' layout for one packed row: query [1, H, T, D], key/value [1, Hkv, T, D]; the boundaries."""
    import torch

    g = torch.Generator().manual_seed(0)
    t = sum(lengths)
    q, k, v = (torch.randn(1, h, t, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def show_result(path) -> dict:
    """FastChat's own show_result (single mode) on a model_judgment file, its printed tables read back:
    {(model, turn or 'all'): score}."""
    import argparse
    import io
    import re

    from fastchat.llm_judge.show_result import display_result_single

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        display_result_single(argparse.Namespace(input_file=str(path), bench_name="mt_bench", model_list=None,
                                                 judge_model="stand-in"))
    scores = {}
    for line in out.getvalue().splitlines():
        if m := re.fullmatch(r"(base|tuned)\s+([12])\s+([\d.]+)", line.strip()):
            scores[(m[1], int(m[2]))] = float(m[3])
        elif m := re.fullmatch(r"(base|tuned)\s+([\d.]+)", line.strip()):
            scores[(m[1], "all")] = float(m[2])
    return scores


# ----------------------------------------------------------------------------------------- reliability
# The harness of test_reliability.py and test_reliability_long.py: real `dvc repro` in a git + DVC project on the
# tiny model, processes killed with SIGKILL (their whole group), a dummy judge key that must appear nowhere.
KEY = f"sk-reliability-{uuid.uuid4().hex}"  # the dummy judge key: it must not be written anywhere
# Metrics of a run that differ between runs by nature (timings, memory, where it resumed from).
VOLATILE = {"runtime_s", "tokens_per_s", "steady_tokens_per_s", "peak_rss_gib", "peak_gpu_gib", "resumed_from"}
METRICS = ("metrics/data.json", "metrics/train.json", "metrics/eval.json", "metrics/register.json")


def _logs(project: Path) -> Path:
    return project.parent / f"{project.name}-logs"  # beside the project: grepped for the key later


def project_sh(*cmd, cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """sh in a reliability project: the dummy key in the environment, the output kept beside the project."""
    return sh(*cmd, cwd=cwd, env=child_env(cwd, OPENAI_API_KEY=KEY), check=check, timeout=timeout, log_dir=_logs(cwd))


def start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """A process in its own group (DVC and the stage it runs), output to a log beside the project."""
    logs = _logs(cwd)
    logs.mkdir(exist_ok=True)
    log = logs / f"{time.monotonic_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(cwd, OPENAI_API_KEY=KEY), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def kill_when(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 600) -> float:
    """SIGKILL the whole process group as soon as `ready()` holds; returns when it happened (s after the call)."""
    import pytest

    t0 = deadline = time.monotonic()
    deadline += timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process ended (rc {proc.returncode}) before the kill point:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        assert time.monotonic() < deadline, f"{what}: kill point not reached in {timeout} s"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - t0


def log_has(log: Path, text: str):
    return lambda: text in log.read_text(errors="replace")


def comparable(project: Path) -> dict:
    """The stage metrics files, without what differs between runs by nature."""
    out = {}
    for name in METRICS:
        data = json.loads((project / name).read_text())
        out[name] = {k: v for k, v in data.items() if k not in VOLATILE}
    return out


def store_states(uri: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(run id, status) of every run, and (model id, status) of every logged model, in every experiment."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = [(r.info.run_id, r.info.status) for r in client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000)]
    models = [(m.model_id, str(getattr(m.status, "value", m.status))) for m in client.search_logged_models(exps)]
    return runs, models


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def dolly_with_enormous_rows(path: Path) -> Path:
    """Dolly-style rows plus two enormous ones (a 1 MB response, a 200 KB context): prepare must keep them and
    train truncate them. Tokenising them for the length stats also keeps prepare writing for seconds."""
    import fixtures

    fixtures.write_dolly(path, n=40)
    big = " ".join(f"w{i % 997}" for i in range(220_000))  # ~1 MB
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "Repeat the long text.", "context": "", "response": big,
                            "category": "creative_writing"}) + "\n")
        f.write(json.dumps({"instruction": "Summarise the text.", "context": big[:200_000], "response": "It repeats words.",
                            "category": "summarization"}) + "\r\n")  # a CRLF line too
    return path


def reliability_project(root: Path, model: Path, bench: dict, judge_url: str, source: Path) -> Path:
    """The pipeline on the tiny model (a dvc_project), judged by the stand-in judge (mt_bench)."""
    return dvc_project(root, {
        "data": {"source": str(source), "template": "llama2_chat", "stats_tokenizer": True},
        "model": {"base": str(model)},
        "train": dict(max_steps=4, batch_size=4, max_length=96, eval_steps=2, save_steps=2, max_eval_rows=8,
                      logging_steps=1),
        "evaluate": {"benchmarks": ["test_loss", "rouge", "mt_bench"], "test_rows": 8, "rouge_rows": 2, "mt_bench_rows": 2,
                     "mt_bench_data": str(bench["mt_bench"]), "bootstrap_samples": 200,
                     "generation": {"max_new_tokens": 4, "batch_size": 2},
                     "judge": {"model": "stand-in-judge", "base_url": judge_url, "max_retries": 1}}})


def undisturbed(root: Path, model: Path, bench: dict, judge_url: str, source: Path, monkeypatch) -> Path:
    """The same pipeline, run once without faults: each verb in this process, in stage order (as dvc repro
    would; saves the interpreter start-ups on 2 cores)."""
    import mlflow

    from llmft import data, registry, train
    from llmft.config import load_config
    from llmft.evaluate import evaluate

    project = reliability_project(root, model, bench, judge_url, source)
    monkeypatch.chdir(project)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    try:
        cfg = load_config("params.yaml")
        for verb in (data.prepare, train.train, evaluate, registry.register):  # (report: nothing to compare)
            verb(cfg)
    finally:
        mlflow.set_tracking_uri(None)
    return project


def assert_no_half_written(project: Path) -> None:
    """Every output is whole: the split files parse line by line, JSON files parse, the PDF ends. What a killed
    write left (llmft's temporary names, cleaned when the stage next runs; DVC may instead restore the output
    from its run cache) is ignored by git and DVC, so it is never committed or hashed."""
    leftovers = [str(p.relative_to(project)) for p in project.rglob("*llmft-tmp*")]
    if leftovers:
        ignored = project_sh("git", "check-ignore", *leftovers, cwd=project).stdout.split()
        assert sorted(ignored) == sorted(leftovers), (leftovers, ignored)
        assert not project_sh("dvc", "status", cwd=project).stdout.count("llmft-tmp")
    for split in ("train", "validation", "test"):
        for line in (project / "data/processed" / f"{split}.jsonl").read_text().splitlines():
            json.loads(line)
    for f in [*project.glob("metrics/*.json"), *project.rglob("results/eval/*.json")]:
        json.loads(f.read_text())
    assert (project / "reports/report.pdf").read_bytes().rstrip().endswith(b"%%EOF")


def race_overrides(root: Path, store: Path, model: Path, adapter: Path, name: str) -> list[str]:
    return project_overrides(root, f"tracking.experiment={name}", "evaluate.generation.max_new_tokens=8",
                             f"register.model_name={name}", "register.metric=test_loss.tuned",
                             model=model, adapter=adapter, store=store)


# Imports first (seconds), then waits for the barrier file: both processes then register at the same moment.
AT_BARRIER = """import os, runpy, sys, time
import mlflow.pyfunc, peft, llmft.registry
open(sys.argv[1] + f".ready.{os.getpid()}", "w").close()
deadline = time.time() + 300
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.001)
sys.argv = ["llmft", *sys.argv[2:]]
runpy.run_module("llmft", run_name="__main__")
"""


def race_registers(root: Path, store: Path, model: Path, adapters: list[Path], values: list[float], name: str) -> list[dict]:
    """One `python -m llmft register` per candidate, each with its own pipeline run and eval table, all on one
    store, released together by a barrier file. Returns their register.json records."""
    from llmft import tracking
    from llmft.config import load_config

    barrier = root / f"go-{uuid.uuid4().hex[:6]}"
    procs = []
    for i, (adapter, value) in enumerate(zip(adapters, values)):
        d = root / f"{barrier.name}-{i}"
        d.mkdir(parents=True)
        ov = race_overrides(d, store, model, adapter, name)
        cfg = load_config(d / "none.yaml", ov)
        with tracking.start_run(cfg, new=True):
            pass  # the candidate's pipeline run, as `train` opens it
        write_eval(cfg, value)
        procs.append((start([sys.executable, "-c", AT_BARRIER, str(barrier), "register", *ov, "--params",
                             str(d / "none.yaml")], d), d))
    deadline = time.monotonic() + 300
    while len(list(root.glob(f"{barrier.name}.ready.*"))) < len(procs):
        assert time.monotonic() < deadline and all(pr.poll() is None for (pr, _), _ in procs), \
            [log.read_text()[-2000:] for (_, log), _ in procs]
        time.sleep(0.05)
    barrier.touch()
    for (proc, log), _ in procs:
        finish(proc, log, timeout=300)
    return [json.loads((d / "metrics/register.json").read_text()) for _, d in procs]


def check_registry(uri: str, name: str, records: list[dict]) -> str:
    """Exactly one champion, the best candidate; each version's tags tell one consistent history: every
    promotion was made against the champion of its moment, every refusal against a champion at least as good.
    Returns the champion's version."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name = '{name}'")}
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    value = {v: float(t["promotion.candidate"]) for v, t in versions.items()}
    assert value[champion] == min(value.values()), (champion, value)
    # the chain of promotions: None -> ... -> champion, each made over the previous holder
    promoted = {t["promotion.champion_version"]: v for v, t in versions.items() if t["promotion.decision"] == "promoted"}
    chain, holder = [], "None"
    while holder in promoted:
        holder = promoted[holder]
        chain.append(holder)
    assert chain and chain[-1] == champion and len(chain) == len(promoted), (promoted, chain)
    for later, earlier in zip(chain[1:], chain):
        assert value[later] < value[earlier]
    for v, t in versions.items():
        assert t["promotion.decision"] in ("promoted", "not_promoted") and t.get("llmft.registered") == "true", (v, t)
        if t["promotion.decision"] == "not_promoted":
            assert t["promotion.champion_version"] in chain and value[v] >= value[t["promotion.champion_version"]]
    for r in records:  # each process's register.json agrees with its version's tags
        t = versions[str(r["version"])]
        assert (r["decision"], r["reason"], str(r["champion_version"])) == \
            (t["promotion.decision"], t["promotion.reason"], t["promotion.champion_version"])
    return champion


def seed_champion(root: Path, store: Path, model: Path, adapter: Path, name: str, value: float) -> dict:
    """A first version registered in this process: the champion the racers compete against."""
    import mlflow

    from llmft import registry, tracking
    from llmft.config import load_config

    root.mkdir(parents=True)
    cfg = load_config(root / "none.yaml", race_overrides(root, store, model, adapter, name))
    with tracking.start_run(cfg, new=True):
        pass
    write_eval(cfg, value)
    try:
        return registry.register(cfg)
    finally:
        mlflow.set_tracking_uri(None)
