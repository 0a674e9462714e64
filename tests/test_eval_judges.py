"""The judge client against a real OpenAI-compatible server on 127.0.0.1: cache, retries, failures,
secrets, and the benchmarks' parsers (FastChat's rating rules, alpaca_eval's annotator + logprob parser)."""
from __future__ import annotations

import socket
import time

import pytest

from helpers import show_result
from judge_server import JudgeServer
from llmft.config import JudgeConfig
from llmft.errors import LlmftError
from llmft.evaluate import alpacaeval, judges, mtbench, sources


@pytest.fixture
def server():
    with JudgeServer() as s:
        yield s


def _judge(server_or_url, tmp_path, **kw) -> judges.Judge:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url
    cfg = JudgeConfig(model="stand-in", base_url=url, **kw)
    return judges.make(cfg, tmp_path / "cache")


def _rating_request(answer: str):
    prompt = ("Rate it \"[[rating]]\".\n[The Start of Assistant's Answer]\n" + answer +
              "\n[The End of Assistant's Answer]")
    return [{"role": "user", "content": prompt}], {"temperature": 0, "max_tokens": 64}


def _chat(judge, request):
    messages, params = request
    return judges.chat(judge, messages, **params)


def test_no_judge_configured_is_none():
    assert judges.make(JudgeConfig(), "unused") is None


def test_cache_second_run_makes_no_http_calls(server, tmp_path):
    requests = [_rating_request("answer " * i) for i in range(1, 6)]
    first = judges.chat_many(_judge(server, tmp_path), requests)
    assert server.requests == 5
    again = _judge(server, tmp_path)  # a fresh client, as in a new process
    second = judges.chat_many(again, requests)
    assert server.requests == 5 and again.counts["cached"] == 5 and again.counts["requests"] == 0
    assert [judges.content(c) for c in first] == [judges.content(c) for c in second]
    # the key covers the candidate output and the judge model
    _chat(again, _rating_request("a different answer"))
    other = judges.make(JudgeConfig(model="another-judge", base_url=server.base_url), tmp_path / "cache")
    _chat(other, requests[0])
    assert server.requests == 7


def test_torn_cache_file_is_asked_again(server, tmp_path):
    judge = _judge(server, tmp_path)
    messages, params = _rating_request("hello there")
    judges.chat(judge, messages, **params)
    path = judges._cache_path(judge, judges.cache_key(judge, messages, params))
    path.write_text(path.read_text()[:20])  # a crash mid-write
    assert "Rating" in judges.content(judges.chat(judge, messages, **params))
    assert server.requests == 2


def test_retries_on_500_and_429_then_succeeds(server, tmp_path):
    server.failures = [500, 429, 503]
    choice = _chat(_judge(server, tmp_path, max_retries=3), _rating_request("fine answer"))
    assert "[[" in judges.content(choice)
    assert server.requests == 4


def test_retries_after_a_timeout(server, tmp_path):
    server.delays = [3.0]  # the first answer comes too late, the retry is answered at once
    start = time.time()
    choice = _chat(_judge(server, tmp_path, max_retries=2, timeout_s=0.5), _rating_request("slow answer"))
    assert "[[" in judges.content(choice) and server.requests == 2
    assert time.time() - start < 3.0  # it did not wait for the stalled request


def test_concurrency_is_bounded(server, tmp_path):
    server.delay_all = 0.3
    judge = _judge(server, tmp_path, max_concurrency=2)
    server.delays = [0.6, 0.0]  # the first request finishes after the second
    out = judges.chat_many(judge, [_rating_request("x" * (10 * i)) for i in range(6)])
    assert len(out) == 6 and server.max_inflight == 2
    # answers come back in request order, whatever order they finished in (the stand-in rates by length)
    assert [judges.content(c)[-5:] for c in out] == [f"[[{i + 1}]]" for i in range(6)]


def test_persistent_5xx_fails_with_status_and_url(server, tmp_path):
    server.failures = [500] * 10
    with pytest.raises(LlmftError, match=r"HTTP 500") as e:
        judges.chat_many(_judge(server, tmp_path, max_retries=1), [_rating_request("x")])
    assert server.base_url in str(e.value)
    assert server.requests == 2  # the first try and one retry


