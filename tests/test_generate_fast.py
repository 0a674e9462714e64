"""The fast generation path (llmft/slots.py: slots refilled as rows finish) answers exactly as plain batches do."""
from __future__ import annotations

import dataclasses

import pytest

from llmft import generate, models, slots, templates
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
    gen = GenerationConfig(**{"max_new_tokens": 24, "fast": True, "refill_tokens": 8, "fast_batch_size": 2, **fast})
    return plain, generate.generate(model, tok, prompts, gen, progress=False)


def test_fast_path_greedy_equals_plain_in_input_order(model_tok):
    """Mixed lengths (37 to 242 tokens) in an order that is not by length, 2 slots refilled every 8 tokens: each
    answer must be plain generate's, at its own index."""
    model, tok = model_tok
    prompts = _prompts()
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert lengths != sorted(lengths) and max(lengths) > 5 * min(lengths)
    plain, fast = _both(model, tok, prompts)
    assert len(set(plain)) == len(plain)  # distinct answers, so a mix-up of rows would show
    assert fast == plain
    assert tok.padding_side == "right" and tok.truncation_side == "right"


def _answers(model, tok, prompts, n=24) -> list[list[int]]:
    """Each prompt's greedy answer alone, as token ids."""
    out = []
    for p in prompts:
        enc = tok([p], return_tensors="pt")
        out.append(model.generate(**enc, max_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:].tolist())
    return out


class Spy:
    """Records the decoder's slot capacities and every prefill: [(slot, prompt ids)] with the slots live then."""

    def __init__(self, monkeypatch):
        self.caps, self.prefills = [], []
        init, prefill = slots.Decoder.__init__, slots.Decoder.prefill

        def spy_init(dec, model, caps, *a, **k):
            self.caps.append(list(caps))
            init(dec, model, caps, *a, **k)

        def spy_prefill(dec, entries):
            self.prefills.append(([(j, list(seq)) for j, seq in entries], dec.live.tolist()))
            return prefill(dec, entries)

        monkeypatch.setattr(slots.Decoder, "__init__", spy_init)
        monkeypatch.setattr(slots.Decoder, "prefill", spy_prefill)


def _eos_at(tok, model, prompt, k):
    """A tokenizer copy's EOS set to the k-th token of `prompt`'s greedy answer, so that row ends early."""
    tok.eos_token = tok.convert_ids_to_tokens(_answers(model, tok, [prompt])[0][k])


def test_rows_that_stop_early_leave_and_their_slots_refill(model_tok, tiny_model_dir, monkeypatch):
    """EOS set to a token that the first answer emits early: that row stops in the first round, a queued prompt
    takes its slot beside rows still decoding, and every answer is still plain generate's."""
    model, tok = model_tok[0], models.tokenizer(models.config_for(tiny_model_dir))  # a copy: its EOS changes
    prompts = _prompts()
    _eos_at(tok, model, prompts[0], 3)
    spy = Spy(monkeypatch)
    plain, fast = _both(model, tok, prompts, fast_batch_size=3)
    assert fast == plain
    ended = [a for a in plain if len(tok(a).input_ids) < 12]
    assert ended and len(ended) < len(plain)  # some rows ended early, others ran to max_new_tokens
    # a later prefill fills a slot while another slot's row goes on decoding (live), not read again
    assert any(sum(live) > 0 and all(live[j] == 0 for j, _ in entries) for entries, live in spy.prefills[1:])


def test_each_prompt_is_read_once_into_a_slot_that_holds_it(model_tok, monkeypatch):
    """Prefills read each prompt's own tokens once (rows already decoding are never read again); slots are as long
    as the longest prompts + max_new_tokens, and every prompt goes into a slot that holds it and its answer."""
    model, tok = model_tok
    prompts = _prompts()
    spy = Spy(monkeypatch)
    plain, fast = _both(model, tok, prompts, fast_batch_size=3)
    assert fast == plain
    ids = [list(x) for x in tok(prompts).input_ids]
    read = [seq for entries, _ in spy.prefills for _, seq in entries]
    assert sorted(read) == sorted(ids)
    (caps,) = spy.caps
    assert caps == sorted(len(x) + 24 for x in ids)[::-1][:3]
    assert all(len(seq) + 24 <= caps[j] for entries, _ in spy.prefills for j, seq in entries)


