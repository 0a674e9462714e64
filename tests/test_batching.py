"""The served model's batcher (llmft/batching.py) with a stand-in generation: requests that arrive together share a
generation, each gets its own answers with its own settings, a batch never passes max_rows, and a request whose
generation fails takes no other request down with it. tests/test_serving.py checks the same through
`mlflow models serve`."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmft.batching import Batcher


class Generation:
    """Answers `prompt@settings`, records each call's prompts; raises on a prompt containing 'boom'."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, prompts, settings):
        self.calls.append(list(prompts))
        if any("boom" in p for p in prompts):
            raise ValueError("the model cannot say boom")
        return [f"{p}@{settings}" for p in prompts]


def submit_together(batcher, requests):
    """Submit (prompts, settings, share) from one thread each, released at once; each one's answers or error."""
    start = threading.Barrier(len(requests))

    def one(req):
        start.wait()
        try:
            return batcher.submit(*req)
        except ValueError as e:
            return e

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_requests_that_arrive_together_share_one_generation():
    gen = Generation()
    # the window outlasts the arrivals; the batch closes when its rows reach max_rows
    batcher = Batcher(gen, window_s=30, max_rows=7)
    requests = [([f"r{i}.{j}" for j in range(1 + i % 3)], "greedy", True) for i in range(4)]
    answers = submit_together(batcher, requests)
    assert answers == [[f"{p}@greedy" for p in prompts] for prompts, _, _ in requests]
    assert len(gen.calls) == 1 and sorted(gen.calls[0]) == sorted(p for r in requests for p in r[0])


def test_each_request_keeps_its_settings():
    gen = Generation()
    batcher = Batcher(gen, window_s=30, max_rows=6)
    requests = [(["a"], "n=1", True), (["b"], "n=8", True), (["c"], "n=1", True), (["d", "e"], "n=8", True),
                (["f"], "n=1", False)]  # f may not share, though its settings equal a's
    answers = submit_together(batcher, requests)
    assert answers == [[f"{p}@{s}" for p in prompts] for prompts, s, _ in requests]
    assert sorted(map(sorted, gen.calls)) == [["a", "c"], ["b", "d", "e"], ["f"]]


def test_a_failing_request_fails_alone_and_the_worker_goes_on():
    gen = Generation()
    batcher = Batcher(gen, window_s=30, max_rows=5)
    requests = [(["good0"], "s", True), (["good1", "good2"], "s", True), (["boom"], "s", True), (["good3"], "s", True)]
    answers = submit_together(batcher, requests)
    assert [a if isinstance(a, list) else str(a) for a in answers] == \
        [["good0@s"], ["good1@s", "good2@s"], "the model cannot say boom", ["good3@s"]]
    assert len(gen.calls[0]) == 5 and sorted(map(sorted, gen.calls[1:])) == \
        [["boom"], ["good0"], ["good1", "good2"], ["good3"]]  # the batch, then each request alone
    later = [f"later{j}" for j in range(5)]  # max_rows: no wait for more
    assert batcher.submit(later, "s") == [f"{p}@s" for p in later]


@pytest.mark.parametrize("window_s", [0.0, 0.2])
def test_a_batch_holds_at_most_max_rows(window_s):
    gen = Generation()
    batcher = Batcher(gen, window_s=window_s, max_rows=3)
    requests = [([f"r{i}.{j}" for j in range(2)], "s", True) for i in range(5)] + [([f"big{j}" for j in range(4)], "s", True)]
    answers = submit_together(batcher, requests)
    assert answers == [[f"{p}@s" for p in prompts] for prompts, _, _ in requests]
    # a request larger than max_rows generates alone (generate() cuts it into batches); no other call passes it
    assert [c for c in gen.calls if len(c) > 3] == [[f"big{j}" for j in range(4)]]
    assert sorted(p for c in gen.calls for p in c) == sorted(p for r in requests for p in r[0])
