"""register stage: log the tuned model to MLflow, register it, promote it by evidence.

    python -m llmft register
    python -m llmft register register.metric=rouge_l.tuned

The candidate gets the alias (`champion`) only when it beats the current champion on `register.metric`
(a metric reference: metrics.py). Each version carries its metric value as a tag, so later candidates
compare against the registry, not against files that may have changed. The decision is taken under a
lock, after the version exists, so two processes promoting at once end with one champion whose tags
agree. The decision and both numbers are tags on the new version and go to `paths.register_metrics`.
A rerun after a kill finishes the version the killed process registered (same run, adapter and metric) instead
of adding another; a version whose process died undecided elsewhere is tagged `interrupted`.
`tune` promotes its best trial through `promote` too.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import math
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from . import metrics, models, tracking
from .config import Config, to_dict
from .errors import LlmftError
from .io import write_json

# What the served model imports; pinned to this environment's versions. Passed explicitly because
# MLflow's inference of requirements for torch models asks for torchvision.
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "pandas",
                        "pyyaml", "tqdm")


def metric_tag(metric: str) -> str:
    return f"metric.{metric}"


def decide(candidate: Optional[float], champion_version: Optional[str], champion: Optional[float],
           direction: str) -> tuple[bool, str]:
    """(promote?, reason). No evidence, no promotion; a champion without evidence loses its alias."""
    if candidate is None:
        return False, "candidate_metric_missing"
    if champion_version is None:
        return True, "no_champion"
    if champion is None:
        return True, "champion_metric_missing"
    if candidate == champion:
        return False, "tie"
    better = candidate < champion if direction == "minimize" else candidate > champion
    return better, "better" if better else "worse"


def local_base(cfg: Config) -> str:
    """The base model as an absolute local directory, so serving never reaches for the hub."""
    base = models.resolve_base(cfg)
    if os.path.isdir(base):
        return str(Path(base).resolve())
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(base, revision=cfg.model.revision, local_files_only=True)
    except Exception as e:
        raise LlmftError(f"model.base: '{base}' is not in the local Hugging Face cache ({type(e).__name__}); "
                         "the served model must load offline: download it first or point model.base at a "
                         "local directory") from None


def current_champion(client, name: str, alias: str, metric: str) -> tuple[Optional[str], Optional[float]]:
    """(version, metric value from its tag) of the alias holder; (None, None) when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None
        raise
    if version is None:
        return None, None
    raw = client.get_model_version(name, version).tags.get(metric_tag(metric))
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        value = None
    return str(version), value if value is not None and math.isfinite(value) else None


def log_model(cfg: Config, base: str, workdir: Path, adapter: str | None = None):
    """Log the pyfunc (adapter + llmft.json [+ base weights]) into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from . import pyfunc_model

    r, gen = cfg.register, cfg.evaluate.generation
    adapter = adapter or cfg.paths.adapter
    meta = {"template": cfg.data.template, "system_prompt": cfg.data.system_prompt,
            "base_model": base, "base_model_config": cfg.model.base,
            # base is a local folder already at model.revision (local_base): no revision to apply again
            "model": {"trust_remote_code": cfg.model.trust_remote_code, "allow_pickle": cfg.model.allow_pickle,
                      "random_init": cfg.model.random_init},  # load tests of a large model: no weights to log
            "generation": to_dict(gen),
            "limits": {"max_rows": r.max_request_rows, "max_input_chars": r.max_input_chars,
                       "max_new_tokens": r.max_new_tokens_limit},
            "batching": {"max_rows": r.max_batch_rows, "window_ms": r.batch_window_ms}}
    write_json(workdir / pyfunc_model.META, meta)
    artifacts = {"adapter": str(Path(adapter).resolve()), "meta": str(workdir / pyfunc_model.META)}
    if r.log_base_weights:
        artifacts["base"] = base
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "context", required=False),
                       ColSpec("string", "history", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", gen.max_new_tokens),
                            ParamSpec("temperature", "double", gen.temperature),
                            ParamSpec("top_p", "double", gen.top_p),
                            ParamSpec("repetition_penalty", "double", gen.repetition_penalty)]))
    return mlflow.pyfunc.log_model(
        name="model", python_model=pyfunc_model.LlmftModel(), artifacts=artifacts, signature=signature,
        # The package travels with the model, so `mlflow models serve` imports it without an install.
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=[f"{p}=={md.version(p)}" for p in SERVING_REQUIREMENTS])


def register(cfg: Config) -> dict:
    """The stage: the pipeline's adapter, judged by its own metrics files, through `promote`."""
    r, paths = cfg.register, cfg.paths
    start = time.time()
    ref = metrics.parse(r.metric)
    candidate, missing_why, marked = metrics.read(ref, Path(paths.train_metrics), Path(paths.eval_dir) / "table.json")
    direction = metrics.resolve_direction(ref, r.direction, marked)
    with tracking.start_run(cfg, new=False):
        result = promote(cfg, paths.adapter, candidate, direction, missing_why)
    result["runtime_s"] = round(time.time() - start, 1)  # the report's runtime table
    write_json(paths.register_metrics, result)
    return result


