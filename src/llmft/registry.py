"""register stage: log the tuned model to MLflow, register it, promote it by evidence.

The candidate gets the alias (`champion`) only when it beats the current champion on the configured
metric of the evaluate output. Each version carries its metric value as a tag, so later candidates
compare against the registry, not against files that may have changed. The decision and both numbers
are tags on the new version and go to `register.output_file`.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

from . import models, tracking
from .config import Config, LlmftError, to_dict

# What the served model imports; pinned to this environment's versions. Passed explicitly because
# MLflow's inference of requirements for torch models asks for torchvision.
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "pandas",
                        "pyyaml", "tqdm")


def metric_tag(metric: str) -> str:
    return f"metric.{metric}"


def read_metric(path: str | Path, key: str) -> tuple[Optional[float], str]:
    """(value, "") for a dotted key such as `test_loss.tuned`, or (None, why it is missing).

    Metric names may themselves contain dots, so each step takes the longest prefix that is a key.
    """
    path = Path(path)
    if not path.exists():
        return None, f"{path} not found (run `llmft evaluate` first)"
    try:
        node = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlmftError(f"{path}: not valid JSON ({e})") from None
    parts = key.split(".")
    while parts:
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if isinstance(node, dict) and head in node:
                node, parts = node[head], parts[n:]
                break
        else:
            why = f" ({node.get('status')}: {node.get('reason')})" if isinstance(node, dict) and "status" in node else ""
            return None, f"'{key}' not found in {path}{why}"
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        return None, f"'{key}' in {path} is {node!r}, not a finite number"
    return float(node), ""


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


def _check_direction(path: str | Path, metric: str, direction: str) -> None:
    """Refuse e.g. `rouge_l.tuned` with `minimize`: it would promote worse models."""
    name = metric.rsplit(".", 1)[0]
    try:
        row = json.loads(Path(path).read_text()).get(name, {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return
    hib = row.get("higher_is_better") if isinstance(row, dict) else None
    if hib is not None and metric.endswith((".base", ".tuned")) and (direction == "maximize") != hib:
        want = "maximize" if hib else "minimize"
        raise LlmftError(f"register.direction={direction} but {path} marks '{name}' as "
                         f"{'higher' if hib else 'lower'} is better: set register.direction={want}")


def local_base(cfg: Config) -> str:
    """The base model as an absolute local directory, so serving never reaches for the hub."""
    base = models.resolve_base(cfg.model)
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


def log_model(cfg: Config, base: str, workdir: Path):
    """Log the pyfunc (adapter + llmft.json [+ base weights]) into the active run; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from . import pyfunc_model

    r, gen = cfg.register, cfg.evaluate.generation
    meta = {"template": cfg.data.template, "system_prompt": cfg.data.system_prompt,
            "base_model": base, "base_model_config": cfg.model.base,
            "generation": to_dict(gen),
            "limits": {"max_rows": r.max_request_rows, "max_input_chars": r.max_input_chars,
                       "max_new_tokens": r.max_new_tokens_limit}}
    tracking.write_json(workdir / pyfunc_model.META, meta)
    artifacts = {"adapter": str(Path(cfg.train.output_dir).resolve()), "meta": str(workdir / pyfunc_model.META)}
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
    from mlflow import MlflowClient, register_model, set_tags

    r = cfg.register
    for key, value in (("max_request_rows", r.max_request_rows), ("max_input_chars", r.max_input_chars),
                       ("max_new_tokens_limit", r.max_new_tokens_limit)):
        if value < 1:
            raise LlmftError(f"register.{key} = {value} must be >= 1")
    adapter = Path(cfg.train.output_dir)
    if not (adapter / "adapter_config.json").exists():
        raise LlmftError(f"train.output_dir: no PEFT adapter in {adapter} (run `llmft train` first)")
    base = local_base(cfg)
    candidate, missing_why = read_metric(cfg.evaluate.output_file, r.metric)
    _check_direction(cfg.evaluate.output_file, r.metric, r.direction)

    with tracking.start_run(cfg.tracking, new=False), tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient()
        champion_version, champion = current_champion(client, r.model_name, r.alias, r.metric)
        promote, reason = decide(candidate, champion_version, champion, r.direction)
        tags = {"promotion.decision": "promoted" if promote else "not_promoted", "promotion.reason": reason,
                "promotion.metric": r.metric, "promotion.direction": r.direction,
                "promotion.candidate": repr(candidate), "promotion.champion": repr(champion),
                "promotion.champion_version": str(champion_version)}
        if candidate is not None:
            tags[metric_tag(r.metric)] = repr(candidate)  # repr round-trips the float exactly (ties stay ties)
        else:
            tags["promotion.missing"] = missing_why
        info = log_model(cfg, base, Path(tmp))
        version = str(register_model(info.model_uri, r.model_name, tags=tags).version)
        if promote:
            client.set_registered_model_alias(r.model_name, r.alias, version)
        set_tags({"registry.model": r.model_name, "registry.version": version,
                  "registry.decision": tags["promotion.decision"]})

    result = {"model_name": r.model_name, "version": int(version), "model_uri": f"models:/{r.model_name}/{version}",
              "alias": r.alias, "promoted": promote, "decision": tags["promotion.decision"], "reason": reason,
              "metric": r.metric, "direction": r.direction, "candidate": candidate, "champion": champion,
              "champion_version": int(champion_version) if champion_version else None}
    if candidate is None:
        result["missing"] = missing_why
    tracking.write_json(r.output_file, result)
    vs = f"{r.metric} {candidate} vs champion v{champion_version}: {champion}" if champion_version else f"{r.metric} {candidate}"
    holder = version if promote else champion_version
    print(f"register: {r.model_name} v{version} {tags['promotion.decision']} ({reason}; {vs}, {r.direction}); "
          f"@{r.alias} -> {'v' + str(holder) if holder else 'none'}")
    return result