def test_attention_reads_only_each_slots_own_tokens(model_tok, monkeypatch):
    """Before every decode step the cache past each slot's text is filled with large values (where a longer earlier
    row's tokens lie): a step that attended to one of them would turn its row's answer to garbage."""
    import torch

    model, tok = model_tok
    real_step = slots.Decoder._step

    def poisoned_step(dec):
        for k, v in dec.caches:
            for j, (start, cap) in enumerate(zip(dec.first, dec.caps)):
                for c in (k, v):
                    c[start + int(dec.lens[j]):start + cap] = 1e4
        return real_step(dec)

    monkeypatch.setattr(slots.Decoder, "_step", poisoned_step)
    plain, fast = _both(model, tok, _prompts(), fast_batch_size=3)
    assert fast == plain


def test_sampling_on_the_fast_path(model_tok):
    """top_p so small that the nucleus is the top token alone is greedy; a seed repeats its samples."""
    model, tok = model_tok
    prompts = _prompts()[:4]
    plain, _ = _both(model, tok, prompts)
    sample = {"max_new_tokens": 24, "fast": True, "fast_batch_size": 3, "temperature": 1.0}
    nucleus_of_one = generate.generate(model, tok, prompts, GenerationConfig(**sample, top_p=1e-6), progress=False)
    assert nucleus_of_one == plain
    runs = [generate.generate(model, tok, prompts, GenerationConfig(**sample, top_p=0.9), progress=False, seed=s)
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0] != plain


