"""The served model: an MLflow pyfunc that formats plain instructions with the training template and
generates with base + LoRA adapter.

`mlflow models serve` loads it in a fresh process. Everything it needs is in its artifacts (the
adapter, `llmft.json`, optionally the base weights) or on a local path recorded in `llmft.json`;
nothing comes from the hub. Bad requests raise MlflowException(INVALID_PARAMETER_VALUE), which the
scoring server answers with HTTP 400 and stays up.
"""
from __future__ import annotations

import json
import math
import threading

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

META = "llmft.json"
PARAMS = ("max_new_tokens", "temperature", "top_p", "repetition_penalty")


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _optional_text(row: dict, key: str, i: int) -> str:
    value = row.get(key)
    # An optional column arrives as None or NaN in the records that leave it out.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise bad_request(f"row {i}: '{key}' must be a string, got {value!r:.50}")
    return value


def parse_history(raw: str, row: int) -> list[tuple[str, str]]:
    """`history` is a JSON list of [user, assistant] pairs for the earlier turns of a conversation."""
    if not raw:
        return []
    try:
        pairs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad_request(f"row {row}: 'history' is not valid JSON ({e})") from None
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in pairs):
        raise bad_request(f"row {row}: 'history' must be a JSON list of [user, assistant] string pairs")
    return [(u, a) for u, a in pairs]


def check_params(p: dict, limits: dict) -> None:
    """Range checks the signature's types cannot express (MLflow has already checked the types)."""
    checks = [("max_new_tokens", 1 <= p["max_new_tokens"] <= limits["max_new_tokens"],
               f"must be in [1, {limits['max_new_tokens']}]"),
              ("temperature", math.isfinite(p["temperature"]) and p["temperature"] >= 0, "must be >= 0"),
              ("top_p", 0 < p["top_p"] <= 1, "must be in (0, 1]"),
              ("repetition_penalty", math.isfinite(p["repetition_penalty"]) and p["repetition_penalty"] > 0,
               "must be > 0")]
    for name, ok, msg in checks:
        if not ok:
            raise bad_request(f"param '{name}' = {p[name]!r} {msg}")


class LlmftModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from llmft import models

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        base = context.artifacts.get("base") or self.meta["base_model"]
        # the model block the registered version was trained with, its base now a local folder (weights logged
        # with the model, or the hub snapshot of model.revision): the same loader as every verb
        cfg = models.config_for(base, **self.meta["model"])
        adapter = context.artifacts["adapter"]
        self.model, self.tok = models.load_with_tokenizer(cfg, adapter)
        # The scoring server runs requests in threads; generate() flips the shared tokenizer's padding side.
        self.lock = threading.Lock()

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        # pd.DataFrame: the scoring server's rows; MLflow validates them against the logged signature
        from llmft.config import GenerationConfig
        from llmft.generate import generate
        from llmft.templates import render_prompt

        meta, limits = self.meta, self.meta["limits"]
        rows = model_input.to_dict("records")
        if len(rows) > limits["max_rows"]:
            raise bad_request(f"{len(rows)} rows in one request; at most {limits['max_rows']} allowed")
        prompts = []
        for i, row in enumerate(rows):
            instruction, context_ = row.get("instruction"), _optional_text(row, "context", i)
            if not isinstance(instruction, str) or not instruction.strip():
                raise bad_request(f"row {i}: 'instruction' must be a non-empty string, got {instruction!r:.50}")
            history = parse_history(_optional_text(row, "history", i), i)
            size = len(instruction) + len(context_) + sum(len(u) + len(a) for u, a in history)
            if size > limits["max_input_chars"]:
                raise bad_request(f"row {i}: {size} characters of input; at most {limits['max_input_chars']} allowed")
            turns = [*history, (instruction, None)]
            prompts.append(render_prompt(meta["template"], turns, context_, meta["system_prompt"], self.tok))
        settings = {**meta["generation"], **{k: v for k, v in (params or {}).items() if k in PARAMS}}
        check_params(settings, limits)
        gen = GenerationConfig(**settings)
        with self.lock:
            return generate(self.model, self.tok, prompts, gen, progress=False)
