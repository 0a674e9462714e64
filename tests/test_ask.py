"""ask: base and tuned answers side by side, from the adapter on disk, the registry, or the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import llmft, make_adapter, project_config, register_with, registry_config
from llmft import ask, generate, models, templates
from llmft.config import GenerationConfig
from llmft.errors import LlmftError


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ask") / "adapter", seed=5)


def expected(model_dir: Path, adapter_dir: Path | None, instruction: str, gen: GenerationConfig) -> str:
    model, tok = models.load_with_tokenizer(models.config_for(model_dir), adapter_dir)
    prompt = templates.render_prompt("alpaca", [(instruction, None)], "", "", tok)
    return generate.generate(model, tok, [prompt], gen, progress=False)[0]


@pytest.mark.parametrize("columns", ["300", "60"])
def test_answers_match_plain_generation_and_print_side_by_side(tmp_path, tiny_model_dir, adapter, capsys,
                                                                 monkeypatch, columns):
    """Wide or narrow, the output names both sides whole: a narrow terminal prints long paths above the columns."""
    monkeypatch.setenv("COLUMNS", columns)
    cfg = project_config(tmp_path, "evaluate.generation.max_new_tokens=8", model=tiny_model_dir, adapter=adapter)
    (tmp_path / "p.jsonl").write_text(json.dumps({"instruction": "Name a colour.", "context": ""}) + "\n")
    out = ask.ask(cfg, ["Say hi"], file=str(tmp_path / "p.jsonl"))
    assert [r["instruction"] for r in out] == ["Say hi", "Name a colour."]
    gen = cfg.evaluate.generation
    assert out[0]["base"] == expected(tiny_model_dir, None, "Say hi", gen)
    assert out[0]["tuned"] == expected(tiny_model_dir, adapter, "Say hi", gen)
    assert out[0]["base"] != out[0]["tuned"], "the adapter changes the answer"
    text = capsys.readouterr().out
    assert f"base: {tiny_model_dir}" in text and f"tuned: {adapter}" in text and "[2] Name a colour." in text
    head = [line for line in text.splitlines() if "│" in line][0]
    assert head.index("│") == (int(columns) - 3) // 2 + 1  # two columns, as wide as the terminal allows


def test_registry_champion_answers_like_the_adapter(tmp_path, store, tiny_model_dir, adapter):
    cfg = registry_config(tmp_path, store, tiny_model_dir, adapter, "ask-champion")
    register_with(cfg, 1.0)
    out = ask.ask(cfg, ["Say hi"], tuned="models:/ask-champion@champion")
    assert out[0]["tuned"] == expected(tiny_model_dir, adapter, "Say hi", cfg.evaluate.generation)
    with pytest.raises(LlmftError, match="--tuned models:/no-such-model@champion"):
        ask.ask(cfg, ["Say hi"], tuned="models:/no-such-model@champion")


def test_bad_prompt_files_and_missing_adapter_are_clear(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"context": "no instruction"}\n')
    with pytest.raises(LlmftError, match=r"bad\.jsonl:2: each row needs a non-empty string 'instruction'"):
        ask.read_prompts([], str(bad))
    with pytest.raises(LlmftError, match="give a prompt"):
        ask.read_prompts([], None)
    cfg = project_config(tmp_path, model=tiny_model_dir)
    with pytest.raises(LlmftError, match="no adapter at .*paths.adapter"):
        ask.ask(cfg, ["hi"])


def test_cli_takes_prompts_and_overrides(tmp_path, tiny_model_dir, adapter):
    res = llmft("ask", "What is 2+2=?", f"model.base={tiny_model_dir}", f"paths.adapter={adapter}",
                "evaluate.generation.max_new_tokens=4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[1] What is 2+2=?" in res.stdout  # a prompt with '=' in it is a prompt, not an override
    assert "ask [base]" in res.stderr and "ask [tuned]" in res.stderr  # a progress bar per side
