"""tune: an Optuna search over training, each trial an MLflow run nested under the study's run; the best
trial is promoted through the same rule as `register` (registry.promote).

    python -m llmft tune                                   # the `tune` block of params.yaml
    python -m llmft tune tune.n_trials=4 train.max_steps=8 # a quick search; overrides apply to every trial
    python -m llmft trials                                 # the study's trials: state, value, params, MLflow run

Each trial runs the `train` stage's own code (and `evaluate` when `tune.objective` is an evaluate metric) with
the trial's values, in its own folder under paths.tune/<study>/. Validation losses reach Optuna's pruner as
training logs them, so bad trials stop early. A trial that fails (NaN loss, out of memory, any error) is
recorded as FAILED with its reason and the study goes on. Several processes or machines run one study when
they share `tune.storage` (e.g. postgresql://...) and `tracking.uri` (an MLflow server); each stops once the
study has `tune.n_trials` trials complete, pruned or running. A killed worker's trial goes stale (heartbeat)
and is retried from its last checkpoint, in its MLflow run, by the next worker that starts.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .config import Config, rebased_paths, set_key, validate
from .errors import LlmftError
from .tracking import alive as _alive

# Paths every trial shares with the project (inputs and caches); all others go to the trial's own folder.
SHARED_PATHS = ("data", "data_metrics", "base_cache", "judge_cache", "tune")
STUDY_TAG, TRIAL_TAG = "llmft.study", "optuna.trial"


def tune(cfg: Config) -> dict:
    """The verb: run (or continue) the study until it has tune.n_trials trials, then promote the best."""
    import optuna

    from . import metrics

    t = cfg.tune
    ref = metrics.parse(t.objective)
    direction = metrics.resolve_direction(ref, t.direction, None)
    study = load_study(cfg, direction)
    wait_for_dead_workers(study, cfg)
    parent = parent_run(cfg, study)
    done = _count(study, (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    print(f"tune: study '{t.study}' in {_safe_url(t.storage)}: {done} of {t.n_trials} trials done; objective "
          f"{t.objective} ({direction}); MLflow parent run {parent}", flush=True)
    if _count(study, _live()) < t.n_trials:
        stop = optuna.study.MaxTrialsCallback(t.n_trials, states=_live())
        try:
            study.optimize(lambda trial: run_trial(trial, cfg, parent, ref, direction), timeout=t.timeout_s,
                           callbacks=[stop], catch=(Exception,), gc_after_trial=True)
        except KeyboardInterrupt:  # Ctrl-C: the study's run says so, unless other workers still run trials in it
            if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                from mlflow import MlflowClient

                MlflowClient().set_terminated(parent, "KILLED")
            raise
    return finish(cfg, study, parent, direction)


def _live():
    """States that count towards tune.n_trials: done, or being run by some worker."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def _safe_url(url: str) -> str:
    from .tracking import scrub

    return scrub({"url": url})["url"]


# ------------------------------------------------------------------------------------------ the study
# PostgreSQL's SQLSTATEs for a CREATE of what exists already: a type (Optuna's enums), a table or an index
DUPLICATE_OBJECT, DUPLICATE_TABLE = "42710", "42P07"