def test_unreachable_judge_names_url_and_keeps_cached_work(tmp_path):
    with JudgeServer() as s:
        url = s.base_url
        done = judges.chat_many(_judge(s, tmp_path), [_rating_request(f"answer {i}") for i in range(3)])
    assert len(done) == 3
    cached = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(cached) == 3
    judge = _judge(url, tmp_path, max_retries=1, timeout_s=2)  # the server is gone: connection refused
    start = time.time()
    with pytest.raises(LlmftError, match="unreachable") as e:
        judges.chat_many(judge, [_rating_request(f"answer {i}") for i in range(5)])
    assert url in str(e.value) and str(tmp_path / "cache") in str(e.value)
    assert time.time() - start < 30
    assert sorted((tmp_path / "cache").rglob("*.json")) == cached
    assert judge.counts["cached"] >= 1  # answered from the cache before the new ones failed


def test_openai_without_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMFT_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(LlmftError, match="LLMFT_TEST_JUDGE_KEY"):
        judges.make(JudgeConfig(model="gpt-4-1106-preview", api_key_env="LLMFT_TEST_JUDGE_KEY"), tmp_path / "cache")


def test_api_key_reaches_the_server_but_never_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_TEST_JUDGE_KEY", "sk-test-secret-4242")
    judge = judges.make(JudgeConfig(model="stand-in", base_url=server.base_url, api_key_env="LLMFT_TEST_JUDGE_KEY"),
                        tmp_path / "cache")
    _chat(judge, _rating_request("an answer"))
    assert server.headers[-1]["authorization"] == "Bearer sk-test-secret-4242"
    for f in (tmp_path / "cache").rglob("*"):
        if f.is_file():
            assert "sk-test-secret" not in f.read_text()
    assert "sk-test-secret" not in judge.name


@pytest.mark.parametrize("judgment, rating", [
    ("The answer is fine. Rating: [[7]]", 7),
    ("Rating: [[7.5]]", 7.5),
    ("Rating: [8]", 8),                       # FastChat's fallback pattern
    ("[3] is wrong, overall [[6]]", 6),       # double brackets win over the fallback
    ("Rating: [[rating]]", -1),
    ("I give it 9/10.", -1),
    ("", -1),
])
def test_mt_bench_rating_parse(judgment, rating):
    assert mtbench.parse_rating(judgment) == rating


def _check_fastchat_prompt_choice(mt, turn2_system_phrase: str) -> None:
    """Single-answer grading as FastChat builds it: single-v1 for most categories, the reference-guided
    single-math-v1 for math/reasoning/coding, their -multi-turn variants for turn 2."""
    by_cat = {}
    for q in mt["questions"]:
        by_cat.setdefault(q["category"], q)
    writing, math = by_cat["writing"], by_cat["math"]
    ref = mt["references"][math["question_id"]]
    msgs, params = mtbench.judge_request(writing, ["first answer", "second answer"], 1, mt["prompts"], None, 2048)
    assert msgs[0] == {"role": "system", "content": mt["prompts"]["single-v1"]["system_prompt"]}
    assert writing["turns"][0] in msgs[1]["content"] and "first answer" in msgs[1]["content"]
    assert params == {"temperature": 0, "max_tokens": 2048, "n": 1}
    msgs, _ = mtbench.judge_request(math, ["a1", "a2"], 1, mt["prompts"], ref, 2048)
    assert "[The Start of Reference Answer]" in msgs[1]["content"]
    assert ref["choices"][0]["turns"][0] in msgs[1]["content"]
    msgs, _ = mtbench.judge_request(math, ["a1", "a2"], 2, mt["prompts"], ref, 2048)
    assert msgs[0]["content"] == mt["prompts"]["single-math-v1-multi-turn"]["system_prompt"]
    assert all(t in msgs[1]["content"] for t in (math["turns"][1], "a1", "a2", ref["choices"][0]["turns"][1]))
    msgs, _ = mtbench.judge_request(writing, ["a1", "a2"], 2, mt["prompts"], None, 2048)
    assert turn2_system_phrase in msgs[0]["content"]
    # a reference for a category FastChat grades without one is not used
    msgs, _ = mtbench.judge_request(writing, ["a1", "a2"], 1, mt["prompts"], ref, 2048)
    assert "Reference" not in msgs[1]["content"]


def test_mt_bench_judge_prompt_choice_on_fixture_files(bench_data):
    mt, why = sources.mt_bench(str(bench_data["mt_bench"]), None)
    assert why is None and len(mt["questions"]) == 16
    _check_fastchat_prompt_choice(mt, "focus on the assistant's answer to the second user question")


def test_mt_bench_judge_prompts_follow_fastchat(shared_data):
    """The real FastChat files: the same choices, and FastChat's own system prompt texts."""
    mt, why = sources.mt_bench(str(shared_data / "mt_bench"), None)
    assert why is None and len(mt["questions"]) == 80
    assert mt["prompts"]["single-v1"]["system_prompt"] == "You are a helpful assistant."
    _check_fastchat_prompt_choice(mt, "focus on the assistant's answer to the second user question")


