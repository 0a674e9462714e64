"""The fast generation path (length buckets, static cache, refilled rounds) answers exactly as plain batches do."""
from __future__ import annotations

import pytest

from llmft import generate, models, templates
from llmft.config import GenerationConfig, load_config
from llmft.errors import LlmftError

QUESTIONS = ["Name a colour.", "Write a long story about " + "a cat and a dog " * 40, "x",
             "What is the capital of France? Answer briefly, please.", "Count: " + " ".join(map(str, range(60))),
             "Why is the sky blue?", "Translate 'good morning' into French, German and Spanish."]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    return models.load_with_tokenizer(models.config_for(str(tiny_model_dir)), device="cpu")


def _prompts():
    return [templates.render_prompt("alpaca", [(q, None)]) for q in QUESTIONS]


def _both(model, tok, prompts, **fast):
    plain = generate.generate(model, tok, prompts, GenerationConfig(max_new_tokens=24, batch_size=3, fast=False),
                              progress=False)
    gen = GenerationConfig(**{"max_new_tokens": 24, "fast": True, "bucket_tokens": 16, "refill_tokens": 8,
                              "fast_batch_size": 2, **fast})
    return plain, generate.generate(model, tok, prompts, gen, progress=False)


def test_fast_path_greedy_equals_plain_in_input_order(model_tok):
    """Mixed lengths (37 to 242 tokens) in an order that is not by length, several buckets, batches of 2 refilled
    every 8 tokens: each answer must be plain generate's, at its own index."""
    model, tok = model_tok
    prompts = _prompts()
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert lengths != sorted(lengths) and max(lengths) > 5 * min(lengths)
    plain, fast = _both(model, tok, prompts)
    assert len(set(plain)) == len(plain)  # distinct answers, so a mix-up of rows would show
    assert fast == plain
    assert tok.padding_side == "right" and tok.truncation_side == "right"


def test_rows_that_stop_early_leave_and_their_slots_refill(model_tok, tiny_model_dir, monkeypatch):
    """EOS set to a token that the first answer emits early: that row stops in the first round, a queued prompt
    takes its slot beside rows still going, and every answer is still plain generate's."""
    
    model, tok = model_tok[0], models.tokenizer(models.config_for(tiny_model_dir))  # a copy: its EOS changes
    prompts = _prompts()
    enc = tok(prompts[:1], return_tensors="pt")
    first = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:]
    stop = int(first[3])  # the 4th token of the first answer becomes EOS
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    assert tok.eos_token_id == stop
    rounds = []
    real_round = generate._round

    def spy(model, tok, seqs, *a, **k):
        rounds.append(seqs)
        return real_round(model, tok, seqs, *a, **k)

    monkeypatch.setattr(generate, "_round", spy)
    plain, fast = _both(model, tok, prompts, fast_batch_size=3)
    assert fast == plain
    ended = [a for a in plain if len(tok(a).input_ids) < 12]
    assert ended and len(ended) < len(plain)  # some rows ended early, others ran to max_new_tokens
    fresh = [list(x) for x in tok(prompts).input_ids]
    # a later round holds a queued prompt (its ids alone) beside a row carried over (prompt + answer so far)
    assert any(any(s in fresh for s in seqs) and any(s not in fresh for s in seqs) for seqs in rounds[1:])


def _answers(model, tok, prompts, n=24) -> list[list[int]]:
    """Each prompt's greedy answer alone, as token ids."""
    out = []
    for p in prompts:
        enc = tok([p], return_tensors="pt")
        out.append(model.generate(**enc, max_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:].tolist())
    return out


def test_rows_padded_to_the_batch_answer_as_plain(model_tok, tiny_model_dir, monkeypatch):
    """On a GPU every round is padded to the batch's row count with copies of its first row (one compiled shape);
    forced here on the CPU, with rows that stop early and refills, each answer is still plain generate's."""
    
    model, tok = model_tok[0], models.tokenizer(models.config_for(tiny_model_dir))
    prompts = _prompts()
    tok.eos_token = tok.convert_ids_to_tokens(_answers(model, tok, prompts[:1])[0][3])
    monkeypatch.setattr(generate, "_pads", lambda device: True)
    plain, fast = _both(model, tok, prompts, fast_batch_size=3)
    assert fast == plain


