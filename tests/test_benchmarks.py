"""The benchmark scripts run: each one on CPU with the tiny model, a few steps, its numbers present and sane.

The GPU numbers themselves are in benchmarks/README.md; these tests keep the commands behind them runnable, and pin
what can be checked without a GPU (the FLOP count, the power-log summary of the committed runs, the loss comparison).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
import flops  # noqa: E402


def run(*argv, timeout=600) -> str:
    """A benchmark script as a user runs it, from the repository root; its output, and the output on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{argv[0]} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def assets(tmp_path_factory, bench_data) -> Path:
    """make_assets.py on the fixture's Dolly rows: the 7B config folder, the formatted rows, their lengths."""
    out = tmp_path_factory.mktemp("assets")
    run(BENCH / "make_assets.py", "--out", out, "--dolly", bench_data["dolly"], "--stats", out / "stats.json")
    return out


def smoke(out: Path, model: Path, data: Path, *names: str, extra=()) -> tuple[str, dict]:
    stdout = run(BENCH / "bench.py", *names, "--smoke", "--model", model, "--data", data, "--out", out, *extra)
    return stdout, json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def speed(tmp_path_factory, tiny_model_dir, assets) -> tuple[str, dict]:
    """One driver invocation with the training, baseline and generation configurations (about 1.5 min on 2 cores)."""
    return smoke(tmp_path_factory.mktemp("speed"), tiny_model_dir, assets / "data", "bf16", "generate", "baseline")


def by_name(result: dict) -> dict:
    return {r["name"]: r for r in result["runs"]}