_held: set[str] = set()  # lock files this process holds: the lock is re-entrant (tune holds it around promote)


@contextmanager
def promotion_lock(cfg: Config):
    """One promotion at a time for this registry: an exclusive lock beside a local store, or in the project's
    .cache for a server (workers on one machine; see the README for several machines)."""
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        where = Path(uri.removeprefix("sqlite:///")).parent
    else:
        where = Path(".cache")
    where.mkdir(parents=True, exist_ok=True)
    path = str((where / f".llmft-promote-{cfg.register.model_name}.lock").resolve())
    if path in _held:  # a second flock on a new descriptor would wait for ourselves
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
            fcntl.flock(f, fcntl.LOCK_UN)


DONE_TAG, ADAPTER_TAG = "llmft.registered", "llmft.adapter_sha256"  # DONE_TAG: set last, after register.json


def adapter_digest(adapter: str) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(adapter).rglob("*") if p.is_file()):
        h.update(f.relative_to(adapter).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _orphaned(client, name: str) -> list:
    """Versions whose registering process (on this machine) died before finishing, oldest first."""
    here, out = socket.gethostname(), []
    for v in client.search_model_versions(f"name = '{name}'"):
        t = v.tags
        if not t.get(DONE_TAG) and t.get(tracking.HOST_TAG) == here and not tracking.alive(t.get(tracking.PID_TAG)):
            out.append(v)
    return sorted(out, key=lambda v: int(v.version))


def _none(text: str) -> Optional[str]:
    return None if text == "None" else text  # the tags hold repr(None) / str(None)


def promote(cfg: Config, adapter: str, candidate: Optional[float], direction: str, missing_why: str = "",
            extra_tags: Optional[dict] = None) -> dict:
    """Log the adapter as a model version in the active MLflow run, then promote it if `decide` says so.
    Writes the decision record to paths.register_metrics (also the version's tags) and returns it."""
    import mlflow
    from mlflow import MlflowClient, register_model, set_tags

    r = cfg.register
    if not (Path(adapter) / "adapter_config.json").exists():
        raise LlmftError(f"paths.adapter: no PEFT adapter in {adapter} (run `llmft train` first)")
    base = local_base(cfg)
    client = MlflowClient()
    run_id, digest = mlflow.active_run().info.run_id, adapter_digest(adapter)
    tags = {"promotion.metric": r.metric, "promotion.direction": direction, "promotion.candidate": repr(candidate),
            ADAPTER_TAG: digest, **(extra_tags or {})}
    if candidate is not None:
        tags[metric_tag(r.metric)] = repr(candidate)  # repr round-trips the float exactly (ties stay ties)
    else:
        tags["promotion.missing"] = missing_why
    # A kill between registering and writing register.json left a version of this very run and adapter: finish
    # that one. Registering another would make a tie with it (not_promoted) where the undisturbed run promoted.
    # (Two reruns that both pick it decide it one after the other under the lock: the second keeps the first's.)
    same = [v for v in _orphaned(client, r.model_name) if v.run_id == run_id
            and all(v.tags.get(k) == tags[k] for k in (ADAPTER_TAG, "promotion.metric", "promotion.candidate"))]
    version = str(same[-1].version) if same else None
    if version:
        for k, v in tracking.owner_tags().items():  # claimed: the sweep below and other reruns see a live owner
            client.set_model_version_tag(r.model_name, version, k, v)
        print(f"register: finishing v{version}, which a killed register of this run left unfinished")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            info = log_model(cfg, base, Path(tmp), adapter)
        version = str(register_model(info.model_uri, r.model_name, tags={**tags, **tracking.owner_tags()}).version)
    # Decide only once the version exists and while no one else decides: a racing register then sees this
    # version as the champion (or not) instead of both promoting over the same old champion.
    with promotion_lock(cfg):
        for v in _orphaned(client, r.model_name):  # others whose process died before deciding: say so on them
            if str(v.version) != version and "promotion.decision" not in v.tags:
                client.set_model_version_tag(r.model_name, v.version, "promotion.decision", "interrupted")
                client.set_model_version_tag(r.model_name, v.version, "promotion.reason",
                                             "its register process died before deciding")
        champion_version, champion = current_champion(client, r.model_name, r.alias, r.metric)
        before = client.get_model_version(r.model_name, version).tags
        if before.get("promotion.decision") in ("promoted", "not_promoted") and \
                str(champion_version) in (version, before.get("promotion.champion_version")):
            # decided before the kill, against the champion that still holds the alias (or it is the champion):
            # keep that decision; only the alias may be missing
            decision = {k: before[k] for k in ("promotion.decision", "promotion.reason", "promotion.champion",
                                                "promotion.champion_version")}
            promote_it, reason = decision["promotion.decision"] == "promoted", decision["promotion.reason"]
            champion_version, champion = _none(decision["promotion.champion_version"]), _none(decision["promotion.champion"])
            champion = float(champion) if champion is not None else None
        else:
            promote_it, reason = decide(candidate, champion_version, champion, direction)
            decision = {"promotion.decision": "promoted" if promote_it else "not_promoted", "promotion.reason": reason,
                        "promotion.champion": repr(champion), "promotion.champion_version": str(champion_version)}
            for k, v in decision.items():
                client.set_model_version_tag(r.model_name, version, k, v)
        if promote_it:
            client.set_registered_model_alias(r.model_name, r.alias, version)
    set_tags({"registry.model": r.model_name, "registry.version": version,
              "registry.decision": decision["promotion.decision"]})
    result = {"model_name": r.model_name, "version": int(version), "model_uri": f"models:/{r.model_name}/{version}",
              "alias": r.alias, "promoted": promote_it, "decision": decision["promotion.decision"], "reason": reason,
              "metric": r.metric, "direction": direction, "candidate": candidate, "champion": champion,
              "champion_version": int(champion_version) if champion_version else None}
    if candidate is None:
        result["missing"] = missing_why
    write_json(cfg.paths.register_metrics, result)
    client.set_model_version_tag(r.model_name, version, DONE_TAG, "true")
    vs = f"{r.metric} {candidate} vs champion v{champion_version}: {champion}" if champion_version else f"{r.metric} {candidate}"
    holder = version if promote_it else champion_version
    print(f"register: {r.model_name} v{version} {decision['promotion.decision']} ({reason}; {vs}, {direction}); "
          f"@{r.alias} -> {'v' + str(holder) if holder else 'none'}")
    return result