def _schema_race(e: Exception) -> bool:
    """Whether `e` is what the slower of two workers creating Optuna's schema on an empty PostgreSQL database
    gets: a duplicate key in the catalog (IntegrityError) when both CREATE at once, or "type ... already exists"
    (ProgrammingError) when the other's CREATE committed between SQLAlchemy's check for it and its own CREATE."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    orig = getattr(e, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)  # psycopg 3, psycopg2
    return isinstance(e, IntegrityError) or (isinstance(e, ProgrammingError)
                                             and code in (DUPLICATE_OBJECT, DUPLICATE_TABLE))


def _rdb_storage(t):
    """Optuna's RDB storage. Two workers starting together on an empty database both create its schema, and
    PostgreSQL fails the slower one (_schema_race): the schema then exists, so opening it again succeeds."""
    import optuna

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2, inherit_intermediate_values=True)
                return optuna.storages.RDBStorage(t.storage, heartbeat_interval=t.heartbeat_s,
                                                  grace_period=2 * t.heartbeat_s, heartbeat_stale_trial_callback=retry)
        except Exception as e:  # else a bad URL, an unreachable server, a missing driver
            if attempt < 2 and _schema_race(e):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise LlmftError(f"tune.storage: cannot open {_safe_url(t.storage)} ({type(e).__name__}: {str(e)[:300]})") from None


def load_study(cfg: Config, direction: str):
    """Create the study or load it (any worker may be first); heartbeats let a killed worker's trial be
    noticed and retried."""
    import optuna

    t = cfg.tune
    storage = _rdb_storage(t)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.sampler_startup_trials),
               "random": lambda: optuna.samplers.RandomSampler(seed=t.seed),
               "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=t.seed, n_startup_trials=t.sampler_startup_trials),
               "grid": lambda: optuna.samplers.GridSampler(grid_space(t.space), seed=t.seed)}[t.sampler]()
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials,
                                                            n_warmup_steps=t.pruner_warmup_steps),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[t.pruner]()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line says how each trial ended, with its reason
    try:
        study = optuna.create_study(study_name=t.study, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=direction, load_if_exists=True)
    except Exception as e:  # a bad URL, an unreachable server, a missing driver
        raise LlmftError(f"tune.storage: cannot open {_safe_url(t.storage)} ({type(e).__name__}: {str(e)[:300]})") from None
    if study.direction.name.lower() != direction:
        raise LlmftError(f"study '{t.study}' in {_safe_url(t.storage)} was created to {study.direction.name.lower()}, "
                         f"but tune.objective {t.objective} is to {direction}: use another tune.study")
    return study


def grid_space(space: dict) -> dict[str, list]:
    """GridSampler's lists: the choices, or low..high by step."""
    out = {}
    for key, d in space.items():
        if d["type"] == "categorical":
            out[key] = list(d["choices"])
        else:
            n = int(round((d["high"] - d["low"]) / d["step"]))
            out[key] = [d["low"] + i * d["step"] for i in range(n + 1)]
    return out


def suggest(trial, space: dict) -> dict[str, Any]:
    """One value per space key, with Optuna's own distributions."""
    values = {}
    for key, d in space.items():
        if d["type"] == "float":
            values[key] = trial.suggest_float(key, d["low"], d["high"], log=d.get("log", False), step=d.get("step"))
        elif d["type"] == "int":
            values[key] = trial.suggest_int(key, d["low"], d["high"], log=d.get("log", False), step=d.get("step") or 1)
        else:
            values[key] = trial.suggest_categorical(key, d["choices"])
    return values


def wait_for_dead_workers(study, cfg: Config) -> None:
    """A trial left RUNNING by a worker of this machine that is gone (kill -9) is stale once its heartbeat is
    older than the grace period: wait that long, so this rerun retries it instead of counting it as running."""
    import optuna

    here = socket.gethostname()
    dead = [tr for tr in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if tr.user_attrs.get("host") == here and not _alive(tr.user_attrs.get("pid"))]
    if dead:
        wait = 2 * cfg.tune.heartbeat_s + 1
        print(f"tune: trial(s) {[tr.number for tr in dead]} of a stopped worker on this machine; waiting {wait:.0f}s "
              "for their heartbeat to go stale, then they are retried", flush=True)
        time.sleep(wait)
    optuna.storages.fail_stale_trials(study)
    _close_orphan_runs(study, cfg)


