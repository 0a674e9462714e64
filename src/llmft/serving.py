"""Client for any `mlflow models serve` endpoint of the registered model.

    mlflow models serve -m models:/llmft@champion --env-manager local -h 127.0.0.1 -p 5001
    query("http://127.0.0.1:5001", [{"instruction": "Name three primes."}], {"max_new_tokens": 64})

Rows are plain instructions (`instruction`, optional `context`, optional `history`): the served model
applies the prompt template itself. Parameters are those its signature declares: max_new_tokens,
temperature, top_p, repetition_penalty.
"""
from __future__ import annotations

import json
from typing import Optional

from .errors import LlmftError


def _server_message(resp) -> str:
    try:
        body = resp.json()
        text = str(body.get("message", body) if isinstance(body, dict) else body)
    except ValueError:
        text = resp.text
    # The scoring server prefixes model errors with a printout of the whole input DataFrame.
    if text.startswith("Failed to predict data") and "\nError: " in text:
        text = text.split("\nError: ", 1)[1]
    return text.strip()[:2000]


def query(endpoint: str, rows: list[dict], params: Optional[dict] = None, batch_size: int = 8,
          timeout: float = 600.0, progress: bool = True) -> list[str]:
    """One generated answer per row, in order, sent `batch_size` rows per request."""
    import requests
    from tqdm.auto import tqdm

    url = endpoint.rstrip("/")
    url = url if url.endswith("/invocations") else url + "/invocations"
    answers: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"querying {endpoint}", disable=not progress, unit="batch"):
        batch = [{k: json.dumps(v) if k == "history" and not isinstance(v, str) else v
                  for k, v in row.items() if v is not None} for row in rows[i:i + batch_size]]
        payload = {"dataframe_records": batch, **({"params": params} if params else {})}
        try:
            resp = requests.post(url, json=payload, timeout=timeout)
        except requests.RequestException as e:
            raise LlmftError(f"model endpoint {url} unreachable: {e}") from None
        if not resp.ok:
            raise LlmftError(f"model endpoint {url} answered HTTP {resp.status_code}: {_server_message(resp)}")
        predictions = resp.json().get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(batch):
            raise LlmftError(f"model endpoint {url} returned {predictions!r:.200} for {len(batch)} rows")
        answers += [str(p) for p in predictions]
    return answers
