"""Templates: one test per entry of templates.TEMPLATES (the exact text each writes, and where its prompt ends)."""
from __future__ import annotations

import pytest

from llmft import templates
from llmft.errors import LlmftError
from llmft.templates import format_example, render_prompt

# ChatML as SmolLM2's tokenizer writes it, with a BOS first so the test sees model_chat drop it (the tokenizer adds it).
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_every_template_has_its_own_test():
    untested = [t for t in templates.TEMPLATES if not any(name.startswith(f"test_{t}_") for name in globals())]
    assert not untested, f"a template needs a test named test_<template>_...: {untested}"
    assert all(t.name == name for name, t in templates.TEMPLATES.items())


def test_alpaca_context_section_only_when_context_given():
    with_ctx = format_example("alpaca", "Summarise.", "Some text.", "Short.")
    without = format_example("alpaca", "Say hi.", "", "Hi.")
    assert "### Instruction:\nSummarise.\n\n### Context:\nSome text.\n\n### Response:\n" in with_ctx["prompt"]
    assert "### Context:" not in without["prompt"] and without["prompt"].endswith("### Response:\n")
    assert with_ctx["completion"] == "Short." and "context" in with_ctx["prompt"].split("\n")[0]


def test_alpaca_prompt_is_a_token_prefix_with_the_llama2_tokenizer(llama2_tok_dir):
    """TRL masks the prompt by the token prefix; the alpaca prompt must end on a token boundary."""
    from transformers import AutoTokenizer

    from llmft import models

    tok = models.with_pad(AutoTokenizer.from_pretrained(str(llama2_tok_dir)))  # a tokenizer folder, no model
    for ctx in ("", "A context paragraph."):
        ex = format_example("alpaca", "Name a colour.", ctx, "Blue is a colour.")
        p = tok(ex["prompt"]).input_ids
        full = tok(ex["prompt"] + ex["completion"] + tok.eos_token).input_ids
        assert full[:len(p)] == p and full[-1] == tok.eos_token_id
        assert tok.decode(full[len(p):], skip_special_tokens=True) == "Blue is a colour."


def test_alpaca_multi_turn_text():
    assert render_prompt("alpaca", [("Q1", "A1"), ("Q2", None)], "Ctx.") == (
        "Below is an instruction that describes a task, paired with a context that provides further information. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nQ1\n\n### Context:\nCtx.\n\n"
        "### Response:\nA1\n\n### Instruction:\nQ2\n\n### Response:\n")


def test_llama2_chat_format_and_multi_turn():
    ex = format_example("llama2_chat", "Hi?", "", "Hello.", system="Be brief.")
    assert ex["prompt"] == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]" and ex["completion"] == " Hello."
    two = render_prompt("llama2_chat", [("Q1", "A1"), ("Q2", None)])
    assert two == "[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    assert format_example("llama2_chat", "Summarise.", "Some text.", "Short.")["prompt"] == \
        "[INST] Summarise.\n\nSome text. [/INST]", "the context follows the first user message"


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory, llama2_tok_dir):
    """A tokenizer folder whose tokenizer_config holds a small chat template (ChatML), as a chat model ships one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama2_tok_dir)
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return out


def test_model_chat_renders_the_tokenizers_own_template(chat_tok_dir):
    from transformers import AutoTokenizer

    from llmft import models

    tok = models.with_pad(AutoTokenizer.from_pretrained(str(chat_tok_dir)))  # a tokenizer folder, no model
    text = render_prompt("model_chat", [("Q1", "A1"), ("Q2", None)], "Ctx.", "Be brief.", tok)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1\n\nCtx.<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"), \
        "no BOS (the tokenizer adds it), no system turn unless given, the context after the first user message"
    ex = format_example("model_chat", "Say hi.", "", "Hi.", tokenizer=tok)
    assert ex == {"prompt": "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", "completion": "Hi."}


def test_model_chat_without_a_chat_template_is_a_clear_error(llama2_tok_dir):
    from transformers import AutoTokenizer

    from llmft import models

    with pytest.raises(LlmftError, match="tokenizer has no chat template; use alpaca or llama2_chat"):
        render_prompt("model_chat", [("hi", None)], tokenizer=models.with_pad(AutoTokenizer.from_pretrained(str(llama2_tok_dir))))
    with pytest.raises(LlmftError, match="no chat template"):
        render_prompt("model_chat", [("hi", None)])


def test_unknown_template_and_answered_last_turn_are_errors():
    with pytest.raises(LlmftError, match="unknown template 'chatml'; choose one of alpaca, llama2_chat, model_chat"):
        render_prompt("chatml", [("hi", None)])
    with pytest.raises(ValueError, match="last turn must be unanswered"):
        render_prompt("alpaca", [("hi", "there")])


def test_model_chat_through_prepare_loads_the_base_models_tokenizer(tmp_path, tiny_model_dir, monkeypatch):
    """prepare formats every row with the base model's chat template, also without data.stats_tokenizer."""
    import json
    import shutil

    from llmft import data
    from llmft.config import load_config

    base = shutil.copytree(tiny_model_dir, tmp_path / "chat_model")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    monkeypatch.chdir(tmp_path)
    data.prepare(load_config("none.yaml", [f"model.base={base}", "data.template=model_chat", "data.stats_tokenizer=false",
                                           f"paths.data={tmp_path / 'processed'}"]))
    row = json.loads((tmp_path / "processed" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
    assert row["completion"] == row["response"]
