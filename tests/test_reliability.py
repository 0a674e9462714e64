"""Reliability (issue 14), the part every push runs: kill -9 inside each pipeline stage then `dvc repro`, two
registers promoting at once, two `dvc repro` at once, load and bad requests on the served champion, bad input
through the CLI, a dummy API key that must appear nowhere, and the trust switches (pickles, remote code, hosts).

Everything is real: `dvc repro` in a temporary git + DVC project on the tiny model, processes killed with
SIGKILL (their whole process group: DVC and the stage), the SQLite MLflow store, `mlflow models serve` on
127.0.0.1, the stand-in judge on 127.0.0.1. The long part (many seeded kills, tune too) is
test_reliability_long.py (`make test-long`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import fixtures
from judge_server import JudgeServer

ROOT = Path(__file__).resolve().parents[1]
KEY = f"sk-reliability-{uuid.uuid4().hex}"  # the dummy judge key: it must not be written anywhere
# Metrics of a run that differ between runs by nature (timings, memory, where it resumed from).
VOLATILE = {"runtime_s", "tokens_per_s", "steady_tokens_per_s", "peak_rss_gib", "peak_gpu_gib", "resumed_from"}
METRICS = ("metrics/data.json", "metrics/train.json", "metrics/eval.json", "metrics/register.json")


# ----------------------------------------------------------------------------------------------- helpers
def env_for(project: Path, **extra) -> dict:
    src = project / "src" if (project / "src").is_dir() else ROOT / "src"  # a DVC project's copy, or this checkout's
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(src),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OPENAI_API_KEY": KEY, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", **extra}


def sh(*cmd, cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=timeout)
    logs = cwd.parent / f"{cwd.name}-logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{time.monotonic_ns()}.log").write_text(res.stdout + res.stderr)  # grepped for the key later
    assert not check or res.returncode == 0, f"{cmd}: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res


def start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """A process in its own group (DVC and the stage it runs), output to a log beside the project."""
    logs = cwd.parent / f"{cwd.name}-logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{time.monotonic_ns()}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env_for(cwd), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
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


def dolly_with_enormous_rows(path: Path) -> Path:
    """Dolly-style rows plus two enormous ones (a 1 MB response, a 200 KB context): prepare must keep them and
    train truncate them. Tokenising them for the length stats also keeps prepare writing for seconds."""
    fixtures.write_dolly(path, n=40)
    big = " ".join(f"w{i % 997}" for i in range(220_000))  # ~1 MB
    with path.open("a") as f:
        f.write(json.dumps({"instruction": "Repeat the long text.", "context": "", "response": big,
                            "category": "creative_writing"}) + "\n")
        f.write(json.dumps({"instruction": "Summarise the text.", "context": big[:200_000], "response": "It repeats words.",
                            "category": "summarization"}) + "\r\n")  # a CRLF line too
    return path


def make_project(root: Path, model: Path, bench: dict, judge_url: str, source: Path) -> Path:
    """A git + DVC project: the real dvc.yaml and params.yaml (this checkout's src/), on the tiny model, judged
    by the stand-in judge (mt_bench), with the dummy key in the environment of every process."""
    import yaml

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"].update(source=str(source), template="llama2_chat")
    p["model"]["base"] = str(model)
    p["train"].update(max_steps=4, batch_size=4, max_length=96, eval_steps=2, save_steps=2, max_eval_rows=8, logging_steps=1)
    p["evaluate"] = {"benchmarks": ["test_loss", "rouge", "mt_bench"], "test_rows": 8, "rouge_rows": 2, "mt_bench_rows": 2,
                     "mt_bench_data": str(bench["mt_bench"]), "bootstrap_samples": 200,
                     "generation": {"max_new_tokens": 4, "batch_size": 2},
                     "judge": {"model": "stand-in-judge", "base_url": judge_url, "max_retries": 1}}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "init", cwd=root)
    return root


def undisturbed(root: Path, model: Path, bench: dict, judge_url: str, source: Path, monkeypatch) -> Path:
    """The same pipeline, run once without faults: each verb in this process, in stage order (as dvc repro
    would; saves the interpreter start-ups on 2 cores)."""
    import mlflow

    from llmft import data, registry, train
    from llmft.config import load_config
    from llmft.evaluate import evaluate

    project = make_project(root, model, bench, judge_url, source)
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
        ignored = sh("git", "check-ignore", *leftovers, cwd=project).stdout.split()
        assert sorted(ignored) == sorted(leftovers), (leftovers, ignored)
        assert not sh("dvc", "status", cwd=project).stdout.count("llmft-tmp")
    for split in ("train", "validation", "test"):
        for line in (project / "data/processed" / f"{split}.jsonl").read_text().splitlines():
            json.loads(line)
    for f in [*project.glob("metrics/*.json"), *project.rglob("results/eval/*.json")]:
        json.loads(f.read_text())
    assert (project / "reports/report.pdf").read_bytes().rstrip().endswith(b"%%EOF")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def judge():
    with JudgeServer() as s:
        yield s


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return dolly_with_enormous_rows(tmp_path_factory.mktemp("source") / "dolly_big.jsonl")


# ------------------------------------------------------------------------------------- kill -9 in each stage
def test_kill_in_every_stage_then_repro_matches_an_undisturbed_run(tmp_path, tiny_model_dir, bench_data, judge, source,
                                                                    monkeypatch, capfd):
    """prepare mid-write, train mid-save of its last checkpoint, evaluate mid-generation, register mid-logging,
    register after registering (waiting for the promotion lock): after each kill `dvc repro` picks up, and the
    last one ends with the metrics of an undisturbed run, no half-written output, no run left RUNNING, one
    champion. A second `dvc repro` started meanwhile is refused by DVC's lock and corrupts nothing. The dummy
    judge key, sent to the judge on every request, is nowhere in what either run wrote."""
    from mlflow import MlflowClient

    from llmft import registry

    base = undisturbed(tmp_path / "base", tiny_model_dir, bench_data, judge.base_url, source, monkeypatch)
    expected = comparable(base)
    monkeypatch.chdir(tmp_path)
    p = make_project(tmp_path / "killed", tiny_model_dir, bench_data, judge.base_url, source)
    uri = f"sqlite:///{p / 'mlflow.db'}"
    kills = {}

    # 1. prepare, while it writes its temporary output folder (the token-length stats take seconds)
    proc, log = start(["dvc", "repro"], p)
    kills["prepare"] = kill_when(proc, log, lambda: any(p.glob("data/.processed.*/train.jsonl")), "prepare mid-write")
    assert not (p / "data/processed").exists(), "the output folder appears whole or not at all"

    # 2. train, while it saves its last checkpoint (checkpoint-2 is complete): the rerun resumes from checkpoint-2
    proc, log = start(["dvc", "repro"], p)
    kills["train"] = kill_when(proc, log, lambda: (p / "models/checkpoints/checkpoint-4").exists(), "train mid-save")
    assert "Stage 'prepare' didn't change" not in log.read_text(), "prepare was killed: it must run again"
    assert not list(p.glob("data/.processed.*")), "the next prepare removed the killed one's temporary folder"
    assert not (p / "models/adapter").exists()

    # 3. evaluate, while it generates answers (after the test loss, during ROUGE / MT-Bench generation)
    proc, log = start(["dvc", "repro"], p)
    kills["evaluate"] = kill_when(proc, log, log_has(log, "evaluate: test_loss done"), "evaluate mid-generation")
    assert "train: resuming from models/checkpoints/checkpoint-2" in log.read_text()
    assert not (p / "metrics/eval.json").exists()

    # 4. register, while it uploads the model's files
    proc, log = start(["dvc", "repro"], p)
    kills["register"] = kill_when(proc, log, lambda: any(f.is_file() for f in p.glob("mlartifacts/models/*/artifacts/**/*")),
                                  "register mid-logging")
    run_id = (p / "metrics/run_id.txt").read_text().strip()
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING", "the killed register held the run open"

    # 5. register again, killed once its version exists, while it waits for the promotion lock (held here, as by a
    # racing register): the rerun must finish that version, not add a second one that ties with it
    lock = open(p / ".llmft-promote-llmft.lock", "w")
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc, log = start(["dvc", "repro"], p)
        kills["register (registered)"] = kill_when(
            proc, log, lambda: bool(MlflowClient(uri).search_model_versions("name = 'llmft'")), "register waiting")
    finally:
        lock.close()
    assert "tracking: marked 1 run(s) FAILED whose process had died" in log.read_text()

    # 6. the rerun that completes; a second `dvc repro` meanwhile is refused by DVC's lock
    proc, log = start(["dvc", "repro"], p)
    deadline = time.monotonic() + 600
    while "Running stage 'register'" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    second = sh("dvc", "repro", cwd=p, check=False)
    out = finish(proc, log)
    # DVC refuses with its repo lock (between stages) or its per-path lock (while a stage runs), naming the holder
    assert second.returncode != 0, second.stdout + second.stderr
    assert "Unable to acquire lock. Most likely another DVC process is running" in second.stderr or \
        (f"is busy, it is being blocked by:\n  (PID {proc.pid}): " in second.stderr), second.stderr
    assert "Running stage" not in second.stdout
    assert "register: finishing v1, which a killed register of this run left unfinished" in out
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=p).stdout, "nothing is corrupted"

    # the same results as the undisturbed run, whole outputs, every run closed, one champion, tags consistent
    assert comparable(p) == expected
    assert (p / "models/adapter/adapter_config.json").read_bytes() == (base / "models/adapter/adapter_config.json").read_bytes()
    assert_no_half_written(p)
    runs, models = store_states(uri)
    assert all(s in ("FINISHED", "FAILED", "KILLED") for _, s in runs), runs
    assert dict(runs)[run_id] == "FINISHED" and "PENDING" not in dict(models).values(), models
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'llmft'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["promotion.decision"] == "promoted"
    assert versions[0].tags[registry.DONE_TAG] == "true"
    assert str(client.get_model_version_by_alias("llmft", "champion").version) == "1"
    assert json.loads((p / "metrics/register.json").read_text())["version"] == 1
    assert "FAILED" in dict(models).values(), "the model the killed register was uploading is marked FAILED"
    data = json.loads((p / "metrics/data.json").read_text())
    assert data["rows_in"] == 42 and data["dropped"] == 0 and data["train_tokens_max"] > 200_000, "enormous rows kept"
    assert json.loads((p / "metrics/train.json").read_text())["tokens_seen"] <= 4 * 4 * 96, "and truncated in training"

    # secrets: the key went to the judge on every request, and is in nothing either run wrote or printed
    assert judge.headers and all(h.get("authorization") == f"Bearer {KEY}" for h in judge.headers)
    printed = capfd.readouterr()
    written = [f for d in (base, p, tmp_path / "killed-logs", tmp_path / "base-logs") if d.exists()
               for f in d.rglob("*") if f.is_file() and "src" not in f.relative_to(d).parts[:1]]
    assert len(written) > 100 and any(f.name == "mlflow.db" for f in written) and any(f.suffix == ".pdf" for f in written)
    leaks = [str(f) for f in written if KEY.encode() in f.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
    assert KEY not in printed.out + printed.err
    from pypdf import PdfReader

    text = "\n".join(page.extract_text() for page in PdfReader(str(p / "reports/report.pdf")).pages)
    assert "Results" in text and KEY not in text and "sk-reliability" not in text
    with capfd.disabled():
        print(f"\nreliability: {len(kills)} kills survived (" + ", ".join(f"{k} after {v:.1f}s" for k, v in kills.items())
              + f"); {len(written)} files and {len(judge.headers)} judge requests checked for the key")


# --------------------------------------------------------------------------------------------- races
def race_cfg(root: Path, store: Path, model: Path, adapter: Path, name: str) -> list[str]:
    from llmft.config import rebased_paths

    return [*rebased_paths(root), f"model.base={model}", f"paths.adapter={adapter}",
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"tracking.artifact_location={store / 'mlartifacts'}",
            f"tracking.experiment={name}", "evaluate.generation.max_new_tokens=8", f"register.model_name={name}",
            "register.metric=test_loss.tuned"]


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
    from test_registry import write_eval

    barrier = root / f"go-{uuid.uuid4().hex[:6]}"
    procs = []
    for i, (adapter, value) in enumerate(zip(adapters, values)):
        d = root / f"{barrier.name}-{i}"
        d.mkdir(parents=True)
        ov = race_cfg(d, store, model, adapter, name)
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
    from test_registry import write_eval

    root.mkdir(parents=True)
    cfg = load_config(root / "none.yaml", race_cfg(root, store, model, adapter, name))
    with tracking.start_run(cfg, new=True):
        pass
    write_eval(cfg, value)
    try:
        return registry.register(cfg)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def raced(tmp_path_factory, tiny_model_dir):
    """A champion (test loss 1.5), then two registers released together: one worse (2.0), one better (1.0)."""
    from test_registry import make_adapter

    root = tmp_path_factory.mktemp("race")
    store = root / "store"
    store.mkdir()
    adapters = [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=30 + i) for i in range(2)]
    name = "race"
    first = seed_champion(root / "seed", store, tiny_model_dir, adapters[0], name, 1.5)
    racers = race_registers(root, store, tiny_model_dir, adapters, [2.0, 1.0], name)
    return f"sqlite:///{store / 'mlflow.db'}", name, [first, *racers], adapters


def test_racing_registers_end_with_one_champion_and_consistent_tags(raced):
    uri, name, records, _ = raced
    assert [r["version"] for r in records[:1]] == [1] and sorted(r["version"] for r in records[1:]) == [2, 3]
    better = next(r for r in records if r["candidate"] == 1.0)
    worse = next(r for r in records if r["candidate"] == 2.0)
    assert check_registry(uri, name, records) == str(better["version"])
    assert better["decision"] == "promoted" and worse["decision"] == "not_promoted"  # worse than 1.5 in either order


# --------------------------------------------------------------------------------------- load on the server
def test_served_champion_under_load_and_bad_requests(raced, tmp_path):
    """8 clients x 5 requests against `mlflow models serve` of the race's champion, with an oversized or
    malformed request from each client in between: every good request answered, every bad one a 4xx, and the
    server still up afterwards. Latency percentiles are printed for the README."""
    from test_serving import free_port, start_process, stop_process, wait_until_up

    uri, name = raced[0], raced[1]
    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=uri,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = start_process([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-t", "120"], log, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    json_h = {"Content-Type": "application/json"}
    good = lambda i: {"dataframe_records": [{"instruction": f"Name {i} colours."}, {"instruction": "Say hi.", "context": "x"}],
                      "params": {"max_new_tokens": 8}}  # noqa: E731
    bad = [  # (body, content type) over the default limits (64 rows, 16000 characters, 2048 new tokens) or malformed
        (json.dumps({"dataframe_records": [{"instruction": "x"}] * 65}), "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x" * 16001}]}), "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": 2049}}), "application/json"),
        ("", "application/json"),
        ("[1, 2, 3]", "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x"}]}), "text/plain"),
        ("{" * 200_000, "application/json"),  # 200 KB of nesting
        (json.dumps({"dataframe_records": [{"instruction": "\udcff" * 4 + "x" * 4_000_000}]}, ensure_ascii=True),
         "application/json"),  # 4 MB, a lone surrogate
    ]
    try:
        wait_until_up(f"{url}/ping", proc, log)

        def client(i: int) -> list[tuple[str, int, float]]:
            out = []
            with requests.Session() as s:
                for j in range(5):
                    t = time.perf_counter()
                    r = s.post(f"{url}/invocations", data=json.dumps(good(j)), headers=json_h, timeout=120)
                    ok = r.ok and len(r.json()["predictions"]) == 2
                    out.append(("good", 200 if ok else r.status_code, time.perf_counter() - t))
                    if j == 2:
                        body, ctype = bad[i]
                        r = s.post(f"{url}/invocations", data=body.encode("utf-8", "surrogatepass"),
                                   headers={"Content-Type": ctype}, timeout=120)
                        out.append((f"bad{i}", r.status_code, 0.0))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = [x for part in pool.map(client, range(8)) for x in part]
        wall = time.perf_counter() - t0
        served = [lat for kind, status, lat in results if kind == "good" and status == 200]
        failed = [(kind, status) for kind, status, _ in results if kind == "good" and status != 200]
        refused = {kind: status for kind, status, _ in results if kind != "good"}
        assert not failed and len(served) == 40, failed
        assert all(400 <= s < 500 for s in refused.values()), refused
        assert requests.get(f"{url}/ping", timeout=10).ok and proc.poll() is None
        assert requests.post(f"{url}/invocations", data=json.dumps(good(0)), headers=json_h, timeout=120).ok
        q = statistics.quantiles(served, n=100)
        print(f"\nreliability: load {len(served)} requests (8 clients x 5, 2 rows, 8 new tokens) in {wall:.1f}s, 0 failed; "
              f"p50 {statistics.median(served) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; {len(refused)} bad requests "
              f"refused with {sorted(set(refused.values()))}")
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------------------------- bad input
def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llmft", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}




BAD_FILES = [  # (file, bytes, the error's start): malformed, wrong types, missing columns, only empty, not UTF-8, ...
    ("malformed.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": "q2", "resp\n', "malformed.jsonl:2: malformed JSON"),
    ("types.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": ["q"], "response": "a"}\n',
     "types.jsonl:2: field 'instruction' must be a string, got list"),
    ("columns.jsonl", b'{"instruction": "q", "response": "a"}\n{"prompt": "q", "answer": "a"}\n',
     "columns.jsonl:2: missing column 'instruction'"),
    ("empty.jsonl", b'{"instruction": "q", "response": ""}\n{"instruction": "r", "response": "  \\n "}\n',
     "no usable rows after cleaning (dropped {'empty_response': 2"),
    ("latin1.jsonl", b'{"instruction": "q", "response": "a"}\r\n{"instruction": "caf\xe9", "response": "a"}\r\n',
     "latin1.jsonl:2: not UTF-8 (byte 0xe9"),
    ("records.json", b'\xef\xbb\xbf[{"instruction": "q", "response": "a"}, "row"]', "records.json: record 2: expected a JSON object"),
    ("header.csv", b"\xef\xbb\xbfinstruction;response\r\nq;a\r\n", "header.csv:line 2: missing column 'instruction'"),
    ("notes.txt", b"instruction: q\n", "in/notes.txt has unsupported extension '.txt' (use .jsonl"),
]


def test_bad_data_files_exit_nonzero_and_keep_the_previous_outputs(tmp_path):
    """Each bad file through `llmft prepare`: exit 2, one line naming the file and line, no traceback, and the
    last good outputs (data/processed, metrics/data.json) byte for byte as they were."""
    (tmp_path / "params.yaml").write_text("data:\n  stats_tokenizer: false\n")
    assert cli("prepare", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path)
    (tmp_path / "in").mkdir()
    for name, body, message in BAD_FILES:
        (tmp_path / "in" / name).write_bytes(body)
        res = cli("prepare", f"data.source=in/{name}", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one clear line
        assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("in/")} == before, name
    print(f"\nreliability: {len(BAD_FILES)} bad data files rejected")


def test_bad_params_are_all_reported_at_once_exit_nonzero_and_touch_nothing(tmp_path):
    """A BOM, CRLF line ends, and five mistakes: every one named with its line and key, in one error, exit 2, and
    the outputs of the last good run untouched; a params file that is not UTF-8 is a clean error too."""
    outputs = {"models/adapter/adapter_model.safetensors": b"weights", "metrics/train.json": b'{"train_loss": 1.0}\n'}
    for rel, data in outputs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    text = ("train:\n  lora:\n    r: 0\n    rank_dropout: 0.1\n  learning_rate: -0.001\n  batch_size: eight\n"
            "data:\n  splits: [0.7, 0.2, 0.2]\n")
    (tmp_path / "params.yaml").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    res = cli("train", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for expected in ("params.yaml:3: 'train.lora.r' must be >= 1", "params.yaml:4: unknown key 'train.lora.rank_dropout'",
                     "params.yaml:5: 'train.learning_rate' must be > 0",
                     "params.yaml:6: 'train.batch_size' = 'eight' is not int",
                     "params.yaml:8: 'data.splits' must be three fractions in [0, 1] summing to 1"):
        assert expected in res.stderr, (expected, res.stderr)
    (tmp_path / "params.yaml").write_bytes(b"train:\n  max_steps: 2\n# r\xe9sum\xe9\n")
    res = cli("train", cwd=tmp_path)
    assert res.returncode == 2 and "params.yaml:3: not UTF-8 (byte 0xe9)" in res.stderr and "Traceback" not in res.stderr
    assert all((tmp_path / rel).read_bytes() == data for rel, data in outputs.items())
    assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file()) == sorted([*outputs, "params.yaml"])


def test_prompt_longer_than_the_context_is_answered_not_a_crash(tiny_model_dir):
    """A 1 MB instruction in the test split asked for a 40 GB attention mask and killed evaluate after training:
    the prompt now keeps its end, as much as fits the context; prompts that fit are unchanged."""
    from llmft import generate, models, templates
    from llmft.config import GenerationConfig

    model, tok = models.load_with_tokenizer(models.config_for(str(tiny_model_dir)))
    gen = GenerationConfig(max_new_tokens=4, batch_size=2)
    short = templates.render_prompt("llama2_chat", [("Name a colour.", None)])
    huge = templates.render_prompt("llama2_chat", [("Summarise: " + "word " * 250_000, None)])
    assert len(tok(huge).input_ids) > 100 * model.config.max_position_embeddings
    answers = generate.generate(model, tok, [huge, short], gen, progress=False)
    assert len(answers) == 2 and tok.truncation_side == "right" and tok.padding_side == "right"
    assert answers[1] == generate.generate(model, tok, [short], gen, progress=False)[0]


# ---------------------------------------------------------------------------------------------- trust
def code_model(src: Path, out: Path, model_type: str) -> Path:
    """A copy of the tiny model whose config maps to Python code shipped beside it; the code leaves a marker."""
    shutil.copytree(src, out)
    conf = json.loads((out / "config.json").read_text())
    conf.update(model_type=model_type, auto_map={"AutoConfig": "shipped.ShippedConfig",
                                                 "AutoModelForCausalLM": "shipped.ShippedModel"})
    (out / "config.json").write_text(json.dumps(conf))
    (out / "shipped.py").write_text(
        f"from pathlib import Path\nPath({str(out / 'RAN')!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class ShippedConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n")
    return out


def test_shipped_code_runs_only_with_trust_remote_code(tmp_path, tiny_model_dir):
    from llmft import models
    from llmft.config import load_config
    from llmft.errors import LlmftError

    known = code_model(tiny_model_dir, tmp_path / "known", "llama")
    cfg = load_config(tmp_path / "none.yaml", [f"model.base={known}"])
    assert cfg.model.trust_remote_code is False  # the default
    models.load_with_tokenizer(cfg)  # a known type: transformers' own classes
    assert not (known / "RAN").exists(), "the shipped code ran without model.trust_remote_code"
    trusted = load_config(tmp_path / "none.yaml", [f"model.base={known}", "model.trust_remote_code=true"])
    models.load_with_tokenizer(trusted)
    assert (known / "RAN").exists(), "the switch is what lets it run"

    unknown = code_model(tiny_model_dir, tmp_path / "unknown", "shipped_llama")
    with pytest.raises(LlmftError, match=r"'model.base' .* in its own Python code .* model.trust_remote_code=true"):
        load_config(tmp_path / "none.yaml", [f"model.base={unknown}"])
    res = cli("train", f"model.base={unknown}", cwd=tmp_path)
    assert res.returncode == 2 and "model.trust_remote_code=true" in res.stderr and "Traceback" not in res.stderr
    assert not (unknown / "RAN").exists()


def test_pickle_weights_load_only_with_allow_pickle(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from llmft import models
    from llmft.config import load_config
    from llmft.errors import LlmftError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")
    # transformers 5.23's own answer to use_safetensors=True here is an OSError that names no params key
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(pickled, use_safetensors=True)
    with pytest.raises(LlmftError, match=r"pytorch_model.bin\), and loading a pickle can run code: set model.allow_pickle=true"):
        load_config(tmp_path / "none.yaml", [f"model.base={pickled}"])
    res = cli("evaluate", f"model.base={pickled}", cwd=tmp_path)
    assert res.returncode == 2 and "model.allow_pickle=true" in res.stderr and "Traceback" not in res.stderr
    cfg = load_config(tmp_path / "none.yaml", [f"model.base={pickled}", "model.allow_pickle=true"])
    model, _ = models.load_with_tokenizer(cfg)
    ids = torch.tensor([[1, 450, 4996]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_servers_bind_127_0_0_1_unless_told_otherwise():
    """`make ui`, the README's serve command and the MLflow commands' own defaults listen on 127.0.0.1 only."""
    import click
    from mlflow.cli import cli as mlflow_cli

    assert re.search(r"^ui:.*\n\tmlflow ui .*--host 127\.0\.0\.1", (ROOT / "Makefile").read_text(), re.M)
    serve = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("mlflow models serve")]
    assert serve and all("-h 127.0.0.1" in line for line in serve), serve
    ctx = click.Context(mlflow_cli)
    commands = {"ui": mlflow_cli.get_command(ctx, "ui"), "server": mlflow_cli.get_command(ctx, "server"),
                "models serve": mlflow_cli.get_command(ctx, "models").get_command(ctx, "serve")}
    hosts = {name: next(p.default for p in cmd.params if p.name == "host") for name, cmd in commands.items()}
    assert hosts == dict.fromkeys(commands, "127.0.0.1")
    judge = JudgeServer()
    try:
        assert judge.httpd.server_address[0] == "127.0.0.1"
    finally:
        judge.httpd.server_close()
