"""Registry + serving end to end: a real `mlflow server` (SQLite backend, proxied artifacts) and a real
`mlflow models serve` of the champion, both on 127.0.0.1, both stopped by the fixtures.

The served process gets no PYTHONPATH and no hub: llmft comes from the model's code_paths, the base
model from the local path recorded in the model.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from llmft import generate, models, serving, templates
from llmft.config import GenerationConfig
from llmft.errors import LlmftError
from test_registry import champion_version, make_adapter, make_cfg, register_with, version_tags

SYSTEM = "Answer in one short sentence."
ROWS = [{"instruction": "Name a primary colour."},
        {"instruction": "Summarise the text.", "context": "Paris is the capital of France."},
        {"instruction": "And the second one?", "history": json.dumps([["List two fruits.", "Apple, pear."]])}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(args: list[str], log: Path, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Its own process group, so stopping it also stops the workers it spawns (uvicorn)."""
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the whole group, wait until every member is gone (the leader may exit before its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, else it lingers as a zombie member of the group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow_server")
    port, log = free_port(), root / "server.log"
    proc = start_process([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                          "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], log, cwd=root,
                         # No background job runners (GenAI scoring): 7 idle processes on a 2-core runner.
                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        mlflow.set_tracking_uri(None)  # later modules must not inherit a dead server


@pytest.fixture(scope="module")
def registered(tracking_server, tmp_path_factory, tiny_model_dir):
    """Three versions through the server: first (champion), worse (kept out), better (new champion)."""
    root = tmp_path_factory.mktemp("registered")
    adapters = [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=10 + i) for i in range(2)]
    cfg = make_cfg(root, (tracking_server, ""), tiny_model_dir, adapters[0], "served")
    cfg.data.template, cfg.data.system_prompt = "llama2_chat", SYSTEM
    cfg.register.max_request_rows, cfg.register.max_input_chars = 16, 2000
    results = [register_with(cfg, 2.0), register_with(cfg, 2.5, adapters[1]), register_with(cfg, 1.0)]
    return cfg, adapters, results


@pytest.fixture(scope="module")
def endpoint(registered, tracking_server, tmp_path_factory):
    cfg = registered[0]
    root = tmp_path_factory.mktemp("serve")
    port, log = free_port(), root / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=tracking_server,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = start_process([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{cfg.register.model_name}@champion",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], log, cwd=root, env=env)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


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
