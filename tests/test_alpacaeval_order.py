"""llmft's AlpacaEval judge requests are the ones alpaca_eval's own `evaluate` sends for the same files: the same
prompts, each pair shown in the same order (a real judge has a position bias), to the stand-in judge on 127.0.0.1."""
from __future__ import annotations

import json
import logging

from llmft.config import JudgeConfig
from llmft.evaluate import alpacaeval, judges

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2's default, and evaluate.alpaca_eval_annotator's

INSTRUCTIONS = ["What is the capital of Australia?", "Give three tips for staying healthy.",
                "Translate 'good morning' into French.", "Write a haiku about autumn rain.",
                "Explain what a hash table is in one sentence.", "Name two prime numbers greater than 50.",
                "Suggest a title for a blog post about sourdough.", "Why is the sky blue?"]


def _outputs():
    """alpaca_eval model_outputs rows: the reference (output_1 in alpaca_eval) and a model, every answer distinct;
    the model's is the longer one on even rows, so the stand-in judge's winner alternates."""
    ref = [{"dataset": "helpful_base", "instruction": ins, "output": f"Reference answer {i}: " + "r" * 30,
            "generator": alpacaeval.REFERENCE} for i, ins in enumerate(INSTRUCTIONS)]
    model = [{"dataset": "helpful_base", "instruction": ins,
              "output": f"Model answer {i}: " + "m" * (60 if i % 2 == 0 else 5), "generator": "llmft-tuned"}
             for i, ins in enumerate(INSTRUCTIONS)]
    return ref, model


def _shown(bodies: list[dict]) -> dict[str, tuple[str, dict]]:
    """{instruction: (the judge prompt's messages as JSON, the other request parameters)} of the requests."""
    out = {}
    for b in bodies:
        text = "\n".join(m["content"] for m in b["messages"])
        instruction = next(ins for ins in INSTRUCTIONS if ins in text)
        assert instruction not in out, f"asked twice: {instruction}"
        out[instruction] = (json.dumps(b["messages"]), {k: v for k, v in b.items() if k not in ("messages", "model")})
    return out


def _reference_first(shown: dict) -> dict[str, bool]:
    return {ins: messages.index("Reference answer") < messages.index("Model answer")
            for ins, (messages, _) in shown.items()}


def test_judge_sees_each_pair_as_alpaca_eval_evaluate_shows_it(judge, tmp_path):
    ref, model = _outputs()
    n = len(INSTRUCTIONS)

    # llmft: the annotator AlpacaEval's run() builds, reference as outputs_1, through our judge client
    client = judges.make(JudgeConfig(model="gpt-4-1106-preview", base_url=judge.base_url), tmp_path / "cache")
    ann = alpacaeval.annotator(ANNOTATOR, client)
    start = len(judge.bodies)
    ours, _ = alpacaeval._preferences(ann, ref, model)
    ours_bodies = judge.bodies[start:]

    # alpaca_eval's own evaluate (what `alpaca_eval evaluate --model_outputs ... --reference_outputs ...` runs)
    # with its defaults, offline: local reference outputs, the plain win rate (and sorting by it), its own
    # OpenAI client pointed at the stand-in, and no annotation cache (its default one lives in the package
    # directory and would answer a rerun); none of these changes a prompt
    (tmp_path / "reference.json").write_text(json.dumps(ref))
    (tmp_path / "model_outputs.json").write_text(json.dumps(model))
    client_config = {"default": [{"api_key": "unused", "base_url": judge.base_url}]}  # JSON is YAML
    (tmp_path / "client.yaml").write_text(json.dumps(client_config))
    level = logging.getLogger().level
    from alpaca_eval.main import evaluate
    logging.getLogger().setLevel(level)  # importing alpaca_eval sets the root logger to INFO
    start = len(judge.bodies)
    _, annotations = evaluate(model_outputs=str(tmp_path / "model_outputs.json"),
                              reference_outputs=str(tmp_path / "reference.json"), annotators_config=ANNOTATOR,
                              output_path=tmp_path / "alpaca_eval", fn_metric="get_winrate", sort_by="win_rate",
                              is_return_instead_of_print=True, caching_path=None,
                              annotation_kwargs={"client_config_path": str(tmp_path / "client.yaml")})
    theirs_bodies = judge.bodies[start:]

    assert len(ours_bodies) == len(theirs_bodies) == n
    shown, expected = _shown(ours_bodies), _shown(theirs_bodies)
    order, expected_order = _reference_first(shown), _reference_first(expected)
    assert set(expected_order.values()) == {True, False}  # alpaca_eval swaps some pairs: the order is tested
    assert order == expected_order  # which answer the judge sees first, per instruction
    for ins in INSTRUCTIONS:
        assert shown[ins][0] == expected[ins][0]  # the whole prompt, character for character
        # the sampling parameters are the annotator config's; alpaca_eval's client adds top_p=1, the API default
        assert {**shown[ins][1], "top_p": 1.0} == expected[ins][1]
    # and the preferences read back from the same judgments are alpaca_eval's
    assert ours == {a["instruction"]: float(a["preference"]) for a in annotations}
