"""Concurrent requests to the served model share one generation batch.

`mlflow models serve` (MLflow 3.17) answers each request in a thread of its event loop's default executor
(`asyncio.to_thread(invocations, ...)` in `mlflow/pyfunc/scoring_server/__init__.py`), one uvicorn worker process
unless `--workers` says more. So `predict` runs in many threads at once, and one model per process serves them all.

A `Batcher` owns the model on one worker thread. A request's thread validates its rows, then `submit`s its prompts
with its generation settings and waits. The worker takes the first waiting request and lets others join (those
already waiting at once) until none has come for `window_s` or the batch holds `max_rows` rows, then runs one
generation per group of requests with equal settings. Each request gets its own answers, in order. When a group's generation
raises, its requests run again one by one, so only the one that fails gets the error.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    prompts: list[str]
    settings: Any
    """Requests with equal settings (==) generate together."""
    share: bool = True
    """False: generate alone, whatever its settings."""
    done: threading.Event = field(default_factory=threading.Event)
    answers: list[str] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, run: Callable[[list[str], Any], list[str]], window_s: float, max_rows: int):
        """`run(prompts, settings)` returns one answer per prompt; only the worker thread calls it."""
        self.run, self.window_s, self.max_rows = run, window_s, max_rows
        self.queue: queue.Queue[Request] = queue.Queue()
        threading.Thread(target=self._work, name="llmft-batcher", daemon=True).start()

    def submit(self, prompts: list[str], settings: Any, share: bool = True) -> list[str]:
        """The answers to `prompts`, generated with `settings`, once the worker has run them (blocks)."""
        req = Request(prompts, settings, share)
        self.queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.answers

    def _work(self) -> None:
        held = None  # a request that did not fit the last batch: it opens the next one
        while True:
            batch, held = self._collect(held or self.queue.get())
            start = time.perf_counter()
            groups = group(batch)
            for members in groups:
                self._run(members)
            log.info("batch of %d requests, %d rows, %d generations in %.2f s", len(batch),
                     sum(len(r.prompts) for r in batch), len(groups), time.perf_counter() - start)

    def _collect(self, first: Request) -> tuple[list[Request], Request | None]:
        """(the batch `first` opens, the request that arrived but did not fit or None). The batch closes once no
        request has come for `window_s`: clients answered together come back together, one after another (each
        parsed under the GIL); a fixed window from the first would catch the first few only. Each request extends
        the wait by at most `window_s`, so a batch waits at most max_rows x window_s."""
        batch, rows = [first], len(first.prompts)
        while rows < self.max_rows:
            try:
                req = self.queue.get(timeout=self.window_s)
            except queue.Empty:
                break
            if rows + len(req.prompts) > self.max_rows:
                return batch, req
            batch.append(req)
            rows += len(req.prompts)
        return batch, None

    def _run(self, members: list[Request]) -> None:
        """One generation for requests of equal settings; on an error, each request again alone."""
        try:
            answers = self.run([p for r in members for p in r.prompts], members[0].settings)
        except BaseException as e:  # noqa: BLE001 -- handed to the waiting request(s), never kills the worker
            if len(members) == 1:
                members[0].error = e
                members[0].done.set()
                return
            log.warning("a batch of %d requests failed (%s: %.200s); each runs alone", len(members),
                        type(e).__name__, e)
            for r in members:
                self._run([r])
            return
        i = 0
        for r in members:
            r.answers, i = answers[i:i + len(r.prompts)], i + len(r.prompts)
            r.done.set()


def group(batch: list[Request]) -> list[list[Request]]:
    """Requests of equal settings together, in order of arrival; a request that does not share stays alone."""
    groups: list[list[Request]] = []
    for r in batch:
        same = next((g for g in groups if r.share and g[0].share and g[0].settings == r.settings), None)
        if same is None:
            groups.append([r])
        else:
            same.append(r)
    return groups
