r"""evaluate against a real OpenAI-compatible server that nobody here wrote: llama-cpp-python's `llama_cpp.server`
serving the embedded SmolLM2-135M GGUF on 127.0.0.1 as the judge of AlpacaEval and MT-Bench (long suite).

    make test-long                                     # or: pytest -m long tests/test_eval_real_judge.py

llama-cpp-python builds from its sdist with a C++ compiler (about 8 minutes on 2 cores), so it is not in the
requirements; install it beside the venv and point PYTHONPATH at it. Build it without -march=native and AMX:
on these machines a native build's AMX kernels (`tileloadd` in ggml's OpenMP workers) die with SIGILL at the
first completion, though cpuinfo lists AMX:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        pip install --no-deps --target /tmp/llamacpp llama-cpp-python==0.3.36 sse-starlette==3.7.0 starlette-context==0.5.1
    PYTHONPATH=/tmp/llamacpp make test-long

What it records, as observed here (December 2026, 6 min on 2 cores): AlpacaEval's logprob annotator parses all
12 judgments of so small a model (one token, `m` or `M`, read from the logprobs); of its 8 MT-Bench judgments
one carried a rating (base, turn 1) and none on the tuned side, so MT-Bench yields no result, which must be an
error row and a failed stage (LlmftError, exit code 2 from the CLI) whose summary line says so, not a quiet
success. A judge that happened to rate both sides would give a row instead; the test accepts either outcome
only when it is reported as what it is.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import free_port, make_adapter, project_config, start_process, stop_process, wait_until_up
from llmft import models
from llmft.errors import LlmftError
from llmft.evaluate import evaluate

pytestmark = pytest.mark.long

HOW = ("needs llama-cpp-python 0.3.36, built from its sdist (~8-20 min): CMAKE_ARGS=\"-DGGML_NATIVE=OFF "
       "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
       "-DGGML_AMX_BF16=OFF\" pip install --no-deps --target /tmp/llamacpp llama-cpp-python==0.3.36 "
       "sse-starlette==3.7.0 starlette-context==0.5.1, then PYTHONPATH=/tmp/llamacpp make test-long")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(HOW)
    gguf = models.embedded_gguf()
    work = tmp_path_factory.mktemp("llama_server")
    port, log = free_port(), work / "server.log"
    # n_ctx 8192 (SmolLM2's trained context): AlpacaEval prompts hold a GPT-4-turbo reference answer
    proc = start_process([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                          "--port", str(port), "--n_ctx", "8192"], log, cwd=work, env=dict(os.environ))
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, log, timeout=180)
        yield f"http://127.0.0.1:{port}/v1", proc, log
    finally:
        stop_process(proc)


def test_evaluate_with_llama_cpp_server_as_the_judge(llama_server, tiny_model_dir, shared_data, tmp_path, capsys):
    url, proc, log = llama_server
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    cfg = project_config(
        tmp_path, "register.metric=train.eval_loss", "evaluate.benchmarks=[alpaca_eval,mt_bench]",
        f"evaluate.alpaca_eval_data={shared_data / 'alpaca_eval' / 'gpt4_1106_preview_outputs.json'}",
        f"evaluate.mt_bench_data={shared_data / 'mt_bench'}", "evaluate.alpaca_eval_rows=4", "evaluate.mt_bench_rows=2",
        "evaluate.generation.max_new_tokens=16", "evaluate.bootstrap_samples=200",
        "evaluate.judge.model=smollm2-135m", f"evaluate.judge.base_url={url}",
        "evaluate.judge.max_tokens=256",  # FastChat's 2048 at CPU speed would take minutes per judgment
        "evaluate.judge.max_concurrency=1", "evaluate.judge.timeout_s=300", model=tiny_model_dir, adapter=adapter)
    failed = None
    try:
        evaluate(cfg)
    except LlmftError as e:
        failed = str(e)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    table = json.loads((Path(cfg.paths.eval_dir) / "table.json").read_text())
    meta = json.loads((Path(cfg.paths.eval_dir) / "meta.json").read_text())
    print(f"\nsummary: {summary}\njudge calls: {json.dumps(meta['judge_calls'])}")
    # a server that died (SIGILL is -4) shows up to evaluate as an unreachable judge: say what happened
    assert proc.poll() is None, f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}"

    # AlpacaEval: 4 instructions x (base, tuned, head to head), every one parsed from the logprobs
    assert meta["judge_calls"]["alpaca_eval"]["judgments"] == 12
    win = table["alpaca_eval_win_rate"]
    assert "status" not in win and win["parse_failures"] == {"base": 0, "tuned": 0} and win["n"] == 4
    assert table["alpaca_eval_tuned_vs_base"]["parse_failures"] == 0
    # MT-Bench: 2 questions x 2 turns x 2 sides. Whatever the small judge wrote, the outcome is told honestly
    assert meta["judge_calls"]["mt_bench"]["judgments"] + meta["judge_calls"]["mt_bench"]["given_up"] == 8
    judged = [json.loads(x) for x in (Path(cfg.paths.eval_dir) / "outputs" / "mt_bench_judgments.jsonl")
              .read_text().splitlines()]
    unparsed = {side: sum(r["score"] == -1 for r in judged if r["model"] == side) for side in ("base", "tuned")}
    row = table.get("mt_bench") or table["mt_bench_score"]
    assert len(judged) == 8 and row["parse_failures"] == unparsed  # every unparsable judgment is counted
    if "mt_bench" in table:  # no (question, turn) rated on both sides: no result
        assert table["mt_bench"]["status"] == "error" and "no judgment could be parsed" in table["mt_bench"]["reason"]
        assert failed is not None and "mt_bench" in failed
        assert summary.startswith("evaluate: FAILED") and "mt_bench FAILED: no judgment could be parsed" in summary
    else:
        assert failed is None and "FAILED" not in summary
        assert table["mt_bench_score"]["n_paired"] >= 1