def _alpaca_rows(n, model_longer):
    ref = [{"instruction": f"Instruction {i}?", "output": "r" * 20, "generator": "ref", "dataset": "d"} for i in range(n)]
    out = [{"instruction": f"Instruction {i}?", "output": "m" * (40 if model_longer(i) else 5), "generator": "tuned",
            "dataset": "d"} for i in range(n)]
    return ref, out


def test_alpaca_eval_annotator_prefers_what_the_judge_prefers(server, tmp_path):
    # the stand-in prefers the longer output; alpaca_eval shows the two in a seeded random order and maps
    # the m/M logprobs back to a preference in [1, 2] (2: outputs_2 wins)
    ann = alpacaeval.annotator("weighted_alpaca_eval_gpt4_turbo", _judge(server, tmp_path))
    ref, out = _alpaca_rows(10, lambda i: i % 2 == 0)
    prefs, annotated = alpacaeval._preferences(ann, ref, out)
    assert len(prefs) == 10 and server.requests == 10
    for i in range(10):
        p = prefs[f"Instruction {i}?"]
        assert (p > 1.5) == (i % 2 == 0) and 1 <= p <= 2
    texts = ["\n".join(m["content"] for m in b["messages"]) for b in server.bodies]
    reference_first = {t.index("r" * 20) < t.index("mmmmm") for t in texts}
    assert reference_first == {True, False}  # both orders were shown: the randomisation is alpaca_eval's
    assert server.bodies[0]["max_tokens"] == 1 and server.bodies[0]["logprobs"] is True


def test_alpaca_eval_parse_failures_are_absent_not_faked(server, tmp_path):
    server.malformed = True  # the judge answers "Both": no m/M logprob to parse
    ann = alpacaeval.annotator("weighted_alpaca_eval_gpt4_turbo", _judge(server, tmp_path))
    ref, out = _alpaca_rows(4, lambda i: True)
    prefs, annotated = alpacaeval._preferences(ann, ref, out)
    assert prefs == {} and len(annotated) == 4


def test_free_port_is_really_closed():
    # guards the unreachable-judge test's assumption that a stopped server refuses connections
    with JudgeServer() as s:
        port = s.httpd.server_address[1]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_length_controlled_win_rate_says_why_it_is_missing():
    """A subset cannot be length-controlled; all 805 reach alpaca_eval's GLM, which needs two hub files."""
    from llmft.config import EvaluateConfig

    e = EvaluateConfig(bootstrap_samples=100)
    rows = [{"instruction": f"instruction {i}", "index": i, "category": "d"} for i in range(alpacaeval.ALL)]
    assert "805" in alpacaeval._lc_row(rows[:10], {}, e)["reason"]

    def annotations(side, p):
        return [{"instruction": r["instruction"], "output_1": "reference answer", "output_2": "x" * (i % 50),
                 "generator_1": "gpt4_1106_preview", "generator_2": f"llmft-{side}", "annotator": "stand-in",
                 "preference": p} for i, r in enumerate(rows)]

    row = alpacaeval._lc_row(rows, {"base": annotations("base", 1.2), "tuned": annotations("tuned", 1.7)}, e)
    if row.get("status") == "skipped":  # offline (as here): the hub files are unreachable
        assert "tatsu-lab/alpaca_eval" in row["reason"] and "df_gamed.csv" in row["reason"]
    else:  # with the hub files cached, the GLM runs and the tuned side's preference is higher
        assert 0 <= row["base"] < row["tuned"] <= 100


