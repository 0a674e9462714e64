"""Registry + serving end to end: a real `mlflow server` (SQLite backend, proxied artifacts) and a real
`mlflow models serve` of the champion, both on 127.0.0.1, both stopped by the fixtures.

The served process gets no PYTHONPATH and no hub: llmft comes from the model's code_paths, the base
model from the local path recorded in the model.
"""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import helpers
from helpers import champion_version, free_port, make_adapter, model_server, register_with, registry_config, version_tags
from llmft import generate, models, serving, templates
from llmft.config import GenerationConfig
from llmft.errors import LlmftError

SYSTEM = "Answer in one short sentence."
pytestmark = pytest.mark.slow  # a real `mlflow server` and `mlflow models serve`: not in make test-fast
ROWS = [{"instruction": "Name a primary colour."},
        {"instruction": "Summarise the text.", "context": "Paris is the capital of France."},
        {"instruction": "And the second one?", "history": json.dumps([["List two fruits.", "Apple, pear."]])}]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow_server")
    try:
        with helpers.tracking_server(f"sqlite:///{root}/mlflow.db", root) as url:
            yield url
    finally:
        mlflow.set_tracking_uri(None)  # later modules must not inherit a dead server


@pytest.fixture(scope="module")
def registered(tracking_server, tmp_path_factory, tiny_model_dir):
    """Three versions through the server: first (champion), worse (kept out), better (new champion)."""
    root = tmp_path_factory.mktemp("registered")
    adapters = [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=10 + i) for i in range(2)]
    cfg = registry_config(root, tracking_server, tiny_model_dir, adapters[0], "served")
    cfg.data.template, cfg.data.system_prompt = "llama2_chat", SYSTEM
    cfg.register.max_request_rows, cfg.register.max_input_chars = 16, 2000
    cfg.register.batch_window_ms = 100  # requests sent together always make one batch, even on a busy machine
    results = [register_with(cfg, 2.0), register_with(cfg, 2.5, adapters[1]), register_with(cfg, 1.0)]
    return cfg, adapters, results


@pytest.fixture(scope="module")
def served(registered, tracking_server, tmp_path_factory):
    """(URL, server log) of `mlflow models serve` of the champion."""
    cfg, work = registered[0], tmp_path_factory.mktemp("serve")
    with model_server(f"models:/{cfg.register.model_name}@champion", tracking_server, work) as (url, _):
        yield url, work / "serve.log"


@pytest.fixture(scope="module")
def endpoint(served):
    return served[0]


def in_process(cfg, base: Path, adapter: Path, rows: list[dict], **gen) -> list[str]:
    model, tok = models.load_with_tokenizer(models.config_for(str(base)), str(adapter))
    prompts = [templates.render_prompt(cfg.data.template, [*json.loads(r.get("history", "[]")), (r["instruction"], None)],
                                       r.get("context", ""), cfg.data.system_prompt, tok) for r in rows]
    return generate.generate(model, tok, prompts, GenerationConfig(**{**vars(cfg.evaluate.generation), **gen}), progress=False)


def test_promotion_through_the_server(registered):
    cfg, _, (r1, r2, r3) = registered
    assert [(r["version"], r["promoted"], r["reason"]) for r in (r1, r2, r3)] == \
        [(1, True, "no_champion"), (2, False, "worse"), (3, True, "better")]
    assert (r3["candidate"], r3["champion"], r3["champion_version"]) == (1.0, 2.0, 1)
    assert champion_version("served") == "3"
    tags = version_tags("served", 2)
    assert (tags["promotion.decision"], tags["promotion.candidate"], tags["promotion.champion"]) == ("not_promoted", "2.5", "2.0")


def test_served_champion_matches_in_process(endpoint, registered, tiny_model_dir):
    cfg, adapters, _ = registered
    served = serving.query(endpoint, ROWS, progress=False)
    assert served == in_process(cfg, tiny_model_dir, adapters[1], ROWS)  # v3 = adapter 1 holds @champion
    assert served != in_process(cfg, tiny_model_dir, adapters[0], ROWS)
    assert all(served)
    # Small batches go in several requests and come back in order.
    assert serving.query(endpoint, ROWS, batch_size=2, progress=False) == served


def test_params_reach_generation(endpoint, registered, tiny_model_dir):
    cfg, adapters, _ = registered
    greedy = serving.query(endpoint, ROWS, progress=False)
    short = serving.query(endpoint, ROWS, params={"max_new_tokens": 1}, progress=False)
    assert short == in_process(cfg, tiny_model_dir, adapters[1], ROWS, max_new_tokens=1)
    assert all(len(s) < len(g) for s, g in zip(short, greedy))
    sampled = serving.query(endpoint, ROWS, params={"temperature": 1.5, "top_p": 0.95}, progress=False)
    assert sampled == in_process(cfg, tiny_model_dir, adapters[1], ROWS, temperature=1.5, top_p=0.95)
    assert sampled != greedy


