"""Reliability, the long part (`make test-long`, about half an hour on 2 cores): kill -9 at seeded
random points across prepare, train, evaluate (generation and judging), register and tune, each followed by
`dvc repro` (or `llmft tune`) that completes; after every rerun no output is half-written, no MLflow run is left
RUNNING, and the metrics equal those of an undisturbed run. Then more racing registers and a heavier load on the
served champion. Each test prints a `reliability:` summary line (the README's figures).

    python -m pytest -q -s -m long tests/test_reliability_long.py
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from helpers import (assert_no_half_written, check_registry, comparable, dolly_with_enormous_rows, finish, log_has,
                     make_adapter, model_server, prepare_sample, project_overrides, project_sh, race_registers,
                     reliability_project, seed_champion, snapshot, start, store_states, undisturbed)

pytestmark = pytest.mark.long
SEED = 14


def stage_events(p: Path, log: Path) -> dict[str, list]:
    """Per stage, the kill points to draw from: (what, condition). A random delay is added after each."""
    started = lambda stage: log_has(log, f"Running stage '{stage}'")  # noqa: E731
    artifacts = lambda: any(f.is_file() for f in p.glob("mlartifacts/models/*/artifacts/**/*"))  # noqa: E731
    return {
        "prepare": [("start", started("prepare")), ("mid-write", lambda: any(p.glob("data/.processed.*/*.jsonl")))],
        "train": [("start", started("train")), ("model loaded", log_has(log, "train: starting")),
                  ("checkpoint-2 saving", lambda: (p / "models/checkpoints/checkpoint-2").exists()),
                  ("between checkpoints", lambda: (p / "models/checkpoints/checkpoint-2/trainer_state.json").exists()),
                  ("checkpoint-4 saving", lambda: (p / "models/checkpoints/checkpoint-4").exists())],
        "evaluate": [("start", started("evaluate")), ("test loss", log_has(log, "test loss [tuned]")),
                     ("generation", log_has(log, "evaluate: test_loss done")),
                     ("MT-Bench answers", log_has(log, "MT-Bench turn 1")),
                     ("judging", log_has(log, "MT-Bench judging")), ("logging", log_has(log, "evaluate: mt_bench done"))],
        "register": [("start", started("register")), ("mid-logging", artifacts),
                     ("registered", log_has(log, "Created version"))],
    }


def kill(proc: subprocess.Popen, stage_only: bool) -> str:
    """SIGKILL the stage's process alone (DVC sees it die and stops) or the whole group (DVC too)."""
    import psutil

    kids = []
    for c in psutil.Process(proc.pid).children(recursive=True) if stage_only else []:
        try:
            if "llmft" in " ".join(c.cmdline()):
                c.send_signal(signal.SIGKILL)
                kids.append(c)
        except psutil.Error:  # ended (or a zombie) meanwhile
            pass
    if not kids:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    return "stage" if kids else "group"


