"""Reliability, the part every push runs: kill -9 inside each pipeline stage then `dvc repro`, two
registers promoting at once, two `dvc repro` at once, load and bad requests on the served champion, bad input
through the CLI, a dummy API key that must appear nowhere, and the trust switches (pickles, remote code, hosts).

Everything is real: `dvc repro` in a temporary git + DVC project on the tiny model, processes killed with
SIGKILL (their whole process group: DVC and the stage), the SQLite MLflow store, `mlflow models serve` on
127.0.0.1, the stand-in judge on 127.0.0.1. The long part (many seeded kills, tune too) is
test_reliability_long.py (`make test-long`).
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from helpers import (KEY, assert_no_half_written, check_registry, comparable, dolly_with_enormous_rows, finish, kill_when,
                     llmft, log_has, make_adapter, model_server, project_sh, race_registers, reliability_project,
                     seed_champion, snapshot, start, store_states, undisturbed)
from judge_server import JudgeServer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # kills, races and load on real processes: not in make test-fast


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return dolly_with_enormous_rows(tmp_path_factory.mktemp("source") / "dolly_big.jsonl")


# ------------------------------------------------------------------------------------- kill -9 in each stage
def test_kill_in_every_stage_then_repro_matches_an_undisturbed_run(tmp_path, tiny_model_dir, bench_data, judge, source,
                                                                    monkeypatch, capfd):
    """prepare mid-write, train mid-save of its last checkpoint, evaluate mid-generation, register mid-logging,
    register after registering (waiting for the promotion lock): after each kill `dvc repro` picks up, and the
    last one ends with the metrics of an undisturbed run, no half-written output, no run left RUNNING, one
    champion. A second `dvc repro` started meanwhile is refused by DVC's lock and corrupts nothing. The dummy
    judge key, sent to the judge on every request, is nowhere in what either run wrote."""
    from mlflow import MlflowClient

    from llmft import registry

    base = undisturbed(tmp_path / "base", tiny_model_dir, bench_data, judge.base_url, source, monkeypatch)
    expected = comparable(base)
    monkeypatch.chdir(tmp_path)
    p = reliability_project(tmp_path / "killed", tiny_model_dir, bench_data, judge.base_url, source)
    uri = f"sqlite:///{p / 'mlflow.db'}"
    kills = {}

    # 1. prepare, while it writes its temporary output folder (the token-length stats take seconds)
    proc, log = start(["dvc", "repro"], p)
    kills["prepare"] = kill_when(proc, log, lambda: any(p.glob("data/.processed.*/train.jsonl")), "prepare mid-write")
    assert not (p / "data/processed").exists(), "the output folder appears whole or not at all"

    # 2. train, while it saves its last checkpoint (checkpoint-2 is complete): the rerun resumes from checkpoint-2
    proc, log = start(["dvc", "repro"], p)
    kills["train"] = kill_when(proc, log, lambda: (p / "models/checkpoints/checkpoint-4").exists(), "train mid-save")
    assert "Stage 'prepare' didn't change" not in log.read_text(), "prepare was killed: it must run again"
    assert not list(p.glob("data/.processed.*")), "the next prepare removed the killed one's temporary folder"
    assert not (p / "models/adapter").exists()

    # 3. evaluate, while it generates answers (after the test loss, during ROUGE / MT-Bench generation)
    proc, log = start(["dvc", "repro"], p)
    kills["evaluate"] = kill_when(proc, log, log_has(log, "evaluate: test_loss done"), "evaluate mid-generation")
    assert "train: resuming from models/checkpoints/checkpoint-2" in log.read_text()
    assert not (p / "metrics/eval.json").exists()

    # 4. register, while it uploads the model's files
    proc, log = start(["dvc", "repro"], p)
    kills["register"] = kill_when(proc, log, lambda: any(f.is_file() for f in p.glob("mlartifacts/models/*/artifacts/**/*")),
                                  "register mid-logging")
    run_id = (p / "metrics/run_id.txt").read_text().strip()
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING", "the killed register held the run open"

    # 5. register again, killed once its version exists, while it waits for the promotion lock (held here, as by a
    # racing register): the rerun must finish that version, not add a second one that ties with it
    lock = open(p / ".llmft-promote-llmft.lock", "w")
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        proc, log = start(["dvc", "repro"], p)
        kills["register (registered)"] = kill_when(
            proc, log, lambda: bool(MlflowClient(uri).search_model_versions("name = 'llmft'")), "register waiting")
    finally:
        lock.close()
    assert "tracking: marked 1 run(s) FAILED whose process had died" in log.read_text()

    # 6. the rerun that completes; a second `dvc repro` meanwhile is refused by DVC's lock
    proc, log = start(["dvc", "repro"], p)
    deadline = time.monotonic() + 600
    while "Running stage 'register'" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    second = project_sh("dvc", "repro", cwd=p, check=False)
    out = finish(proc, log)
    # DVC refuses with its repo lock (between stages) or its per-path lock (while a stage runs), naming the holder
    assert second.returncode != 0, second.stdout + second.stderr
    assert "Unable to acquire lock. Most likely another DVC process is running" in second.stderr or \
        (f"is busy, it is being blocked by:\n  (PID {proc.pid}): " in second.stderr), second.stderr
    assert "Running stage" not in second.stdout
    assert "register: finishing v1, which a killed register of this run left unfinished" in out
    assert "Data and pipelines are up to date" in project_sh("dvc", "status", cwd=p).stdout, "nothing is corrupted"

    # the same results as the undisturbed run, whole outputs, every run closed, one champion, tags consistent
    assert comparable(p) == expected
    assert (p / "models/adapter/adapter_config.json").read_bytes() == (base / "models/adapter/adapter_config.json").read_bytes()
    assert_no_half_written(p)
    runs, models = store_states(uri)
    assert all(s in ("FINISHED", "FAILED", "KILLED") for _, s in runs), runs
    assert dict(runs)[run_id] == "FINISHED" and "PENDING" not in dict(models).values(), models
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'llmft'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["promotion.decision"] == "promoted"
    assert versions[0].tags[registry.DONE_TAG] == "true"
    assert str(client.get_model_version_by_alias("llmft", "champion").version) == "1"
    assert json.loads((p / "metrics/register.json").read_text())["version"] == 1
    assert "FAILED" in dict(models).values(), "the model the killed register was uploading is marked FAILED"
    data = json.loads((p / "metrics/data.json").read_text())
    assert data["rows_in"] == 42 and data["dropped"] == 0 and data["train_tokens_max"] > 200_000, "enormous rows kept"
    assert json.loads((p / "metrics/train.json").read_text())["tokens_seen"] <= 4 * 4 * 96, "and truncated in training"

    # secrets: the key went to the judge on every request, and is in nothing either run wrote or printed
    assert judge.headers and all(h.get("authorization") == f"Bearer {KEY}" for h in judge.headers)
    printed = capfd.readouterr()
    written = [f for d in (base, p, tmp_path / "killed-logs", tmp_path / "base-logs") if d.exists()
               for f in d.rglob("*") if f.is_file() and "src" not in f.relative_to(d).parts[:1]]
    assert len(written) > 100 and any(f.name == "mlflow.db" for f in written) and any(f.suffix == ".pdf" for f in written)
    leaks = [str(f) for f in written if KEY.encode() in f.read_bytes()]
    assert not leaks, f"the API key was written to {leaks}"
    assert KEY not in printed.out + printed.err
    from pypdf import PdfReader

    text = "\n".join(page.extract_text() for page in PdfReader(str(p / "reports/report.pdf")).pages)
    assert "Results" in text and KEY not in text and "sk-reliability" not in text
    with capfd.disabled():
        print(f"\nreliability: {len(kills)} kills survived (" + ", ".join(f"{k} after {v:.1f}s" for k, v in kills.items())
              + f"); {len(written)} files and {len(judge.headers)} judge requests checked for the key")


# --------------------------------------------------------------------------------------------- races
@pytest.fixture(scope="module")
def raced(tmp_path_factory, tiny_model_dir):
    """A champion (test loss 1.5), then two registers released together: one worse (2.0), one better (1.0)."""
    root = tmp_path_factory.mktemp("race")
    store = root / "store"
    store.mkdir()
    adapters = [make_adapter(tiny_model_dir, root / f"adapter{i}", seed=30 + i) for i in range(2)]
    name = "race"
    first = seed_champion(root / "seed", store, tiny_model_dir, adapters[0], name, 1.5)
    racers = race_registers(root, store, tiny_model_dir, adapters, [2.0, 1.0], name)
    return f"sqlite:///{store / 'mlflow.db'}", name, [first, *racers], adapters


def test_racing_registers_end_with_one_champion_and_consistent_tags(raced):
    uri, name, records, _ = raced
    assert [r["version"] for r in records[:1]] == [1] and sorted(r["version"] for r in records[1:]) == [2, 3]
    better = next(r for r in records if r["candidate"] == 1.0)
    worse = next(r for r in records if r["candidate"] == 2.0)
    assert check_registry(uri, name, records) == str(better["version"])
    assert better["decision"] == "promoted" and worse["decision"] == "not_promoted"  # worse than 1.5 in either order


# --------------------------------------------------------------------------------------- load on the server
def test_served_champion_under_load_and_bad_requests(raced, tmp_path):
    """8 clients x 5 requests against `mlflow models serve` of the race's champion, with an oversized or
    malformed request from each client in between: every good request answered, every bad one a 4xx, and the
    server still up afterwards. Latency percentiles are printed for the README."""
    uri, name = raced[0], raced[1]
    json_h = {"Content-Type": "application/json"}
    good = lambda i: {"dataframe_records": [{"instruction": f"Name {i} colours."}, {"instruction": "Say hi.", "context": "x"}],
                      "params": {"max_new_tokens": 8}}  # noqa: E731
    bad = [  # (body, content type) over the default limits (64 rows, 16000 characters, 2048 new tokens) or malformed
        (json.dumps({"dataframe_records": [{"instruction": "x"}] * 65}), "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x" * 16001}]}), "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x"}], "params": {"max_new_tokens": 2049}}), "application/json"),
        ("", "application/json"),
        ("[1, 2, 3]", "application/json"),
        (json.dumps({"dataframe_records": [{"instruction": "x"}]}), "text/plain"),
        ("{" * 200_000, "application/json"),  # 200 KB of nesting
        (json.dumps({"dataframe_records": [{"instruction": "\udcff" * 4 + "x" * 4_000_000}]}, ensure_ascii=True),
         "application/json"),  # 4 MB, a lone surrogate
    ]
    with model_server(f"models:/{name}@champion", uri, tmp_path, "-t", "120") as (url, proc):
        def client(i: int) -> list[tuple[str, int, float]]:
            out = []
            with requests.Session() as s:
                for j in range(5):
                    t = time.perf_counter()
                    r = s.post(f"{url}/invocations", data=json.dumps(good(j)), headers=json_h, timeout=120)
                    ok = r.ok and len(r.json()["predictions"]) == 2
                    out.append(("good", 200 if ok else r.status_code, time.perf_counter() - t))
                    if j == 2:
                        body, ctype = bad[i]
                        r = s.post(f"{url}/invocations", data=body.encode("utf-8", "surrogatepass"),
                                   headers={"Content-Type": ctype}, timeout=120)
                        out.append((f"bad{i}", r.status_code, 0.0))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = [x for part in pool.map(client, range(8)) for x in part]
        wall = time.perf_counter() - t0
        served = [lat for kind, status, lat in results if kind == "good" and status == 200]
        failed = [(kind, status) for kind, status, _ in results if kind == "good" and status != 200]
        refused = {kind: status for kind, status, _ in results if kind != "good"}
        assert not failed and len(served) == 40, failed
        assert all(400 <= s < 500 for s in refused.values()), refused
        assert requests.get(f"{url}/ping", timeout=10).ok and proc.poll() is None
        assert requests.post(f"{url}/invocations", data=json.dumps(good(0)), headers=json_h, timeout=120).ok
        q = statistics.quantiles(served, n=100)
        print(f"\nreliability: load {len(served)} requests (8 clients x 5, 2 rows, 8 new tokens) in {wall:.1f}s, 0 failed; "
              f"p50 {statistics.median(served) * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; {len(refused)} bad requests "
              f"refused with {sorted(set(refused.values()))}")


# --------------------------------------------------------------------------------------------- bad input
BAD_FILES = [  # (file, bytes, the error's start): malformed, wrong types, missing columns, only empty, not UTF-8, ...
    ("malformed.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": "q2", "resp\n', "malformed.jsonl:2: malformed JSON"),
    ("types.jsonl", b'{"instruction": "q", "response": "a"}\n{"instruction": ["q"], "response": "a"}\n',
     "types.jsonl:2: field 'instruction' must be a string, got list"),
    ("columns.jsonl", b'{"instruction": "q", "response": "a"}\n{"prompt": "q", "answer": "a"}\n',
     "columns.jsonl:2: missing column 'instruction'"),
    ("empty.jsonl", b'{"instruction": "q", "response": ""}\n{"instruction": "r", "response": "  \\n "}\n',
     "no usable rows after cleaning (dropped {'empty_response': 2"),
    ("latin1.jsonl", b'{"instruction": "q", "response": "a"}\r\n{"instruction": "caf\xe9", "response": "a"}\r\n',
     "latin1.jsonl:2: not UTF-8 (byte 0xe9"),
    ("records.json", b'\xef\xbb\xbf[{"instruction": "q", "response": "a"}, "row"]', "records.json: record 2: expected a JSON object"),
    ("header.csv", b"\xef\xbb\xbfinstruction;response\r\nq;a\r\n", "header.csv:line 2: missing column 'instruction'"),
    ("notes.txt", b"instruction: q\n", "in/notes.txt has unsupported extension '.txt' (use .jsonl"),
]


def test_bad_data_files_exit_nonzero_and_keep_the_previous_outputs(tmp_path):
    """Each bad file through `llmft prepare`: exit 2, one line naming the file and line, no traceback, and the
    last good outputs (data/processed, metrics/data.json) byte for byte as they were."""
    (tmp_path / "params.yaml").write_text("data:\n  stats_tokenizer: false\n")
    assert llmft("prepare", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path)
    (tmp_path / "in").mkdir()
    for name, body, message in BAD_FILES:
        (tmp_path / "in" / name).write_bytes(body)
        res = llmft("prepare", f"data.source=in/{name}", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one clear line
        assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("in/")} == before, name
    print(f"\nreliability: {len(BAD_FILES)} bad data files rejected")


def test_bad_params_are_all_reported_at_once_exit_nonzero_and_touch_nothing(tmp_path):
    """A BOM, CRLF line ends, and five mistakes: every one named with its line and key, in one error, exit 2, and
    the outputs of the last good run untouched; a params file that is not UTF-8 is a clean error too."""
    outputs = {"models/adapter/adapter_model.safetensors": b"weights", "metrics/train.json": b'{"train_loss": 1.0}\n'}
    for rel, data in outputs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    text = ("train:\n  lora:\n    r: 0\n    rank_dropout: 0.1\n  learning_rate: -0.001\n  batch_size: eight\n"
            "data:\n  splits: [0.7, 0.2, 0.2]\n")
    (tmp_path / "params.yaml").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    res = llmft("train", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for expected in ("params.yaml:3: 'train.lora.r' must be >= 1", "params.yaml:4: unknown key 'train.lora.rank_dropout'",
                     "params.yaml:5: 'train.learning_rate' must be > 0",
                     "params.yaml:6: 'train.batch_size' = 'eight' is not int",
                     "params.yaml:8: 'data.splits' must be three fractions in [0, 1] summing to 1"):
        assert expected in res.stderr, (expected, res.stderr)
    (tmp_path / "params.yaml").write_bytes(b"train:\n  max_steps: 2\n# r\xe9sum\xe9\n")
    res = llmft("train", cwd=tmp_path)
    assert res.returncode == 2 and "params.yaml:3: not UTF-8 (byte 0xe9)" in res.stderr and "Traceback" not in res.stderr
    assert all((tmp_path / rel).read_bytes() == data for rel, data in outputs.items())
    assert sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file()) == sorted([*outputs, "params.yaml"])


def test_prompt_longer_than_the_context_is_answered_not_a_crash(tiny_model_dir):
    """A 1 MB instruction in the test split asked for a 40 GB attention mask and killed evaluate after training:
    the prompt now keeps its end, as much as fits the context; prompts that fit are unchanged."""
    from llmft import generate, models, templates
    from llmft.config import GenerationConfig

    model, tok = models.load_with_tokenizer(models.config_for(str(tiny_model_dir)))
    gen = GenerationConfig(max_new_tokens=4, batch_size=2)
    short = templates.render_prompt("llama2_chat", [("Name a colour.", None)])
    huge = templates.render_prompt("llama2_chat", [("Summarise: " + "word " * 250_000, None)])
    assert len(tok(huge).input_ids) > 100 * model.config.max_position_embeddings
    answers = generate.generate(model, tok, [huge, short], gen, progress=False)
    assert len(answers) == 2 and tok.truncation_side == "right" and tok.padding_side == "right"
    assert answers[1] == generate.generate(model, tok, [short], gen, progress=False)[0]


# ---------------------------------------------------------------------------------------------- trust
def code_model(src: Path, out: Path, model_type: str) -> Path:
    """A copy of the tiny model whose config maps to Python code shipped beside it; the code leaves a marker."""
    shutil.copytree(src, out)
    conf = json.loads((out / "config.json").read_text())
    conf.update(model_type=model_type, auto_map={"AutoConfig": "shipped.ShippedConfig",
                                                 "AutoModelForCausalLM": "shipped.ShippedModel"})
    (out / "config.json").write_text(json.dumps(conf))
    (out / "shipped.py").write_text(
        f"from pathlib import Path\nPath({str(out / 'RAN')!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class ShippedConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n")
    return out


def test_shipped_code_runs_only_with_trust_remote_code(tmp_path, tiny_model_dir):
    from llmft import models
    from llmft.config import load_config
    from llmft.errors import LlmftError

    known = code_model(tiny_model_dir, tmp_path / "known", "llama")
    cfg = load_config(tmp_path / "none.yaml", [f"model.base={known}"])
    assert cfg.model.trust_remote_code is False  # the default
    models.load_with_tokenizer(cfg)  # a known type: transformers' own classes
    assert not (known / "RAN").exists(), "the shipped code ran without model.trust_remote_code"
    trusted = load_config(tmp_path / "none.yaml", [f"model.base={known}", "model.trust_remote_code=true"])
    models.load_with_tokenizer(trusted)
    assert (known / "RAN").exists(), "the switch is what lets it run"

    unknown = code_model(tiny_model_dir, tmp_path / "unknown", "shipped_llama")
    with pytest.raises(LlmftError, match=r"'model.base' .* in its own Python code .* model.trust_remote_code=true"):
        load_config(tmp_path / "none.yaml", [f"model.base={unknown}"])
    res = llmft("train", f"model.base={unknown}", cwd=tmp_path)
    assert res.returncode == 2 and "model.trust_remote_code=true" in res.stderr and "Traceback" not in res.stderr
    assert not (unknown / "RAN").exists()


def test_pickle_weights_load_only_with_allow_pickle(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from llmft import models
    from llmft.config import load_config
    from llmft.errors import LlmftError

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")
    # transformers 5.23's own answer to use_safetensors=True here is an OSError that names no params key
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(pickled, use_safetensors=True)
    with pytest.raises(LlmftError, match=r"pytorch_model.bin\), and loading a pickle can run code: set model.allow_pickle=true"):
        load_config(tmp_path / "none.yaml", [f"model.base={pickled}"])
    res = llmft("evaluate", f"model.base={pickled}", cwd=tmp_path)
    assert res.returncode == 2 and "model.allow_pickle=true" in res.stderr and "Traceback" not in res.stderr
    cfg = load_config(tmp_path / "none.yaml", [f"model.base={pickled}", "model.allow_pickle=true"])
    model, _ = models.load_with_tokenizer(cfg)
    ids = torch.tensor([[1, 450, 4996]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_servers_bind_127_0_0_1_unless_told_otherwise():
    """`make ui`, the README's serve command and the MLflow commands' own defaults listen on 127.0.0.1 only."""
    import click
    from mlflow.cli import cli as mlflow_cli

    assert re.search(r"^ui:.*\n\tmlflow ui .*--host 127\.0\.0\.1", (ROOT / "Makefile").read_text(), re.M)
    serve = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("mlflow models serve")]
    assert serve and all("-h 127.0.0.1" in line for line in serve), serve
    ctx = click.Context(mlflow_cli)
    commands = {"ui": mlflow_cli.get_command(ctx, "ui"), "server": mlflow_cli.get_command(ctx, "server"),
                "models serve": mlflow_cli.get_command(ctx, "models").get_command(ctx, "serve")}
    hosts = {name: next(p.default for p in cmd.params if p.name == "host") for name, cmd in commands.items()}
    assert hosts == dict.fromkeys(commands, "127.0.0.1")
    judge = JudgeServer()
    try:
        assert judge.httpd.server_address[0] == "127.0.0.1"
    finally:
        judge.httpd.server_close()