def test_make_assets_writes_the_7b_config_the_rows_and_their_lengths(assets):
    cfg = json.loads((assets / "llama2-7b" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (4096, 32, 11008)
    assert not list((assets / "llama2-7b").glob("*.safetensors"))  # no weights: the runs build random ones
    rows = [json.loads(line) for line in (assets / "data" / "train.jsonl").read_text().splitlines()]
    lengths = json.loads((assets / "data" / "lengths.json").read_text())
    stats = json.loads((assets / "stats.json").read_text())
    assert len(rows) == len(lengths) == stats["rows"] == 48 and rows[0]["prompt"] and rows[0]["completion"]
    assert min(lengths) > 10 and stats["mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_make_assets_saves_random_weights_that_load(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run(BENCH / "make_assets.py", "--random-weights", tmp_path / "w", "--model", tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.hidden_size == 64 and (tmp_path / "w" / "tokenizer.json").exists()


def test_bench_prints_one_line_a_run_and_records_where_it_ran(speed):
    stdout, result = speed
    assert [r["name"] for r in result["runs"]] == ["baseline", "bf16", "generate"]  # the baseline first
    assert re.search(r"^bench: baseline +[\d,]+ tok/s, peak -, 1\.00x baseline", stdout, re.M)
    assert re.search(r"^bench: bf16 +[\d,]+ tok/s, peak -, [\d.]+x baseline", stdout, re.M)
    assert re.search(r"^bench: generate +[\d,]+ new tok/s, peak -, plain generate [\d,]+", stdout, re.M)
    env = result["env"]
    assert env["gpu"] == "cpu" and env["versions"]["torch"] and re.fullmatch(r"[0-9a-f]{7}", env["commit"] or "")
    assert env["date"].startswith(time.strftime("%Y-", time.gmtime()))
    runs = by_name(result)
    assert all(r["rc"] == 0 for r in runs.values())
    assert runs["bf16"]["commands"][0].startswith("python -m llmft train --params configs/llama2-7b-lora.yaml ")
    assert runs["bf16"]["x_baseline"] == pytest.approx(runs["bf16"]["tokens_per_s"] / runs["baseline"]["tokens_per_s"],
                                                       rel=1e-3)


def test_a_training_run_reports_the_stages_steady_rate(speed):
    r = by_name(speed[1])["bf16"]
    m = r["train_json"]
    assert m["steps"] == 4 and 0 < m["steady_tokens_per_s"] == r["tokens_per_s"]
    assert m["tokens_seen"] > 4 * 20  # batch 2 of packed rows, each several fixture rows long


def test_baseline_trainer_counts_real_tokens_of_the_timed_steps(speed):
    b = by_name(speed[1])["baseline"]["baseline_json"]
    assert b["timed_steps"] == 3 and b["batch_size"] == 2 and b["max_length"] == 128
    assert 0 < b["real_tokens_per_step"] < 2 * 128  # real tokens only: the fixture rows are shorter than 128
    assert b["padded_tokens_per_s"] > b["real_tokens_per_s"] > 0
    assert "mfu" not in b  # flops.py counts Llama-2-7B's shapes, not the tiny model's


def test_generate_fast_bench_counts_new_tokens_and_matches_plain_generate_in_fp32(speed):
    r = by_name(speed[1])["generate"]
    rows = {(row["path"], row.get("kv_cache")): row for row in r["speed_json"]["rows"]}
    fast, plain, fp8 = rows["fast", "model"], rows["plain generate", None], rows["fast", "fp8"]
    # random weights rarely stop early: close to prompts x new tokens, never more
    assert 16 * 16 * 0.5 <= fast["new_tokens"] <= 16 * 16 and 0 < plain["new_tokens"] <= 32 * 16
    assert fast["passes_equal"] and r["tiny_fp32_equal"] is True
    assert r["tokens_per_s"] == fast["new_tokens_per_s"] > 0
    assert fp8["passes_equal"] and r["fp8_cache_new_tokens_per_s"] == fp8["new_tokens_per_s"] > 0


def test_every_named_configuration_loads_as_a_valid_config(tmp_path, tiny_model_dir, assets):
    """The GPU commands, as `--list` prints them, pass llmft's own config checks (keys exist, rules hold)."""
    from llmft.config import load_config

    ctx = bench.Ctx(out=tmp_path, model=tiny_model_dir, data=assets / "data", split=assets / "data", nproc=2)
    checked = 0
    for name, conf in bench.CONFIGS.items():
        for step in conf.steps(ctx, name):
            argv = step.argv
            if "train" not in argv or argv[argv.index("train") - 1] not in ("llmft", str(BENCH / "fsdp_check.py")):
                continue
            params = argv[argv.index("--params") + 1] if "--params" in argv else "params.yaml"
            overrides = [a for a in argv if "=" in a and not a.startswith("-")]
            load_config(ROOT / params, [o for o in overrides if not o.startswith("model.base=/")])
            checked += 1
    assert checked == 12  # 7 training configurations, the loss check's 3 runs, FSDP's plain and sharded runs


def test_loss_check_finds_the_same_curves_with_the_cpu_runnable_switches(tmp_path, tiny_model_dir, assets, bench_data):
    stdout, result = smoke(tmp_path / "out", tiny_model_dir, assets / "data", "loss",
                           extra=("--split", tmp_path / "split", "--dolly", bench_data["dolly"]))
    eq = by_name(result)["loss"]["loss_equivalence"]
    assert eq["ref"] == "ref" and list(eq["runs"]) == ["bf16"]  # no FP8 on a CPU
    for kind in ("train", "eval"):
        c = eq["runs"]["bf16"][kind]
        assert c["steps"] >= 2 and c["within_1pct"] and c["max_rel"] < 1e-4  # fp32: same math, rounding apart
    assert (tmp_path / "out" / "loss" / "loss_equivalence.png").exists()
    assert "bench: loss       largest loss difference: bf16 vs ref: training 0.00%" in stdout


def test_loss_equivalence_flags_a_curve_more_than_one_percent_off(tmp_path):
    for name, scale in (("ref", 1.0), ("same", 1.0001), ("off", 1.02)):
        for kind in ("train", "eval"):
            d = tmp_path / name
            d.mkdir(exist_ok=True)
            rows = "".join(f"{s},{scale * (3 - s / 10)}\n" for s in range(5))
            (d / f"{kind}_loss.csv").write_text("step,loss\n" + rows)
    run(BENCH / "loss_equivalence.py", "--runs", tmp_path, "--ref", "ref", "--names", "same", "off", "--out", tmp_path)
    res = json.loads((tmp_path / "loss_equivalence.json").read_text())["runs"]
    assert res["same"]["train"]["within_1pct"] and not res["off"]["train"]["within_1pct"]
    assert res["off"]["eval"]["max_rel"] == pytest.approx(0.02, abs=1e-4)


def test_fsdp_run_and_its_adapter_reloaded_without_fsdp(tmp_path, tiny_model_dir, assets):
    _, result = smoke(tmp_path, tiny_model_dir, assets / "data", "fsdp")
    r = by_name(result)["fsdp"]
    check = r["reload_check"]
    assert r["rc"] == 0 and r["tokens_per_s"] > 0 and r["plain_tokens_per_s"] > 0
    assert check["ok"] and check["fsdp"] and check["base_max_abs_diff"] == 0.0
    assert check["max_abs_diff_same_dtype"] <= check["tolerance"] < check["adapter_effect_max_abs"]


def test_profile_step_profiles_the_stage_and_reanalyses_its_trace(tmp_path, tiny_model_dir, assets):
    run(BENCH / "profile_step.py", "--smoke", "--model", tiny_model_dir, "--data", assets / "data", "--out", tmp_path,
        "--warmup", "3", "--unprofiled", "1", "--active", "2")
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["profiled_step_numbers"] == [5, 6] and prof["analysis"]["profiled_steps"] == 2
    assert prof["analysis"]["step_wall_ms"] > 0 and prof["stage_metrics"]["steps"] >= 6
    assert (tmp_path / "profile.md").read_text().startswith("# One steady step of the train stage (cpu)")
    out = run(BENCH / "profile_step.py", "--analyze", tmp_path / "trace.json.gz", "--from-json",
              tmp_path / "profile.json", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "reanalysis.json").read_text())["analysis"]
    assert again["step_wall_ms"] == pytest.approx(prof["analysis"]["step_wall_ms"]) and "| **step wall** |" in out


def test_flops_per_token_of_the_7b_config_as_the_record_states_it():
    f = flops.llama2_7b(16)
    assert f["n_matmul"] == 6_607_077_376 and f["n_lora"] == 39_976_960  # the LoRA's trainable parameters
    stats = json.loads((BENCH / "results" / "dolly_lengths.json").read_text())
    per_token = {m: flops.flops_per_token(f["n_matmul"], f["n_lora"], 32, 4096, stats[f"s2_over_s_{m}"]) for m in
                 (512, 2048)}
    assert round(per_token[512] / 1e9, 2) == 26.90 and round(per_token[2048] / 1e9, 2) == 27.07


def test_power_summary_of_the_committed_h200_runs_names_the_power_cap(monkeypatch):
    """bench.py --smi's summary, on the nvidia-smi log and run times of the committed FlashAttention-4 run."""
    monkeypatch.setenv("TZ", "UTC")  # nvidia-smi wrote the GPU machine's local time, UTC
    time.tzset()
    try:
        d = BENCH / "results" / "2026-12-04-h200-fa4"
        marks = {tuple(m.split()[1:]): float(m.split()[0]) for m in (d / "marks.txt").read_text().splitlines()}
        s = bench.power_summary(d / "smi.csv", marks[("start", "fa4_bf16_ind")], marks[("end", "fa4_bf16_ind")])
    finally:
        monkeypatch.undo()
        time.tzset()
    assert s == {"busy_samples": 52, "power_w_mean": 672, "power_limit_w": 700.0, "sm_clock_mhz_mean": 1566,
                 "sm_clock_mhz_min": 1275.0, "power_capped_samples": 52}


def test_no_benchmark_calls_a_private_function_of_the_package():
    private = re.compile(r"llmft\.[a-z_.]*\._|from llmft.* import _")
    hits = [f"{p.name}:{i}" for p in BENCH.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if private.search(line)]
    assert hits == []


def test_the_record_speaks_of_configurations_commands_dates_and_commits():
    """No lab diary in the record: no sessions, device calls or issue numbers, in names or in text."""
    diary = re.compile(r"session|device call|issue [0-9]", re.I)
    files = [ROOT / "README.md", *(p for p in BENCH.rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    hits = [str(p.relative_to(ROOT)) for p in files
            if diary.search(str(p.relative_to(ROOT))) or diary.search(p.read_text(errors="replace"))]
    assert hits == []


@pytest.mark.slow  # a real `mlflow models serve`
def test_serve_load_drives_the_served_champion(tmp_path, tiny_model_dir):
    out = run(BENCH / "serve_load.py", "--set", f"model.base={tiny_model_dir}", "--set", "register.batch_window_ms=200",
              "--clients", "1", "4", "--seconds", "1",
              "--work", tmp_path / "work", "--out", tmp_path / "load.json")
    result = json.loads((tmp_path / "load.json").read_text())
    assert [(f["clients"], f["failed"], f["requests"] > 0) for f in result["figures"]] == [(1, 0, True), (4, 0, True)]
    assert re.search(r"^4 clients vs 1: [0-9.]+x requests/s$", out, re.M) and result["environment"]["commit"]
    assert "batch of 4 requests" in (tmp_path / "work" / "serve.log").read_text()