def test_a_model_with_sliding_window_attention_takes_the_plain_path(model_tok, caplog):
    """Slots keep every token; a sliding-window layer must not see them all, so such a model generates plainly."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = model_tok[1]
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16)).eval()
    prompts = _prompts()[:3]
    with caplog.at_level("INFO", logger="llmft.generate"):
        plain, fast = _both(model, tok, prompts)
    assert fast == plain
    assert "plain batches instead" in caplog.text


def test_a_repetition_penalty_takes_the_plain_path(model_tok, caplog):
    """The slot decoder applies no penalty: with one set, fast=true generates plainly and says why."""
    model, tok = model_tok
    prompts = _prompts()[:3]
    plain = generate.generate(model, tok, prompts, GenerationConfig(max_new_tokens=24, fast=False,
                                                                    repetition_penalty=1.5), progress=False)
    with caplog.at_level("INFO", logger="llmft.generate"):
        fast = generate.generate(model, tok, prompts, GenerationConfig(max_new_tokens=24, fast=True,
                                                                       repetition_penalty=1.5), progress=False)
    assert fast == plain and "repetition_penalty is not 1" in caplog.text
    assert plain != _both(model, tok, prompts)[0]  # the penalty changed the answers


def test_no_prompts_no_answers(model_tok):
    model, tok = model_tok
    assert generate.generate(model, tok, [], GenerationConfig(fast=True), progress=False) == []


def test_prompt_longer_than_the_context_keeps_its_end_on_the_fast_path(model_tok):
    model, tok = model_tok
    short = templates.render_prompt("alpaca", [("Name a colour.", None)])
    huge = templates.render_prompt("alpaca", [("Summarise: " + "word " * 3000, None)])
    assert len(tok(huge).input_ids) > model.config.max_position_embeddings
    plain, fast = _both(model, tok, [huge, short])
    assert fast == plain


def test_an_fp8_cache_is_read_as_the_rounded_keys_and_values(model_tok, monkeypatch):
    """kv_cache: fp8 stores float8 bytes and decode steps read them back: its answers must equal those of a
    model-dtype cache that holds the same values rounded to fp8 (prefill reads the unrounded ones in both), and the
    rounding must change some answer, or the test would not see a cache read as something else."""
    import torch

    model, tok = model_tok
    prompts = _prompts()
    caches = []
    init = slots.Decoder.__init__

    def spy_init(dec, *a, **k):
        init(dec, *a, **k)
        caches.append(dec.caches)

    monkeypatch.setattr(slots.Decoder, "__init__", spy_init)
    _, fp8 = _both(model, tok, prompts, kv_cache="fp8")
    assert caches[-1][0][0].dtype == torch.float8_e4m3fn and bool(caches[-1][0][0].float().abs().sum() > 0)
    plain, same = _both(model, tok, prompts)
    store = slots._store

    def rounded(cache, dest, x):  # the model-dtype cache, holding what an fp8 cache holds
        store(cache, dest, x.clamp(-slots.FP8_MAX, slots.FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype))

    monkeypatch.setattr(slots, "_store", rounded)
    _, emulated = _both(model, tok, prompts)
    assert same == plain and fp8 == emulated and fp8 != plain


def test_an_fp8_cache_takes_a_byte_a_value(model_tok):
    model, _ = model_tok
    full, fp8 = (generate.kv_bytes(model, GenerationConfig(kv_cache=c)) for c in ("model", "fp8"))
    assert full == 2 * 2 * 64 * 4 and fp8 == full // 4  # tiny model: 2 layers x width 64, fp32 -> 1 byte


def test_an_fp8_cache_is_never_given_to_flash_attention(model_tok, monkeypatch):
    """FlashAttention reads only the model's dtype: with it on offer (stood in for on CPU) and the Triton kernel
    not, a model-dtype cache takes it and an fp8 cache goes to sdpa."""
    model, tok = model_tok
    calls = []
    monkeypatch.setattr(slots, "_flash", lambda t: True)
    monkeypatch.setattr(slots, "_seqused_k", lambda: True)
    monkeypatch.setattr(slots.decode_attention, "fits", lambda q, k: False)

    def flash(q, k, *a, **kw):  # FlashAttention's signature; records the cache dtype it was handed
        calls.append(k.dtype)
        raise RuntimeError("stand-in")

    import torch

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash, raising=False)
    prompts = _prompts()[:2]
    gen = GenerationConfig(max_new_tokens=4, fast=True, fast_batch_size=2, kv_cache="fp8")
    monkeypatch.setattr(slots, "_prefill_attention", lambda q, k, v, s, scale: q)  # prefill: not under test here
    generate.generate(model, tok, prompts, gen, progress=False)
    assert slots.USED == "sdpa" and calls == []
    with pytest.raises(RuntimeError, match="stand-in"):
        generate.generate(model, tok, prompts, dataclasses.replace(gen, kv_cache="model"), progress=False)
    assert calls == [torch.float32]


def test_batch_rows_on_cpu_and_when_given(model_tok):
    model, _ = model_tok
    lengths = [900, 500, 20] + [10] * 9
    assert generate.batch_rows(model, lengths, GenerationConfig(batch_size=5)) == 5
    assert generate.batch_rows(model, lengths, GenerationConfig(batch_size=5, fast_batch_size=8)) == 8
    assert generate.batch_rows(model, lengths[:2], GenerationConfig(batch_size=5, fast_batch_size=8)) == 2


@pytest.mark.parametrize("override, message", [
    ("evaluate.generation.fast=always", "'evaluate.generation.fast' = 'always' is not one of 'auto', True, False"),
    ("evaluate.generation.fast_batch_size=-1", "must be >= 0"),
    ("evaluate.generation.refill_tokens=0", "must be >= 1"),
    ("evaluate.generation.kv_cache=fp16", "'evaluate.generation.kv_cache' = 'fp16' is not one of 'model', 'fp8'"),
    ("evaluate.generation.bucket_tokens=128", "removed: the fast path's slots read only their own tokens"),
])
def test_fast_path_keys_are_validated_at_load(tmp_path, override, message):
    with pytest.raises(LlmftError, match=message.replace("(", r"\(")):
        load_config(tmp_path / "missing.yaml", [override])
