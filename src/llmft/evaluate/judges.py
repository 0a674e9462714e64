"""LLM judge client: OpenAI or any OpenAI-compatible server, with retries, bounded concurrency and a disk cache.

Retries on the wire are the openai client's own (exponential backoff with jitter on timeouts, connection
errors, 408, 409, 429 and 5xx, honouring Retry-After). Two faults it does not retry are ours to handle: a
200 whose body is not a chat completion (malformed JSON, no choices) and a completion whose message is empty.
Neither is a judgment, so each is asked again, up to `max_retries` times; if every answer is still malformed
or empty, the judgment is given up: it reads as empty, which the benchmark's parser counts as a parse
failure, and it is not cached, so a rerun asks again.

Every HTTP attempt is counted by a transport under the openai client (its retries happen inside it), so the
run reports requests, retries and failures by kind (`timeout`, `connection`, `http_<status>`,
`malformed_body`, `empty_message`) next to its results. Every judgment is written to the cache as soon as it
arrives, one file per key, so a rerun pays nothing twice and a killed run resumes where it stopped. The API
key is read from the environment at call time and is never logged, cached or returned.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import JudgeConfig
from ..errors import LlmftError
from ..io import write_atomic

OPENAI_URL = "https://api.openai.com/v1"


@dataclass
class Judge:
    cfg: JudgeConfig
    client: Any
    cache_dir: Path
    counts: Counter = field(default_factory=Counter)
    """requests (HTTP attempts, retries included), asked (judgments not in the cache), judgments (received and
    cached), cached (answered from the cache), given_up (malformed or empty every time)."""
    failures: Counter = field(default_factory=Counter)  # failed HTTP attempts and answers, by kind
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, failure: bool = False) -> None:
        with self.lock:
            (self.failures if failure else self.counts)[key] += 1

    @property
    def url(self) -> str:
        return self.cfg.base_url or OPENAI_URL

    @property
    def name(self) -> str:
        return f"{self.cfg.model} at {self.url}"


def make(cfg: JudgeConfig, cache_dir: str | Path) -> Optional[Judge]:
    """The configured judge, or None when none is configured (judge benchmarks are then skipped)."""
    if not cfg.model:
        return None
    from openai import OpenAI

    key = os.environ.get(cfg.api_key_env)
    if not key:
        if cfg.base_url is None:
            raise LlmftError(f"judge {cfg.model} on OpenAI needs an API key in the environment variable "
                             f"{cfg.api_key_env} (evaluate.judge.api_key_env), which is not set")
        key = "EMPTY"  # local OpenAI-compatible servers (vLLM, ...) accept any key
    judge = Judge(cfg=cfg, client=None, cache_dir=Path(cache_dir))
    judge.client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=cfg.max_retries, timeout=cfg.timeout_s,
                          http_client=_counting_http_client(judge))
    return judge


def _counting_http_client(judge: Judge):
    """The openai client's own httpx2 client (its defaults), over a transport that counts every attempt."""
    import httpx2
    from openai import DEFAULT_CONNECTION_LIMITS, DefaultHttpx2Client

    class Counting(httpx2.BaseTransport):
        def __init__(self):
            self.inner = httpx2.HTTPTransport(limits=DEFAULT_CONNECTION_LIMITS)  # a given transport ignores the client's

        def handle_request(self, request):
            judge.count("requests")
            try:
                response = self.inner.handle_request(request)
            except httpx2.TimeoutException:
                judge.count("timeout", failure=True)
                raise
            except httpx2.TransportError:
                judge.count("connection", failure=True)
                raise
            if response.status_code >= 400:
                judge.count(f"http_{response.status_code}", failure=True)
            return response

        def close(self):
            self.inner.close()

    return DefaultHttpx2Client(transport=Counting())


def summary(judge: Judge) -> dict:
    """What the judge cost and suffered: the counts, retries (every attempt after a judgment's first) and
    failures by kind, for meta.json, table.md and the summary line."""
    c = judge.counts
    return {"requests": c["requests"], "retries": max(0, c["requests"] - c["asked"]), "judgments": c["judgments"],
            "cached": c["cached"], "given_up": c["given_up"], "failures": dict(sorted(judge.failures.items()))}


def describe_summary(s: dict) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "none"
    return (f"{s['requests']} requests ({s['retries']} retries; failures: {failures}), {s['judgments']} new "
            f"judgments, {s['cached']} cached" + (f", {s['given_up']} given up" if s["given_up"] else ""))