def test_mt_bench_scores_each_side_as_fastchat_does(tmp_path):
    """Parse failures on both sides, in different places: each side's score is its own FastChat score (its
    parsed ratings only), by hand and by FastChat's show_result; the CI pairs what both sides parsed."""
    from llmft.io import write_jsonl

    questions = [{"question_id": 81, "category": "writing"}, {"question_id": 111, "category": "math"},
                 {"question_id": 82, "category": "writing"}]
    ratings = {("base", 0, 1): 8, ("base", 0, 2): 6, ("base", 1, 1): 4, ("base", 1, 2): -1,
               ("base", 2, 1): -1, ("base", 2, 2): 7,
               ("tuned", 0, 1): 9, ("tuned", 0, 2): -1, ("tuned", 1, 1): 5, ("tuned", 1, 2): 3,
               ("tuned", 2, 1): 6, ("tuned", 2, 2): 8}
    rows = mtbench.scores(questions, [ratings], 200, 0, "stand-in")
    row = rows["mt_bench_score"]
    # by hand: base parsed 8, 6, 4, 7; tuned 9, 5, 3, 6, 8
    assert (row["base"], row["tuned"]) == pytest.approx((6.25, 6.2))
    assert row["delta"] == pytest.approx(-0.05)
    assert (rows["mt_bench_score/turn_1"]["base"], rows["mt_bench_score/turn_1"]["tuned"]) == pytest.approx((6.0, 20 / 3))
    assert (rows["mt_bench_score/turn_2"]["base"], rows["mt_bench_score/turn_2"]["tuned"]) == pytest.approx((6.5, 5.5))
    assert (rows["mt_bench_score/writing"]["base"], rows["mt_bench_score/writing"]["tuned"]) == pytest.approx((7.0, 23 / 3))
    # the paired delta is over (q0, turn 1), (q1, turn 1), (q2, turn 2): +1 each; the old means over these pairs
    # (base 6.33, tuned 7.33) were neither side's FastChat score
    assert row["n"] == row["n_paired"] == 3 and row["delta_paired"] == pytest.approx(1.0)
    assert row["ci95"] == pytest.approx([1.0, 1.0])
    assert row["n_scored"] == {"base": 4, "tuned": 5} and row["parse_failures"] == {"base": 2, "tuned": 1}
    # FastChat's own show_result on the same judgments, in its model_judgment format
    path = tmp_path / "judgments.jsonl"
    write_jsonl(path, [{"question_id": questions[i]["question_id"], "model": side, "turn": t, "score": v,
                        "judge": ["stand-in", "single-v1"]} for (side, i, t), v in ratings.items()])
    fastchat = show_result(path)
    for side in ("base", "tuned"):
        assert fastchat[(side, "all")] == pytest.approx(row[side], abs=1e-6)
        for t in (1, 2):
            assert fastchat[(side, t)] == pytest.approx(rows[f"mt_bench_score/turn_{t}"][side], abs=1e-6)


def test_mt_bench_without_a_parsed_side_is_an_error_naming_it():
    questions = [{"question_id": 81, "category": "writing"}]
    ratings = {("base", 0, 1): 5, ("base", 0, 2): 6, ("tuned", 0, 1): -1, ("tuned", 0, 2): -1}
    rows = mtbench.scores(questions, [ratings], 200, 0, "stand-in")
    assert rows["mt_bench"]["status"] == "error"
    assert rows["mt_bench"]["reason"].startswith("no judgment could be parsed for tuned")


def test_judge_repeats_have_their_own_cache_entries(server, tmp_path):
    judge = _judge(server, tmp_path)
    messages, params = _rating_request("an answer")
    # repeat 0 is the plain key: caches written before repeats existed stay valid
    assert judges.cache_key(judge, messages, params, 0) == judges.cache_key(judge, messages, params)
    for repeat in (0, 1, 2, 0, 1, 2):
        judges.chat(judge, messages, repeat, **params)
    assert server.requests == 3 and judge.counts["cached"] == 3


def test_empty_or_malformed_every_time_is_given_up_uncached(server, tmp_path):
    """A judge that always answers an empty message (or a body that is not JSON): asked 1 + max_retries times,
    counted, then given up as an unparsable judgment, and not cached, so a rerun asks again."""
    for kind in ("empty_message", "malformed_body"):
        server.fault_rate, server.fault_kinds = 1.0, (kind,)
        judge = _judge(server, tmp_path, max_retries=2)
        start = server.requests
        choice = _chat(judge, _rating_request(f"answer for {kind}"))
        assert mtbench.parse_rating(judges.content(choice)) == -1 and choice["given_up"]
        assert server.requests - start == 3 and judge.failures == {kind: 3}
        s = judges.summary(judge)
        assert s["given_up"] == 1 and s["retries"] == 2 and s["judgments"] == 0
        _chat(judge, _rating_request(f"answer for {kind}"))
        assert server.requests - start == 6  # nothing was cached
    server.fault_rate = 0.0
    assert "[[" in judges.content(_chat(_judge(server, tmp_path), _rating_request("answer for empty_message")))


def test_retries_and_failures_are_counted_by_kind(server, tmp_path):
    server.failures = [500, 429, 503]
    judge = _judge(server, tmp_path, max_retries=3)
    _chat(judge, _rating_request("counted answer"))
    assert judges.summary(judge) == {"requests": 4, "retries": 3, "judgments": 1, "cached": 0, "given_up": 0,
                                     "failures": {"http_429": 1, "http_500": 1, "http_503": 1}}
    server.delays = [3.0]
    slow = _judge(server, tmp_path, max_retries=2, timeout_s=0.5)
    _chat(slow, _rating_request("slow counted answer"))
    assert slow.failures == {"timeout": 1} and judges.summary(slow)["retries"] == 1