def test_a_round_ends_when_its_live_rows_do(model_tok, tiny_model_dir, monkeypatch):
    """Two rows in one batch, EOS a token both answers hold: the first row stops in an earlier round and its slot
    idles; the second stops inside a later round, which must end there, not run on for the idle slot."""
    
    model, tok = model_tok[0], models.tokenizer(models.config_for(tiny_model_dir))
    prompts = _prompts()
    ans = _answers(model, tok, prompts)
    case = next(((i, j, t, b.index(t), r) for i, a in enumerate(ans) for t in a for j, b in enumerate(ans)
                 for r in range(2, 9) if j != i and t in b and a.index(t) // r < b.index(t) // r
                 and b.index(t) % r != r - 1 and b.index(t) <= 21), None)
    assert case, "no token ends one answer a round before another's (the tiny model changed?)"
    i, j, eos, at, refill = case
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    steps = []
    real_round = generate._round

    def spy(*a, **k):
        more, state = real_round(*a, **k)
        steps.append(len(more[0]))
        return more, state

    monkeypatch.setattr(generate, "_round", spy)
    plain, fast = _both(model, tok, [prompts[i], prompts[j]], fast_batch_size=2, refill_tokens=refill)
    assert fast == plain
    assert sum(steps) == at + 1  # decode steps: up to the second row's EOS, none after


def test_rounds_with_nothing_queued_go_on_in_the_same_cache(model_tok, monkeypatch):
    """One batch holds every prompt, so no slot is ever refilled: after the first round the rows go on from the
    last round's cache (no second prefill), and the answers are still plain generate's."""
    model, tok = model_tok
    fresh = []
    real_round = generate._round

    def spy(*a, **k):
        fresh.append(k.get("state", a[8] if len(a) > 8 else None) is None)
        return real_round(*a, **k)

    monkeypatch.setattr(generate, "_round", spy)
    plain, fast = _both(model, tok, _prompts(), fast_batch_size=len(QUESTIONS))
    assert fast == plain
    assert fresh == [True, False, False]  # 24 new tokens in rounds of 8


def test_attention_reads_only_the_slots_the_text_has_reached(model_tok, monkeypatch):
    """One batch, rounds of 8 tokens in the same cache: each round's layers see a prefix of the static cache that
    holds the text so far plus the round's tokens, rounded up to bucket_tokens, growing to the whole cache only at
    the end; the answers are still plain generate's."""
    model, tok = model_tok
    views = []
    real_view = generate._view

    def spy(cache, n):
        real_view(cache, n)
        views.append((n, cache.full[0][0].shape[2], cache.layers[0].keys.shape[2]))

    monkeypatch.setattr(generate, "_view", spy)
    prompts = _prompts()[:3]
    plain, fast = _both(model, tok, prompts, fast_batch_size=3)
    assert fast == plain
    width = max(len(x) for x in tok(prompts).input_ids)
    assert len(views) == 3  # 24 new tokens in rounds of 8
    for r, (n, full, seen) in enumerate(views):
        assert seen == n and n % 16 == 0 and n <= full
        assert n >= width + 8 * (r + 1) > n - 16  # room for this round's tokens, no more than a bucket beyond
    assert views[0][0] < views[-1][0] and views[0][0] < views[0][1]


def test_a_refill_waits_until_an_eighth_of_the_slots_are_free(monkeypatch):
    """Batch 16, 20 prompts: the first row to finish leaves its slot idle and the rest go on in the same cache; when
    a second finishes, queued prompts take both slots in a fresh round. Scripted rounds (no model): the schedule
    is what is under test; that fresh and going-on rounds answer as plain generate does is tested above."""
    import torch

    class Tok:
        eos_token_id = 0

    ends = {3: 1, 5: 2}  # prompt index -> the round in which it emits EOS
    calls = []

    def scripted(model, tok, seqs, n, cache_len, batch, gen, seed, state=None):
        r = len(calls)
        calls.append((state is None, [s[0] - 100 for s in seqs if s is not None]))
        width = (max(len(s) for s in seqs if s) if state is None else state[1].shape[1]) + n
        more = [[0] if s is not None and ends.get(s[0] - 100) == r else [7] * n for s in seqs]
        return more, (None, torch.zeros(1, width))

    monkeypatch.setattr(generate, "_round", scripted)
    gen = GenerationConfig(max_new_tokens=40, refill_tokens=10)
    ids = [[100 + i] for i in range(20)]
    done = dict(generate._refill(None, Tok(), ids, list(range(20)), 16, 64, gen, 0))
    assert [fresh for fresh, _ in calls[:4]] == [True, False, False, True]
    assert calls[1][1] == list(range(16))
    assert calls[2][1] == [i for i in range(16) if i != 3]  # row 3 finished in round 1; its slot idles in round 2
    assert set(calls[3][1]) == set(range(18)) - {3, 5}
    assert sorted(done) == list(range(20)) and done[3] == [7] * 10 + [0] and done[5] == [7] * 20 + [0]
    assert all(len(v) == 40 for i, v in done.items() if i not in ends)


