"""LLM judge client: OpenAI or any OpenAI-compatible server, with retries, bounded concurrency and a disk cache.

Retries are the openai client's own (exponential backoff with jitter on timeouts, connection errors, 408,
409, 429 and 5xx, honouring Retry-After). Every judgment is written to the cache as soon as it arrives,
one file per key, so a rerun pays nothing twice and a killed run resumes where it stopped. The API key is
read from the environment at call time and is never logged, cached or returned.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import JudgeConfig, LlmftError

OPENAI_URL = "https://api.openai.com/v1"


@dataclass
class Judge:
    cfg: JudgeConfig
    client: Any
    cache_dir: Path
    counts: Counter = field(default_factory=Counter)  # requests (HTTP calls that returned), cached
    lock: threading.Lock = field(default_factory=threading.Lock)

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
    client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    return Judge(cfg=cfg, client=client, cache_dir=Path(cache_dir))


def cache_key(judge: Judge, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": judge.cfg.model, "base_url": judge.url, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_path(judge: Judge, key: str) -> Path:
    return judge.cache_dir / key[:2] / f"{key}.json"


def _read_cache(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())["response"]
    except (OSError, ValueError, KeyError):
        return None  # absent, or torn by a crash mid-write of an older non-atomic writer: ask again


def _write_cache(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False))
    os.replace(tmp, path)


def chat(judge: Judge, messages: list[dict], **params) -> dict:
    """One judgment: the first choice as a dict (`message.content`, and `logprobs` when asked for)."""
    key = cache_key(judge, messages, params)
    path = _cache_path(judge, key)
    cached = _read_cache(path)
    if cached is not None:
        with judge.lock:
            judge.counts["cached"] += 1
        return cached
    resp = judge.client.chat.completions.create(model=judge.cfg.model, messages=messages, **params)
    choice = resp.choices[0].model_dump()
    with judge.lock:
        judge.counts["requests"] += 1
    _write_cache(path, {"model": judge.cfg.model, "base_url": judge.url, "params": params, "messages": messages,
                        "response": choice})
    return choice


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


def chat_many(judge: Judge, requests: list[tuple[list[dict], dict]], desc: str = "judging") -> list[dict]:
    """Judgments for many (messages, params) requests, `max_concurrency` at a time, in request order.

    The first request that still fails after the client's retries stops the rest and raises LlmftError
    naming the judge's URL; judgments already received stay in the cache for the next run.
    """
    from tqdm.auto import tqdm

    pool = ThreadPoolExecutor(max_workers=max(1, judge.cfg.max_concurrency))
    failed = []
    try:
        with tqdm(total=len(requests), desc=f"{desc} ({judge.cfg.model})", unit="judgment") as bar:
            futures = [pool.submit(chat, judge, messages, **params) for messages, params in requests]
            for f in futures:
                f.add_done_callback(lambda _f: bar.update(1))
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
    finally:
        # on failure, drop what has not started; requests in flight finish (and are cached) in the background
        pool.shutdown(wait=not failed, cancel_futures=True)
    if failed:
        e = failed[0].exception()
        raise LlmftError(f"{_describe_failure(judge, e)}; {judge.counts['requests']} new judgments are cached "
                         f"in {judge.cache_dir}, a rerun resumes from there") from e
    out = [f.result() for f in futures]
    return out


def content(choice: dict) -> str:
    return ((choice or {}).get("message") or {}).get("content") or ""
