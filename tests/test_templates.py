"""Templates: Alpaca sections, Llama-2 chat format, and where the prompt ends for each."""
from __future__ import annotations

from llmft.templates import format_example, render_prompt


def test_alpaca_context_section_only_when_context_given():
    with_ctx = format_example("alpaca", "Summarise.", "Some text.", "Short.")
    without = format_example("alpaca", "Say hi.", "", "Hi.")
    assert "### Instruction:\nSummarise.\n\n### Context:\nSome text.\n\n### Response:\n" in with_ctx["prompt"]
    assert "### Context:" not in without["prompt"] and without["prompt"].endswith("### Response:\n")
    assert with_ctx["completion"] == "Short." and "context" in with_ctx["prompt"].split("\n")[0]


def test_llama2_chat_format_and_multi_turn():
    ex = format_example("llama2_chat", "Hi?", "", "Hello.", system="Be brief.")
    assert ex["prompt"] == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST]" and ex["completion"] == " Hello."
    two = render_prompt("llama2_chat", [("Q1", "A1"), ("Q2", None)])
    assert two == "[INST] Q1 [/INST] A1 </s><s>[INST] Q2 [/INST]"


def test_alpaca_prompt_is_a_token_prefix_with_the_llama2_tokenizer(llama2_tok_dir):
    """TRL masks the prompt by the token prefix; the alpaca prompt must end on a token boundary."""
    from llmft.models import load_tokenizer

    tok = load_tokenizer(str(llama2_tok_dir))
    for ctx in ("", "A context paragraph."):
        ex = format_example("alpaca", "Name a colour.", ctx, "Blue is a colour.")
        p = tok(ex["prompt"]).input_ids
        full = tok(ex["prompt"] + ex["completion"] + tok.eos_token).input_ids
        assert full[:len(p)] == p and full[-1] == tok.eos_token_id
        assert tok.decode(full[len(p):], skip_special_tokens=True) == "Blue is a colour."