def cache_key(judge: Judge, messages: list[dict], params: dict, repeat: int = 0) -> str:
    """Repeat 0 is the plain request (caches from before repeats existed stay valid); repeat k > 0 its own key."""
    record = {"model": judge.cfg.model, "base_url": judge.url, "messages": messages, "params": params}
    if repeat:
        record["repeat"] = repeat
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(judge: Judge, key: str) -> Path:
    return judge.cache_dir / key[:2] / f"{key}.json"


def _read_cache(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())["response"]
    except (OSError, ValueError, KeyError):
        return None  # absent, or torn by a crash mid-write of an older non-atomic writer: ask again


def _write_cache(path: Path, record: dict) -> None:
    write_atomic(path, json.dumps(record, ensure_ascii=False))


GIVEN_UP = {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None, "given_up": True}


def chat(judge: Judge, messages: list[dict], repeat: int = 0, **params) -> dict:
    """One judgment: the first choice as a dict (`message.content`, and `logprobs` when asked for).

    repeat: which of the evaluate.judge.repeats askings this is (each has its own cache entry)."""
    key = cache_key(judge, messages, params, repeat)
    path = _cache_path(judge, key)
    cached = _read_cache(path)
    if cached is not None:
        judge.count("cached")
        return cached
    judge.count("asked")
    for _ in range(judge.cfg.max_retries + 1):
        try:
            resp = judge.client.chat.completions.create(model=judge.cfg.model, messages=messages, **params)
        except ValueError:  # a 200 whose body is not JSON (json.JSONDecodeError)
            judge.count("malformed_body", failure=True)
            continue
        if not getattr(resp, "choices", None):  # JSON, but not a chat completion
            judge.count("malformed_body", failure=True)
            continue
        choice = resp.choices[0].model_dump()
        if not content(choice):
            judge.count("empty_message", failure=True)
            continue
        judge.count("judgments")
        _write_cache(path, {"model": judge.cfg.model, "base_url": judge.url, "params": params, "messages": messages,
                            **({"repeat": repeat} if repeat else {}), "response": choice})
        return choice
    judge.count("given_up")
    return copy.deepcopy(GIVEN_UP)


def _describe_failure(judge: Judge, e: Exception) -> str:
    import openai

    if isinstance(e, openai.APIConnectionError):  # includes timeouts
        what = f"unreachable after {judge.cfg.max_retries} retries ({type(e).__name__}: {e})"
    elif isinstance(e, openai.AuthenticationError):
        what = f"refused the API key from ${judge.cfg.api_key_env} (HTTP 401)"
    elif isinstance(e, openai.APIStatusError):
        what = f"answered HTTP {e.status_code}: {str(e)[:300]}"
    else:
        what = f"failed: {type(e).__name__}: {e}"
    return f"judge {judge.name} {what}"


def chat_many(judge: Judge, requests: list[tuple[list[dict], dict]], desc: str = "judging",
              repeat: int = 0) -> list[dict]:
    """Judgments for many (messages, params) requests, `max_concurrency` at a time, in request order.

    The first request that still fails after the client's retries stops the rest and raises LlmftError
    naming the judge's URL; judgments already received stay in the cache for the next run.
    """
    from tqdm.auto import tqdm

    pool = ThreadPoolExecutor(max_workers=max(1, judge.cfg.max_concurrency))
    failed = []
    try:
        n = judge.cfg.repeats
        what = f"{desc} ({judge.cfg.model}" + (f", repeat {repeat + 1}/{n})" if n > 1 else ")")
        with tqdm(total=len(requests), desc=what, unit="judgment") as bar:
            futures = [pool.submit(chat, judge, messages, repeat, **params) for messages, params in requests]
            for f in futures:
                f.add_done_callback(lambda _f: bar.update(1))
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
    finally:
        # on failure, drop what has not started; requests in flight finish (and are cached) in the background
        pool.shutdown(wait=not failed, cancel_futures=True)
    if failed:
        e = failed[0].exception()
        raise LlmftError(f"{_describe_failure(judge, e)}; {judge.counts['judgments']} new judgments are cached "
                         f"in {judge.cache_dir}, a rerun resumes from there") from e
    out = [f.result() for f in futures]
    return out


def content(choice: dict) -> str:
    return ((choice or {}).get("message") or {}).get("content") or ""
