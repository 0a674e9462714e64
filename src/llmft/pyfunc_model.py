"""The served model: an MLflow pyfunc that formats plain instructions with the training template and
generates with base + LoRA adapter.

`mlflow models serve` loads it in a fresh process. Everything it needs is in its artifacts (the
adapter, `llmft.json`, optionally the base weights) or on a local path recorded in `llmft.json`;
nothing comes from the hub. Bad requests raise MlflowException(INVALID_PARAMETER_VALUE), which the
scoring server answers with HTTP 400 and stays up. Valid requests that arrive together share a generation
batch (batching.py).
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

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


def _serve_in_threads(max_rows: int) -> None:
    """Let twice `max_rows` requests wait in `predict` at once (a batch generating while the next one gathers), and
    log each batch, when called from the scoring server's threads.

    MLflow 3.17's scoring server runs each request's `predict` in `asyncio.to_thread`, on its event loop's default
    executor: min(32, CPUs + 4) threads, 6 on 2 cores. The other requests wait for a thread before `predict`, so no
    batch could hold more than 6. uvicorn loads the model before it starts that loop, so the first request (in one
    of those threads) looks the loop up and gives it a larger default executor, which later requests get.
    Called where no loop runs in another thread (`mlflow.pyfunc.load_model` in a script), it changes nothing."""
    try:
        asyncio.get_running_loop()
        return  # called in the loop's own thread: not the scoring server
    except RuntimeError:
        pass
    # type(), not isinstance: isinstance reads __class__, which some objects answer with a deprecation warning
    loops = [o for o in gc.get_objects() if issubclass(type(o), asyncio.AbstractEventLoop) and o.is_running()]
    if len(loops) != 1:
        return
    stock, n = min(32, (os.cpu_count() or 1) + 4), 2 * max_rows
    loops[0].call_soon_threadsafe(loops[0].set_default_executor, ThreadPoolExecutor(max(n, stock), "llmft-request"))
    log = logging.getLogger("llmft")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    log.info("serving: %d request threads (MLflow's were %d), batches of up to %d rows", max(n, stock), stock, max_rows)


class LlmftModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from llmft import models
        from llmft.batching import Batcher

        with open(context.artifacts["meta"]) as f:
            self.meta = json.load(f)
        base = context.artifacts.get("base") or self.meta["base_model"]
        # the model block the registered version was trained with, its base now a local folder (weights logged
        # with the model, or the hub snapshot of model.revision): the same loader as every verb
        cfg = models.config_for(base, **self.meta["model"])
        adapter = context.artifacts["adapter"]
        self.model, self.tok = models.load_with_tokenizer(cfg, adapter)
        # One worker thread generates for every request (generate() also flips the shared tokenizer's padding side).
        batching = self.meta["batching"]
        self.batcher = Batcher(self._generate, batching["window_ms"] / 1000, batching["max_rows"])
        self.setup, self.set_up = threading.Lock(), False

    def _generate(self, prompts: list[str], settings: dict) -> list[str]:
        from llmft.config import GenerationConfig
        from llmft.generate import generate

        # the whole batch in one generate call on the plain path (evaluate's batch_size is for its own memory)
        gen = GenerationConfig(**{**settings, "batch_size": self.meta["batching"]["max_rows"]})
        return generate(self.model, self.tok, prompts, gen, progress=False)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        # pd.DataFrame: the scoring server's rows; MLflow validates them against the logged signature
        from llmft.templates import render_prompt

        with self.setup:  # the first request sets up the server's threads; the others pass straight through
            if not self.set_up:
                _serve_in_threads(self.meta["batching"]["max_rows"])
                self.set_up = True
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
        # Valid: now it may join a batch. Left padding leaves greedy answers as they are alone; a repetition penalty
        # would also penalise the pad (= EOS) tokens a row is padded with, so such a request generates alone.
        return self.batcher.submit(prompts, settings, share=settings["repetition_penalty"] == 1.0)
