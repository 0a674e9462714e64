"""Prompt templates: the one place where training data and inference prompts are formatted.

A prompt ends exactly where the model's answer starts; the completion is the answer alone. The EOS
token is not part of the text: training appends it as a token, generation stops on it. Likewise
the BOS token (`<s>` in Llama-2's format) is added by the tokenizer, never written as text, so it
can't be doubled.

Each template is a small object in `TEMPLATES`, keyed by the name `data.template` takes (config.py checks
the name against this table at load). A new template is one class here and one entry in the table.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .errors import LlmftError

Turns = Sequence[tuple[str, Optional[str]]]

ALPACA_HEADER = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."


class Template:
    """One prompt format. `render` writes the prompt of a conversation whose last turn has no answer yet;
    `completion` the training target that follows it."""

    name: str
    answer_prefix: str = ""
    """Text between the end of the prompt and the answer in a training completion."""
    needs_tokenizer: bool = False
    """render reads the base model's tokenizer (prepare loads it even without data.stats_tokenizer)."""

    def render(self, turns: Turns, context: str, system: str, tokenizer) -> str:
        raise NotImplementedError

    def completion(self, response: str) -> str:
        return self.answer_prefix + response


def _context_in_first_turn(turns: Turns, context: str) -> list[tuple[str, Optional[str]]]:
    """The chat formats have no context section: the context follows the first user message."""
    first, *rest = turns
    if context:
        first = (f"{first[0]}\n\n{context}", first[1])
    return [first, *rest]


class Alpaca(Template):
    """### Instruction / ### Context / ### Response sections under Alpaca's header (no system prompt)."""

    name = "alpaca"

    def render(self, turns, context, system, tokenizer):
        ctx = ", paired with a context that provides further information" if context else ""
        parts = [ALPACA_HEADER.format(ctx=ctx)]
        for i, (user, assistant) in enumerate(turns):
            parts.append(f"### Instruction:\n{user}")
            if i == 0 and context:
                parts.append(f"### Context:\n{context}")
            parts.append("### Response:\n" + (assistant if assistant is not None else ""))
        return "\n\n".join(parts)


class Llama2Chat(Template):
    """Meta's format: [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...
    The first <s> is the tokenizer's BOS; the inner </s><s> separate finished turns."""

    name = "llama2_chat"
    answer_prefix = " "  # Llama-2 puts a space between [/INST] and the answer; the others end the prompt with a newline

    def render(self, turns, context, system, tokenizer):
        out = ""
        for i, (user, assistant) in enumerate(_context_in_first_turn(turns, context)):
            if i == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            out += ("" if i == 0 else "<s>") + f"[INST] {user.strip()} [/INST]"
            if assistant is not None:
                out += f" {assistant.strip()} </s>"
        return out


class ModelChat(Template):
    """The base model's own chat template (its tokenizer's `chat_template`), without the BOS the tokenizer adds."""

    name = "model_chat"
    needs_tokenizer = True

    def render(self, turns, context, system, tokenizer):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LlmftError("data.template=model_chat: the base model's tokenizer has no chat template; "
                             "use alpaca or llama2_chat")
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in _context_in_first_turn(turns, context):
            messages.append({"role": "user", "content": user})
            if assistant is not None:
                messages.append({"role": "assistant", "content": assistant})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return text


TEMPLATES: dict[str, Template] = {t.name: t for t in (Alpaca(), Llama2Chat(), ModelChat())}


def get(template: str) -> Template:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise LlmftError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}") from None


def render_prompt(template: str, turns: Turns, context: str = "", system: str = "", tokenizer=None) -> str:
    """The prompt text for a conversation whose last turn has no answer yet.

    turns: [(user, answer), ..., (user, None)]. `context` belongs to the first user turn.
    """
    if not turns or turns[-1][1] is not None:
        raise ValueError("the last turn must be unanswered")
    return get(template).render(turns, context, system, tokenizer)


def format_example(template: str, instruction: str, context: str, response: str, system: str = "",
                   tokenizer=None) -> dict[str, str]:
    """One training example as {prompt, completion}: loss is computed on the completion only."""
    prompt = render_prompt(template, [(instruction, None)], context, system, tokenizer)
    return {"prompt": prompt, "completion": get(template).completion(response)}