def _close_orphan_runs(study, cfg: Config) -> None:
    """MLflow runs of trials that ended FAILED without ending their run (a killed worker) are marked FAILED,
    unless a waiting retry will continue them: none stays RUNNING for ever."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from . import tracking

    tracking.setup(cfg.tracking)
    client = MlflowClient()
    waiting = {_root(w) for w in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))}
    for tr in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run_id = tr.user_attrs.get("mlflow_run_id")
        if not run_id or _root(tr) in waiting:
            continue
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                tracking.set_shared_tag(client, run_id, "optuna.state", "FAIL")  # workers starting together both do
                client.set_terminated(run_id, "FAILED")
        except MlflowException:
            continue


def _root(trial) -> int:
    """The first trial of a retry chain: retries reuse its folder, checkpoints and MLflow run. (A retry gets
    the failed trial's user attrs, `root` among them.)"""
    return trial.user_attrs.get("root", trial.number)


def parent_run(cfg: Config, study) -> str:
    """The study's MLflow run, shared by every worker: the oldest run tagged with this study (a worker that
    created a second one at the same moment deletes its own)."""
    from mlflow import MlflowClient

    from . import tracking

    exp_id = tracking.setup(cfg.tracking)
    client = MlflowClient()
    query = f"tags.`{STUDY_TAG}` = '{cfg.tune.study}' and tags.`llmft.kind` = 'study'"

    def oldest():
        runs = client.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=5)
        live = [r for r in runs if r.info.lifecycle_stage == "active"]
        return min(live, key=lambda r: (r.info.start_time, r.info.run_id)) if live else None

    found = oldest()
    if found is None:
        mine = client.create_run(exp_id, run_name=f"study {cfg.tune.study}",
                                 tags={STUDY_TAG: cfg.tune.study, "llmft.kind": "study", "llmft.stage": "tune",
                                       "optuna.storage": _safe_url(cfg.tune.storage), **tracking.lineage_tags([])})
        found = oldest()
        if found.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        else:
            from .config import flatten, to_dict

            for k, v in flatten(to_dict(cfg.tune)).items():
                client.log_param(found.info.run_id, f"tune.{k}", str(v)[:500])
    if found.info.status != "RUNNING":
        client.update_run(found.info.run_id, status="RUNNING")  # a rerun continues the study
    return found.info.run_id


# ---------------------------------------------------------------------------------------------- a trial
def trial_config(cfg: Config, trial, parent: str) -> tuple[Config, dict]:
    """The trial's config: the project's, with the trial's values and its own output folders."""
    values = suggest(trial, cfg.tune.space)
    folder = Path(cfg.paths.tune) / cfg.tune.study / f"trial-{_root(trial):03d}"
    tc = copy.deepcopy(cfg)
    for override in rebased_paths(folder, keep=SHARED_PATHS):
        key, value = override.split("=", 1)
        set_key(tc, key, value)
    for key, value in values.items():
        set_key(tc, key, value)
    short = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in values.items())
    tc.tracking.run_name = f"trial {trial.number} {short}"
    tc.tracking.parent_run_id = parent
    validate(tc)
    return tc, values


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_trial(trial, cfg: Config, parent: str, ref, direction: str) -> float:
    """Optuna's objective: train (and evaluate) one configuration, report validation losses for pruning."""
    import optuna
    from mlflow import MlflowClient

    from . import metrics, tracking
    from .train import train

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("root", _root(trial))
    state, reason = "COMPLETE", ""
    try:
        tc, values = trial_config(cfg, trial, parent)
        retry = f" (retry of trial {_root(trial)})" if _root(trial) != trial.number else ""
        print(f"tune: trial {trial.number}{retry} " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)
        train(tc, callbacks=[PruneOnValidationLoss(trial, maximize=direction == "maximize")],
              on_run=lambda run_id: _tag_trial(trial, run_id, cfg))
        if ref.source == "eval":
            from .evaluate import evaluate

            evaluate(tc)
        value, why, _ = metrics.read(ref, Path(tc.paths.train_metrics), Path(tc.paths.eval_dir) / "table.json")
        if value is None:
            raise LlmftError(f"objective {ref.text}: {why}")
        return value
    except optuna.TrialPruned as e:
        state, reason = "PRUNED", str(e)
        raise
    except BaseException as e:  # Ctrl-C too: the trial is recorded as FAIL with its reason, not left RUNNING
        state, reason = "FAIL", f"{type(e).__name__}: {str(e)[:500]}"
        trial.set_user_attr("fail_reason", reason)
        raise
    finally:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client = MlflowClient()
            client.set_tag(run_id, "optuna.state", state)
            if reason:
                client.set_tag(run_id, "optuna.reason", reason[:4000])
            if state == "PRUNED":
                client.set_terminated(run_id, "KILLED")
        print(f"tune: trial {trial.number} {state}{': ' + reason if reason else ''}", flush=True)
        gc.collect()
        _empty_cuda_cache()
        tracking.setup(cfg.tracking)


def _tag_trial(trial, run_id: str, cfg: Config) -> None:
    """Called by train as soon as the trial's MLflow run exists: Optuna and MLflow then point at each other,
    also for a worker that is killed a moment later."""
    from mlflow import MlflowClient

    trial.set_user_attr("mlflow_run_id", run_id)
    client = MlflowClient()
    client.set_tag(run_id, STUDY_TAG, cfg.tune.study)
    client.set_tag(run_id, TRIAL_TAG, str(trial.number))
    client.set_tag(run_id, "llmft.kind", "trial")
    if _root(trial) != trial.number:
        client.set_tag(run_id, "optuna.retry_of", str(_root(trial)))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one


