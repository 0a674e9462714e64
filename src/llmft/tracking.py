"""MLflow run handling: one run per pipeline run, lineage tags, environment facts.

`train` opens the run and writes its id to `paths.run_id`; `evaluate`, `register` and `report` reopen
it from there, so the MLflow UI shows params, curves, eval metrics and the model version together.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, TrackingConfig
from .errors import LlmftError
from .io import write_atomic

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Keys that may hold secrets are never logged, whatever their source (an env var's *name* is fine).
SECRET_KEYS = {"api_key", "apikey", "key", "token", "access_token", "hf_token", "secret", "password"}
# Which process holds a run open: set by every stage that opens it, so a later one can tell a run whose process
# is gone (kill -9, the OOM killer) from one still in use.
HOST_TAG, PID_TAG = "llmft.host", "llmft.pid"


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if cfg.uri.startswith(("sqlite:", "file:")) or "://" not in cfg.uri:
        location = Path(cfg.artifact_location).resolve().as_uri()
    try:
        # the UI opens a "custom model development" experiment in its Model training view (runs, not traces)
        return mlflow.create_experiment(cfg.experiment, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # another process (a tune worker) created it first
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment this process runs in (`dvc exp run` sets these for its stages), else {}."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def run_name(cfg: Config, stage: str = "train") -> str:
    """A name a person can scan in the runs list: the DVC experiment (if any), the stage and key params."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    t = cfg.train
    steps = f"s{t.max_steps}" if t.max_steps > 0 else f"e{t.epochs:g}"
    exp = os.environ.get("DVC_EXP_NAME")
    return " ".join(x for x in (exp, stage, f"r{t.lora.r}", f"lr{t.learning_rate:.0e}", steps) if x)


@contextmanager
def start_run(cfg: Config, new: bool = True, run_id: str | None = None, stage: str = "train", **kwargs):
    """Open the pipeline's run: a new one (train), a given one (a resumed train), or the one named in
    paths.run_id (later stages). Extra kwargs go to mlflow.start_run (e.g. nested=True, tags)."""
    import mlflow

    exp_id = setup(cfg.tracking)
    close_orphans(exp_id)
    id_file = Path(cfg.paths.run_id)
    if not new:
        if not id_file.exists():
            raise LlmftError(f"{id_file} not found: run `llmft train` first (it opens the MLflow run later stages log into)")
        run_id = id_file.read_text().strip()
    name = run_name(cfg, stage) if run_id is None else None
    if run_id is None and cfg.tracking.parent_run_id:  # shown nested under it in the MLflow UI
        kwargs["tags"] = {**kwargs.get("tags", {}), "mlflow.parentRunId": cfg.tracking.parent_run_id}
    kwargs["tags"] = {**kwargs.get("tags", {}), **owner_tags()}  # with the run's creation or reopening: no gap
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=name, **kwargs) as run:
        if new:
            write_atomic(id_file, run.info.run_id + "\n")
        yield run


def owner_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def set_shared_tag(client: MlflowClient, run_id: str, key: str, value: str) -> None:
    """Set a tag on a run that another process may tag at the same moment (tune's study run, which every worker
    finishes; a dead process's run, which every starting stage closes).

    MlflowClient.set_tag is a SELECT, then an INSERT, in MLflow's SQL store: two processes setting a tag the run
    does not have yet both INSERT, and the later one fails on the tags table's key (key, run_uuid) with an
    IntegrityError (PostgreSQL: duplicate key value violates unique constraint "tag_pk"). log_batch writes tags
    with an upsert that retries on that conflict, and then updates the row the other process inserted."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value)])


def alive(pid) -> bool:
    """Whether a process of this machine with that id exists."""
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def close_orphans(exp_id: str) -> list[str]:
    """Mark FAILED the runs left RUNNING by a process of this machine that is gone, and the models they were
    logging (MLflow's LoggedModel, PENDING until its upload ends), so that no run stays RUNNING for ever.

    A stage killed while it held the pipeline's run open (train mid-step, evaluate or register mid-logging)
    left it RUNNING until some later stage happened to reopen and close it, or for ever if none did (train
    rerun with another config starts a new run). Every stage calls this before opening its run; a run that is
    reopened afterwards (a resumed train, the rerun of the killed stage) becomes RUNNING, then FINISHED, again.
    Runs of other machines, and runs without the owner tags (tune's study run), are left alone."""
    from mlflow import MlflowClient

    client, here, closed = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags, run_id = run.data.tags, run.info.run_id
        if tags.get(HOST_TAG) != here or alive(tags.get(PID_TAG)):
            continue
        for model in client.search_logged_models([exp_id], f"source_run_id = '{run_id}'"):
            if str(getattr(model.status, "value", model.status)) == "PENDING":  # (a status filter finds none on SQLite)
                client.finalize_logged_model(model.model_id, "FAILED")
        # every stage starting on this machine closes it: two at once (tune workers) both tag it
        set_shared_tag(client, run_id, "llmft.interrupted",
                       f"process {tags.get(PID_TAG)} on {here} ended with this run open")
        client.set_terminated(run_id, "FAILED")
        closed.append(run_id)
    if closed:
        print(f"tracking: marked {len(closed)} run(s) FAILED whose process had died: {', '.join(closed)}", flush=True)
    return closed


def _secret(key: str) -> bool:
    return key.lower().rsplit(".", 1)[-1] in SECRET_KEYS


def _clean(value):
    """URLs lose any user:password@ part."""
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return value


def scrub(params: dict) -> dict:
    """Flat params without secret keys, URLs without credentials."""
    return {k: _clean(v) for k, v in params.items() if not _secret(k)}


def scrub_nested(d: dict) -> dict:
    return {k: scrub_nested(v) if isinstance(v, dict) else _clean(v) for k, v in d.items() if not _secret(k)}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (subprocess.SubprocessError, FileNotFoundError):
        return ""


def lineage_tags(data_paths: list[str]) -> dict[str, str]:
    """git commit + dirty flag, the DVC experiment, and the md5 that dvc.lock records for each data path read."""
    tags = {"git.commit": _git("rev-parse", "HEAD") or "unknown",
            "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(), **dvc_experiment()}
    lock = Path("dvc.lock")
    if lock.exists():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if any(out["path"].rstrip("/") == p.rstrip("/") for p in data_paths):
                    tags[f"dvc.md5.{out['path']}"] = out.get("md5", "")
    return tags


def environment() -> dict[str, str]:
    """Library versions and hardware, for reproducibility."""
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
           "cpu_count": str(os.cpu_count())}
    try:
        with open("/proc/meminfo") as f:
            env["ram_gb"] = f"{int(f.readline().split()[1]) / 2**20:.1f}"
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_count=str(torch.cuda.device_count()), gpu_mem_gb=f"{p.total_memory / 2**30:.1f}",
                   cuda=str(torch.version.cuda))
    else:
        env["gpu"] = "none"
    for lib in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "mlflow"):
        try:
            env[f"version.{lib}"] = md.version(lib)
        except md.PackageNotFoundError:
            pass
    return env
