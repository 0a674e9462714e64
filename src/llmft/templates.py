"""Prompt templates: the one place where training data and inference prompts are formatted.

A prompt ends exactly where the model's answer starts; the completion is the answer alone. The EOS
token is not part of the text: training appends it as a token, generation stops on it. Likewise
the BOS token (`<s>` in Llama-2's format) is added by the tokenizer, never written as text, so it
can't be doubled.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .errors import LlmftError

TEMPLATES = ("alpaca", "llama2_chat", "model_chat")

ALPACA_HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."


def _alpaca(turns: Sequence[tuple[str, Optional[str]]], context: str) -> str:
    ctx = ", paired with a context that provides further information" if context else ""
    parts = [ALPACA_HEADER.format(ctx=ctx)]
    for i, (user, assistant) in enumerate(turns):
        parts.append(f"### Instruction:\n{user}")
        if i == 0 and context:
            parts.append(f"### Context:\n{context}")
        parts.append("### Response:\n" + (assistant if assistant is not None else ""))
    return "\n\n".join(parts)


def _llama2_chat(turns: Sequence[tuple[str, Optional[str]]], system: str) -> str:
    # Meta's format: [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
    # The first <s> is the tokenizer's BOS; the inner </s><s> separate finished turns.
    out = ""
    for i, (user, assistant) in enumerate(turns):
        if i == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        out += ("" if i == 0 else "<s>") + f"[INST] {user.strip()} [/INST]"
        if assistant is not None:
            out += f" {assistant.strip()} </s>"
    return out


def _model_chat(turns, system: str, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LlmftError("data.template=model_chat: the base model's tokenizer has no chat template; "
                         "use alpaca or llama2_chat")
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def render_prompt(template: str, turns: Sequence[tuple[str, Optional[str]]], context: str = "",
                  system: str = "", tokenizer=None) -> str:
    """The prompt text for a conversation whose last turn has no answer yet.

    turns: [(user, answer), ..., (user, None)]. `context` belongs to the first user turn.
    """
    if not turns or turns[-1][1] is not None:
        raise ValueError("the last turn must be unanswered")
    if template == "alpaca":
        return _alpaca(turns, context)
    first, *rest = turns
    if context:
        first = (f"{first[0]}\n\n{context}", first[1])
    turns = [first, *rest]
    if template == "llama2_chat":
        return _llama2_chat(turns, system)
    if template == "model_chat":
        return _model_chat(turns, system, tokenizer)
    raise LlmftError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def format_example(template: str, instruction: str, context: str, response: str, system: str = "",
                   tokenizer=None) -> dict[str, str]:
    """One training example as {prompt, completion}: loss is computed on the completion only."""
    prompt = render_prompt(template, [(instruction, None)], context, system, tokenizer)
    # Llama-2's format puts a space between [/INST] and the answer; alpaca and ChatML a newline,
    # which already ends the prompt.
    completion = (" " if template == "llama2_chat" else "") + response
    return {"prompt": prompt, "completion": completion}