class PruneOnValidationLoss(TrainerCallback):
    """Reports each validation loss to the trial, where Optuna's pruner decides, and fails a trial whose loss
    is not finite. For an objective to maximise, the negative loss is reported, so the pruner compares in the
    study's direction."""

    def __init__(self, trial, maximize: bool):
        self.trial, self.sign = trial, -1.0 if maximize else 1.0

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"train loss is {loss} at step {state.global_step}")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        import optuna

        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise FloatingPointError(f"validation loss is {loss} at step {state.global_step}")
        self.trial.report(self.sign * loss, state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step}: validation loss {loss:.4f}")


# ------------------------------------------------------------------------------------------ after it
def finish(cfg: Config, study, parent: str, direction: str) -> dict:
    """Top trials, Optuna's plots and the promotion of the best trial, once no trial is running any more."""
    import optuna
    from mlflow import MlflowClient

    client = MlflowClient()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    out_dir = Path(cfg.paths.tune) / cfg.tune.study
    table = trials_table(study)
    summary = {"study": cfg.tune.study, "direction": direction, "objective": cfg.tune.objective,
               "trials": {s: sum(r["state"] == s for r in table) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}}
    if running:
        print(f"tune: {len(running)} trial(s) still running on other workers; the last worker to finish promotes")
        return summary
    if not complete:
        client.set_terminated(parent, "FAILED")
        raise LlmftError(f"tune: no trial of study '{cfg.tune.study}' completed ({summary['trials']}); see `llmft trials`")
    best = study.best_trial
    summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                   best_run_id=best.user_attrs.get("mlflow_run_id"))
    _log_study(cfg, study, parent, table, out_dir)
    if cfg.tune.promote:
        summary["registry"] = promote_best(cfg, study, best)
    from .io import write_json

    write_json(out_dir / "summary.json", summary)
    client.log_dict(parent, summary, "study/summary.json")
    for k, v in (("best_value", best.value), ("best_trial", best.number)):
        client.log_metric(parent, k, float(v))
    client.set_terminated(parent, "FINISHED")
    print(f"tune: best trial {best.number}: {cfg.tune.objective} = {best.value:.6g} with "
          + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
          + (f"; registry: v{summary['registry']['version']} {summary['registry']['decision']}"
             if summary.get("registry") else ""))
    return summary


def trials_table(study) -> list[dict]:
    rows = []
    for tr in study.get_trials(deepcopy=False):
        duration = (tr.datetime_complete - tr.datetime_start).total_seconds() if tr.datetime_complete and tr.datetime_start else None
        rows.append({"number": tr.number, "state": tr.state.name, "value": tr.value, "params": tr.params,
                     "duration_s": round(duration, 1) if duration is not None else None,
                     "mlflow_run_id": tr.user_attrs.get("mlflow_run_id", ""),
                     "reason": tr.user_attrs.get("fail_reason", "") or _pruned_at(tr),
                     "retry_of": tr.system_attrs.get("failed_trial")})
    return rows


def _pruned_at(tr) -> str:
    if tr.state.name == "PRUNED" and tr.intermediate_values:
        return f"pruned at step {max(tr.intermediate_values)}"
    return ""


def top_trials(study, n: int = 5) -> list[dict]:
    done = [r for r in trials_table(study) if r["state"] == "COMPLETE"]
    reverse = study.direction.name == "MAXIMIZE"
    return sorted(done, key=lambda r: r["value"], reverse=reverse)[:n]