@pytest.mark.parametrize("body, expect", [
    (b"not json{", "valid JSON"),
    ({"rows": [{"instruction": "x"}]}, "dataframe_records"),
    ({"dataframe_records": [{"instrucion": "x"}]}, "missing inputs ['instruction']"),
    ({"dataframe_records": [{"instruction": 5}]}, "'instruction' must be a non-empty string"),
    ({"dataframe_records": [{"instruction": "x", "context": 7}]}, "'context' must be a string"),
    ({"dataframe_records": [{"instruction": "x", "history": "[[1, 2]]"}]}, "'history' must be a JSON list"),
    ({"dataframe_records": [{"instruction": "x", "history": "[["}]}, "'history' is not valid JSON"),
    ({"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    ({"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": 10**6}}, "must be in [1, 2048]"),
    ({"dataframe_records": [{"instruction": "x"}], "params": {"top_p": 0.0}}, "'top_p' = 0.0 must be in (0, 1]"),
    ({"dataframe_records": [{"instruction": "x" * 2001}]}, "2001 characters of input; at most 2000"),
    ({"dataframe_records": [{"instruction": "x"}] * 17}, "17 rows in one request; at most 16"),
])
def test_bad_requests_get_4xx_and_the_server_stays_up(endpoint, body, expect):
    data = body if isinstance(body, bytes) else json.dumps(body)
    resp = requests.post(f"{endpoint}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= resp.status_code < 500, resp.text
    assert expect in resp.json()["message"]
    assert requests.get(f"{endpoint}/ping", timeout=10).ok
    assert len(serving.query(endpoint, ROWS[:1], params={"max_new_tokens": 2}, progress=False)) == 1


def test_client_errors_are_clear(endpoint):
    with pytest.raises(LlmftError, match=r"HTTP 400: 17 rows in one request; at most 16 allowed$"):
        serving.query(endpoint, [{"instruction": "x"}] * 17, batch_size=17, progress=False)
    with pytest.raises(LlmftError, match="unreachable"):
        serving.query(f"http://127.0.0.1:{free_port()}", ROWS, progress=False, timeout=5)


# ------------------------------------------------------------------------------------------ concurrent requests
def together(endpoint: str, bodies: list[dict]) -> list[requests.Response]:
    """POST each body from a thread of its own, all released at once."""
    start = threading.Barrier(len(bodies))

    def one(body):
        start.wait()
        return requests.post(f"{endpoint}/invocations", data=json.dumps(body), timeout=120,
                             headers={"Content-Type": "application/json"})

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def batches(log: Path, skip: int, requests_: int) -> list[int]:
    """Requests per batch in the server log's batch lines after the first `skip`, once they add up to `requests_`
    (a batch's line comes after its answers have gone out)."""
    deadline = time.monotonic() + 30
    while True:
        sizes = [int(n) for n in re.findall(r"batch of (\d+) requests", log.read_text())][skip:]
        if sum(sizes) >= requests_ or time.monotonic() > deadline:
            return sizes


def test_concurrent_requests_share_a_batch_and_get_their_own_answers(served):
    url, log = served
    rows = [[{"instruction": f"Name {i + 1} colours."}] for i in range(7)] + [ROWS, ROWS[1:], [ROWS[2]]]
    alone = [serving.query(url, r, progress=False) for r in rows]  # one at a time: each a batch of its own
    seen = len(batches(log, 0, 0))
    responses = together(url, [{"dataframe_records": r} for r in rows])
    assert [r.status_code for r in responses] == [200] * len(rows), [r.text for r in responses]
    assert [r.json()["predictions"] for r in responses] == alone  # left padding: greedy answers as alone
    # one batch: more requests than MLflow's own request threads (6 on 2 cores) wait in predict at once
    assert batches(log, seen, len(rows)) == [len(rows)]


def test_concurrent_requests_keep_their_own_settings(endpoint, registered, tiny_model_dir):
    cfg, adapters, _ = registered
    settings = [{}, {"max_new_tokens": 1}, {"temperature": 1.5, "top_p": 0.95}, {"max_new_tokens": 3}, {},
                {"max_new_tokens": 1}]
    responses = together(endpoint, [{"dataframe_records": ROWS, "params": p} for p in settings])
    assert [r.status_code for r in responses] == [200] * len(settings), [r.text for r in responses]
    # each as it is generated alone in process (the sampled request is the only one with its settings)
    assert [r.json()["predictions"] for r in responses] == \
        [in_process(cfg, tiny_model_dir, adapters[1], ROWS, **p) for p in settings]


def test_bad_requests_among_concurrent_ones_get_400_alone(served, registered, tiny_model_dir):
    url, log = served
    cfg, adapters, _ = registered
    good = [{"dataframe_records": ROWS[i:i + 1]} for i in range(3)] + [{"dataframe_records": ROWS}]
    bad = [({"dataframe_records": [{"instruction": "x" * 2001}]}, "2001 characters of input"),
           ({"dataframe_records": [ROWS[0], {"instruction": "x", "history": "[["}]}, "'history' is not valid JSON"),
           ({"dataframe_records": ROWS, "params": {"max_new_tokens": 10**6}}, "must be in [1, 2048]")]
    seen = len(batches(log, 0, 0))
    responses = together(url, [b for pair in zip(good, [b for b, _ in bad] + [None]) for b in pair if b is not None])
    good_r, bad_r = responses[0::2], responses[1::2]
    assert [r.status_code for r in good_r] == [200] * len(good), [r.text for r in good_r]
    expected = in_process(cfg, tiny_model_dir, adapters[1], ROWS)
    assert [r.json()["predictions"] for r in good_r] == [expected[:1], expected[1:2], expected[2:], expected]
    assert [(r.status_code, msg in r.json()["message"]) for r, (_, msg) in zip(bad_r, bad)] == [(400, True)] * len(bad)
    assert sum(batches(log, seen, len(good))) == len(good), "a bad request never joins a batch"