def wait_then_kill(proc, log, cond, delay: float, stage_only: bool, timeout: float = 900) -> str | None:
    """Kill once `cond()` holds and `delay` more seconds passed; None if the process ended first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            return None
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.002)
    end = time.monotonic() + delay
    while time.monotonic() < end:
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    return kill(proc, stage_only)


def check_clean(p: Path, expected: dict, uri: str, rounds_registered: bool) -> None:
    """After a completed rerun: DVC up to date, whole outputs, every run and logged model closed, the metrics of
    the undisturbed run, one champion (v1) with every later version a tie against it."""
    from mlflow import MlflowClient

    assert "Data and pipelines are up to date" in project_sh("dvc", "status", cwd=p).stdout
    assert_no_half_written(p)
    runs, models = store_states(uri)
    assert all(s in ("FINISHED", "FAILED", "KILLED") for _, s in runs), runs
    assert "PENDING" not in dict(models).values(), models
    got = comparable(p)
    reg, want = got.pop("metrics/register.json"), dict(expected)
    base_reg = want.pop("metrics/register.json")
    assert got == want
    same = ("model_name", "alias", "metric", "direction", "candidate")
    assert {k: reg[k] for k in same} == {k: base_reg[k] for k in same}
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("llmft", "champion").version) == "1"
    for v in client.search_model_versions("name = 'llmft'"):
        t = v.tags
        assert t.get("llmft.registered") == "true", (v.version, t)
        if str(v.version) != "1":
            assert (t["promotion.decision"], t["promotion.reason"], t["promotion.champion_version"]) == \
                ("not_promoted", "tie", "1"), (v.version, t)
    if rounds_registered:
        assert (reg["decision"], reg["reason"], reg["champion_version"]) == ("not_promoted", "tie", 1)


def bad_params_under_dvc(p: Path) -> None:
    """Bad params under `dvc repro`: train exits 2 naming file, line and key before any work, but DVC has already
    deleted the stage's outputs (it does before running any stage), the uncached metrics too. With params fixed,
    `dvc repro` re-exports the finished training (no step trained) to the same bytes, so nothing after it reruns."""
    params, adapter = (p / "params.yaml").read_bytes(), snapshot(p / "models/adapter")
    (p / "params.yaml").write_bytes(params.replace(b"  learning_rate: 0.0003\n", b"  learning_rate: -0.0003\n"))
    res = project_sh("dvc", "repro", cwd=p, check=False)
    line = params[:params.index(b"  learning_rate:")].count(b"\n") + 1
    assert res.returncode != 0 and f"params.yaml:{line}: 'train.learning_rate' must be > 0" in res.stdout + res.stderr
    assert not (p / "models/adapter").exists() and not (p / "metrics/train.json").exists()
    (p / "params.yaml").write_bytes(params)
    again = project_sh("dvc", "repro", cwd=p).stdout
    assert "training nothing" in again and all(f"Stage '{s}' didn't change" in again for s in ("evaluate", "register")), again
    assert snapshot(p / "models/adapter") == adapter


def test_twenty_kills_at_random_points_then_repro(tmp_path, tiny_model_dir, bench_data, judge, monkeypatch):
    rng = random.Random(SEED)
    source = dolly_with_enormous_rows(tmp_path / "dolly_big.jsonl")
    base = undisturbed(tmp_path / "base", tiny_model_dir, bench_data, judge.base_url, source, monkeypatch)
    expected = comparable(base)
    monkeypatch.chdir(tmp_path)
    p = reliability_project(tmp_path / "killed", tiny_model_dir, bench_data, judge.base_url, source)
    uri = f"sqlite:///{p / 'mlflow.db'}"
    finish(*start(["dvc", "repro"], p))
    check_clean(p, expected, uri, rounds_registered=False)

    kills, misses, registered = Counter(), 0, False
    plan = [s for s in ("prepare", "train", "evaluate", "register") for _ in range(5)]
    rng.shuffle(plan)
    for i, stage in enumerate(plan):
        if stage == "train":
            shutil.rmtree(p / "models/checkpoints")  # a fresh training (else the rerun replays the finished one)
        if stage == "evaluate" and rng.random() < 0.5:
            shutil.rmtree(p / ".cache/judge", ignore_errors=True)  # the judge is asked again, not the cache
        proc, log = start(["dvc", "repro", "-f", "-s", stage], p)
        what, cond = rng.choice(stage_events(p, log)[stage])
        delay, stage_only = rng.uniform(0, 1.5), rng.random() < 0.3
        killed = wait_then_kill(proc, log, cond, delay, stage_only)
        if killed is None:  # the stage finished before the kill point: no kill this round
            assert proc.returncode == 0, log.read_text()[-3000:]
            misses += 1
        else:
            kills[stage] += 1
            print(f"reliability: round {i}: killed {stage} ({killed}) at '{what}' + {delay:.2f}s", flush=True)
        registered |= stage in ("train", "evaluate", "register")  # a rerun of any of them registers a new version
        out = finish(*start(["dvc", "repro"], p))
        assert "ERROR" not in out, out[-3000:]
        check_clean(p, expected, uri, rounds_registered=registered)
    bad_params_under_dvc(p)
    check_clean(p, expected, uri, rounds_registered=registered)
    total = sum(kills.values())
    print(f"\nreliability: {total} kills survived in the pipeline ({', '.join(f'{k} {v}' for k, v in sorted(kills.items()))}; "
          f"{misses} rounds ended before their kill point), each followed by a dvc repro matching the undisturbed run")
    assert total >= 16 and set(kills) == {"prepare", "train", "evaluate", "register"}, kills


# -------------------------------------------------------------------------------------------------- tune
def tune_args(root: Path, model: Path) -> list[str]:
    return [*[x for x in project_overrides(root) if not x.startswith("paths.data")], f"paths.data={root / 'data'}",
            f"model.base={model}", "data.template=llama2_chat", "train.max_steps=6", "train.batch_size=4",
            "train.max_length=96", "train.logging_steps=1", "train.eval_steps=2", "train.save_steps=2",
            "train.max_train_rows=32", "train.max_eval_rows=8", "train.warmup_ratio=0.0",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"tracking.artifact_location={root / 'mlartifacts'}",
            "tracking.experiment=tune-kill", f"tune.storage=sqlite:///{root / 'optuna.db'}", "tune.heartbeat_s=2",
            "tune.study=kill", "tune.n_trials=3", "tune.sampler=grid", "tune.pruner=none",
            "tune.space={train.learning_rate: {type: categorical, choices: [0.001, 0.003, 0.01]}}",
            "register.metric=train.eval_loss", "register.model_name=tuned"]


def tune_project(root: Path) -> Path:
    root.mkdir(parents=True)
    prepare_sample(root / "data")
    return root


def study_result(root: Path) -> tuple[dict, float]:
    import optuna

    study = optuna.load_study(study_name="kill", storage=f"sqlite:///{root / 'optuna.db'}")
    done = {t.params["train.learning_rate"]: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert "RUNNING" not in [t.state.name for t in study.trials]
    return done, study.best_value


def test_tune_killed_at_random_points_then_rerun(tmp_path, tiny_model_dir):
    """A 3-trial grid study killed up to 6 times (at most twice per trial: the heartbeat retries a trial twice),
    each time rerun with `llmft tune`: the same trials complete with the same values as an undisturbed study, the
    best one is promoted once, and no run is left RUNNING."""
    from mlflow import MlflowClient

    rng = random.Random(SEED + 1)
    ref = tune_project(tmp_path / "ref")
    finish(*start([sys.executable, "-m", "llmft", "tune", *tune_args(ref, tiny_model_dir)], ref))
    expected, best = study_result(ref)
    assert len(expected) == 3

    root = tune_project(tmp_path / "killed")
    cmd = [sys.executable, "-m", "llmft", "tune", *tune_args(root, tiny_model_dir)]
    trials = root / "runs/tune/kill"
    per_trial = Counter()  # kills per trial folder (a trial and its retries share one)
    for _ in range(6):
        seen = set(trials.glob("trial-*/models/checkpoints/checkpoint-*"))
        fresh = []  # a checkpoint being written by a trial killed fewer than twice

        def new_checkpoint():
            # not the last one (checkpoint-6): a kill after it could land in the next trial, beyond the count
            fresh[:] = [c for c in set(trials.glob("trial-*/models/checkpoints/checkpoint-*")) - seen
                        if per_trial[c.parts[-4]] < 2 and c.name in ("checkpoint-2", "checkpoint-4")]
            return bool(fresh)

        proc, log = start(cmd, root)
        if wait_then_kill(proc, log, new_checkpoint, rng.uniform(0, 1.0), stage_only=False) is not None:
            per_trial[fresh[0].parts[-4]] += 1
            print(f"reliability: tune killed after {fresh[0].parts[-4]}'s {fresh[0].name} appeared", flush=True)
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
    kills = sum(per_trial.values())
    out = finish(*start(cmd, root))
    got, got_best = study_result(root)
    assert got == expected and got_best == best, (got, expected)
    runs, _ = store_states(f"sqlite:///{root / 'mlflow.db'}")
    assert all(s in ("FINISHED", "FAILED", "KILLED") for _, s in runs), runs
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'tuned'")
    assert len(versions) == 1 and versions[0].tags["promotion.decision"] == "promoted", out[-2000:]
    print(f"\nreliability: {kills} kills survived in tune, study equal to the undisturbed one (best {best:.6g})")
    assert kills >= 5


# ------------------------------------------------------------------------------------ races and load
@pytest.fixture(scope="module")
def many_races(tmp_path_factory, tiny_model_dir):
    """A champion, then 4 rounds of 2 racing registers with seeded random test losses."""
    rng = random.Random(SEED + 2)
    root = tmp_path_factory.mktemp("races")
    store = root / "store"
    store.mkdir()
    adapters = [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=40 + i) for i in range(2)]
    records = [seed_champion(root / "seed", store, tiny_model_dir, adapters[0], "races", 2.0)]
    for _ in range(4):
        records += race_registers(root, store, tiny_model_dir, adapters, [round(rng.uniform(0.5, 2.5), 3) for _ in adapters],
                                  "races")
    return f"sqlite:///{store / 'mlflow.db'}", records


def test_many_racing_registers(many_races):
    uri, records = many_races
    champion = check_registry(uri, "races", records)
    print(f"\nreliability: {len(records) - 1} racing registers in 4 rounds, one champion (v{champion}), tags consistent")


def test_heavier_load_on_the_served_champion(many_races, tmp_path):
    """16 clients x 25 requests, a bad request every 5th: 0 failures, every bad one a 4xx, the server up."""
    uri = many_races[0]
    h = {"Content-Type": "application/json"}
    bad = [{"dataframe_records": [{"instruction": "x"}] * 65}, {"dataframe_records": [{"instruction": "x" * 16001}]},
           {"dataframe_records": [{"instruction": ""}]}, {"dataframe_records": [{"instruction": "x"}],
                                                          "params": {"temperature": -1.0}}]
    with model_server("models:/races@champion", uri, tmp_path, "-t", "300") as (server, proc):
        url = f"{server}/invocations"

        def client(i):
            out = []
            with requests.Session() as s:
                for j in range(25):
                    body = {"dataframe_records": [{"instruction": f"Client {i} asks {j}: name a colour."}],
                            "params": {"max_new_tokens": 8, "temperature": 0.7 if j % 2 else 0.0}}
                    t = time.perf_counter()
                    r = s.post(url, data=json.dumps(body), headers=h, timeout=300)
                    out.append(("good", r.status_code if not r.ok or len(r.json()["predictions"]) == 1 else -1,
                                time.perf_counter() - t))
                    if j % 5 == 4:
                        r = s.post(url, data=json.dumps(bad[(i + j) % len(bad)]), headers=h, timeout=300)
                        out.append(("bad", r.status_code, 0.0))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            results = [x for part in pool.map(client, range(16)) for x in part]
        wall = time.perf_counter() - t0
        served = [lat for kind, status, lat in results if kind == "good" and status == 200]
        bad_status = [status for kind, status, _ in results if kind == "bad"]
        assert len(served) == 400 and all(400 <= s < 500 for s in bad_status), Counter(s for _, s, _ in results)
        assert requests.get(f"{server}/ping", timeout=10).ok and proc.poll() is None
        q = statistics.quantiles(served, n=100)
        print(f"\nreliability: load {len(served)} requests (16 clients x 25) in {wall:.1f}s, 0 failed; p50 "
              f"{statistics.median(served) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; {len(bad_status)} bad requests "
              f"all {sorted(set(bad_status))}")