def _log_study(cfg: Config, study, parent: str, table: list[dict], out_dir: Path) -> None:
    """Optuna's own plots and the trials table on the study's run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    from . import tracking
    from .io import write_atomic

    client = MlflowClient()
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
             "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
             "param_importances": optuna.visualization.matplotlib.plot_param_importances,
             "intermediate_values": optuna.visualization.matplotlib.plot_intermediate_values}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances need 2+ complete trials
                print(f"tune: {name} plot skipped ({e})")
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4.2)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            client.log_artifact(parent, str(path), "study")
    flat = [{**{k: v for k, v in r.items() if k != "params"}, **{f"param.{k}": v for k, v in r["params"].items()}}
            for r in table]
    # MLflow's table format, listed in the run's mlflow.loggedArtifacts tag as client.log_table does, but written
    # whole: log_table appends to the run's trials.json (a rerun of a finished study doubled its rows) and sets the
    # tag with set_tag, which fails when two workers finish the study at once (tracking.set_shared_tag)
    write_atomic(out_dir / "trials.json", pd.DataFrame(flat).to_json(orient="split", index=False, date_format="iso"))
    client.log_artifact(parent, str(out_dir / "trials.json"), "study")
    logged = json.loads(client.get_run(parent).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": "study/trials.json", "type": "table"}
    if entry not in logged:
        tracking.set_shared_tag(client, parent, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
    write_atomic(out_dir / "trials.md", format_trials(table))
    client.log_artifact(parent, str(out_dir / "trials.md"), "study")


def promote_best(cfg: Config, study, best) -> dict:
    """The best trial's adapter through registry.promote, judged by register.metric (evaluating the trial
    first when that metric needs it), once per study."""
    import mlflow

    from . import metrics, registry, tracking

    if study.user_attrs.get("promoted_trial") == best.number:
        print(f"tune: trial {best.number} was already registered ({study.user_attrs.get('promoted_version')})")
        return {"version": study.user_attrs.get("promoted_version"), "decision": "already_registered"}
    tc, _ = trial_config(cfg, _Fixed(best), cfg.tracking.parent_run_id or "")
    ref = metrics.parse(cfg.register.metric)
    table = Path(tc.paths.eval_dir) / "table.json"
    if ref.source == "eval" and not table.exists():
        from .evaluate import evaluate

        evaluate(tc)
    candidate, why, marked = metrics.read(ref, Path(tc.paths.train_metrics), table)
    direction = metrics.resolve_direction(ref, cfg.register.direction, marked)
    tags = {"tune.study": cfg.tune.study, "tune.trial": str(best.number), "tune.best_value": repr(best.value),
            "tune.objective": cfg.tune.objective}
    with registry.promotion_lock(cfg):
        study_now = study.user_attrs  # another worker on this machine may have promoted while we waited
        if study_now.get("promoted_trial") == best.number:
            return {"version": study_now.get("promoted_version"), "decision": "already_registered"}
        tracking.setup(cfg.tracking)
        with mlflow.start_run(run_id=best.user_attrs["mlflow_run_id"]):
            result = registry.promote(tc, tc.paths.adapter, candidate, direction, why, extra_tags=tags)
        study.set_user_attr("promoted_trial", best.number)
        study.set_user_attr("promoted_version", result["version"])
    return result  # promote wrote tc.paths.register_metrics


class _Fixed:
    """A finished trial, replayed: suggest() returns its values (to rebuild its config)."""

    def __init__(self, frozen):
        self.frozen, self.number, self.user_attrs = frozen, frozen.number, frozen.user_attrs

    def suggest_float(self, name, *a, **k):
        return self.frozen.params[name]

    suggest_int = suggest_categorical = suggest_float


# ------------------------------------------------------------------------------------------ listing
def format_trials(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", "value", *keys, "seconds", "MLflow run", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        note = r["reason"] + (f" (retry of {r['retry_of']})" if r["retry_of"] is not None else "")
        cells = [r["number"], r["state"], _fmt(r["value"]) if r["value"] is not None else "–",
                 *[_fmt(r["params"].get(k, "–")) for k in keys], r["duration_s"] if r["duration_s"] is not None else "–",
                 r["mlflow_run_id"] or "–", note.replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def trials(cfg: Config) -> list[dict]:
    """The verb `llmft trials`: the study's trials as a table."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=cfg.tune.study, storage=cfg.tune.storage)
    except KeyError:
        raise LlmftError(f"no study '{cfg.tune.study}' in {_safe_url(cfg.tune.storage)} (tune.study, tune.storage): "
                         "run `llmft tune` first") from None
    rows = trials_table(study)
    print(format_trials(rows), end="")
    best = [r for r in rows if r["state"] == "COMPLETE"]
    if best:
        b = top_trials(study, 1)[0]
        print(f"best: trial {b['number']} ({cfg.tune.objective} = {_fmt(b['value'])})")
    return rows


def load_summary(cfg: Config) -> dict | None:
    """The study summary tune wrote, if any (the report shows the top trials from it)."""
    path = Path(cfg.paths.tune) / cfg.tune.study / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