def test_prompt_longer_than_the_context_keeps_its_end_on_the_fast_path(model_tok):
    model, tok = model_tok
    short = templates.render_prompt("alpaca", [("Name a colour.", None)])
    huge = templates.render_prompt("alpaca", [("Summarise: " + "word " * 3000, None)])
    assert len(tok(huge).input_ids) > model.config.max_position_embeddings
    plain, fast = _both(model, tok, [huge, short])
    assert fast == plain


def test_buckets_round_lengths_and_merge_small_buckets():
    gen = GenerationConfig(max_new_tokens=100, bucket_tokens=64)
    lengths = [10, 70, 65, 300, 20, 130, 60]
    # every bucket fills a batch of 2: widths 64 (10, 20, 60), 128 (65, 70), 192 (130), 320 (300)
    out = generate.buckets(lengths, gen, lambda cache_len: 2)
    assert [(c, rows) for c, rows, _ in out] == [(164, [0, 4, 6]), (228, [2, 1]), (420, [5, 3])]
    # batches of 4: the short buckets join longer ones until one batch is full; the last takes the rest
    out = generate.buckets(lengths, gen, lambda cache_len: 4)
    assert [(c, rows) for c, rows, _ in out] == [(228, [0, 4, 6, 2, 1]), (420, [5, 3])]
    # 5 prompts at 4 rows are two batches of 3 (not 4 and 1 padded to 4); 2 fit one batch of 2
    assert [b for _, _, b in out] == [3, 2]
    assert [b for _, _, b in generate.buckets(list(range(1, 13)), gen, lambda cache_len: 5)] == [4]


def test_a_few_long_prompts_do_not_stretch_the_cache_of_shorter_ones():
    """Rows of width 64 join the 128 bucket (3 rows x 64 extra slots = 192 <= 200 slots a batch's weight reads cost),
    but those joined rows then stay apart from the one 2,048-token prompt (5 x 1,920 extra slots > 200)."""
    gen = GenerationConfig(max_new_tokens=100, bucket_tokens=64)
    lengths = [10, 20, 30, 100, 110, 2000]
    plan = generate.buckets(lengths, gen, lambda cache_len: 8, step_slots=200)
    assert [(c, rows) for c, rows, _ in plan] == [(228, [0, 1, 2, 3, 4]), (2148, [5])]
    # with no cost given (0), a bucket short of a full batch always joins the next: one bucket of 2,048 + 100
    assert [(c, rows) for c, rows, _ in generate.buckets(lengths, gen, lambda cache_len: 8)] == [(2148, [0, 1, 2, 3, 4, 5])]


def test_batch_rows_on_cpu_and_when_given(model_tok):
    model, _ = model_tok
    assert generate.batch_rows(model, 1024, GenerationConfig(batch_size=5)) == 5
    assert generate.batch_rows(model, 1024, GenerationConfig(batch_size=5, fast_batch_size=12)) == 12


@pytest.mark.parametrize("override, message", [
    ("evaluate.generation.fast=always", "'evaluate.generation.fast' = 'always' is not one of 'auto', True, False"),
    ("evaluate.generation.fast_batch_size=-1", "must be >= 0"),
    ("evaluate.generation.refill_tokens=0", "must be >= 1"),
    ("evaluate.generation.bucket_tokens=0", "must be >= 1"),
])
def test_fast_path_keys_are_validated_at_load(tmp_path, override, message):
    with pytest.raises(LlmftError, match=message.replace("(", r"\(")):
        load_config(tmp_path / "missing.yaml", [override])
