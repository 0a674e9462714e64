"""A small OpenAI-compatible judge for tests: POST /v1/chat/completions on 127.0.0.1, in a thread.

It answers in the judges' formats, deterministically, from the prompt it is sent:
- AlpacaEval (alpaca_eval's clf prompt, "## Best Model Identifier"): the longer output wins; the answer is
  one token, `m` or `M`, with top_logprobs as the logprob parser expects.
- MT-Bench (FastChat's single-answer prompts, "[[rating]]"): "Rating: [[k]]" with k from the graded answer's
  length (1..10).
Switches: `failures` (a list of HTTP statuses to answer with before answering normally, e.g. [500, 429]),
`delays` / `delay_all` (stall before answering: timeouts, concurrency; `max_inflight` records the peak),
`malformed` (answers no judge parser can read; True or a predicate on the prompt), `single_brackets` (MT-Bench "[k]", FastChat's fallback),
`fault_rate` (that share of requests fails, in one of `fault_kinds`, decided by `fault_seed`, the body and how many
times that body arrived before, so the faults do not depend on thread timing; `injected` counts them),
`vary` (the k-th answer to the same body moves: MT-Bench ratings by +k, AlpacaEval's winner less sure, as a
judge's repeats do).
`requests` counts every POST it received, `bodies` and `headers` keep them.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    if i < 0:
        return ""
    i += len(start)
    j = text.find(end, i)
    return text[i:j if j >= 0 else None]


def alpaca_winner(prompt: str) -> str:
    """'m' when the first output shown is at least as long as the second, else 'M'."""
    outs = re.findall(r'"output": """(.*?)"""', prompt, flags=re.S)
    if len(outs) < 2:
        return "m"
    return "m" if len(outs[0]) >= len(outs[1]) else "M"


def mt_rating(prompt: str) -> int:
    """1..10 from the length of the graded answer (turn 2's in the multi-turn prompts)."""
    if "### Assistant A:" in prompt:
        answer = prompt.split("### Assistant A:")[-1].split("<|The End of Assistant A's Conversation")[0]
    else:
        answer = _between(prompt, "[The Start of Assistant's Answer]", "[The End of Assistant's Answer]")
    return max(1, min(10, 1 + len(answer.strip()) // 10))


# every way a real judge server fails: a stall past the client's timeout, rate limits, server errors, a 200 whose
# body is not JSON, a completion with an empty message
FAULT_KINDS = ("timeout", "429", "500", "503", "malformed_body", "empty_message")


class JudgeServer:
    def __init__(self):
        self.failures: list[int] = []
        self.delays: list[float] = []  # seconds to stall before answering, one per request in arrival order
        self.delay_all = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.malformed = False  # or a predicate on the prompt text
        self.single_brackets = False
        self.fault_rate = 0.0
        self.fault_seed = 0
        self.fault_kinds = FAULT_KINDS
        self.fault_delay = 2.0  # how long a "timeout" stalls: more than the judge's timeout_s
        self.retry_after = "0.05"  # seconds, the Retry-After of a 429
        self.injected: Counter = Counter()
        self.vary = False
        self.arrivals: Counter = Counter()  # per distinct body
        self.answered: Counter = Counter()  # per distinct body, answers without a fault
        self.requests = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "JudgeServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def fault(self, key: str) -> str | None:
        """The fault for this arrival of this body (call under the lock), or None."""
        self.arrivals[key] += 1
        rng = random.Random(f"{self.fault_seed}/{key}/{self.arrivals[key]}")
        if rng.random() >= self.fault_rate:
            return None
        kind = rng.choice(self.fault_kinds)
        self.injected[kind] += 1
        return kind

    def answer(self, body: dict, k: int = 0) -> dict:
        """The judgment; k: how many times this body was answered before (used by `vary`)."""
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        malformed = self.malformed(prompt) if callable(self.malformed) else self.malformed
        k = k if self.vary else 0
        logprobs = None
        if "Best Model Identifier" in prompt:
            token = "Both" if malformed else alpaca_winner(prompt)
            other = {"m": "M", "M": "m"}.get(token, "The")
            # the winner's margin shrinks with k: the weighted preference moves towards 1.5
            win, lose = -0.1 - 0.3 * k, -2.4 + 0.6 * k
            logprobs = {"content": [{"token": token, "logprob": win, "bytes": list(token.encode()),
                                     "top_logprobs": [{"token": token, "logprob": win, "bytes": list(token.encode())},
                                                      {"token": other, "logprob": lose, "bytes": list(other.encode())}]}]}
            text = token
        elif "[[rating]]" in prompt:
            k = min(10, mt_rating(prompt) + k)
            text = ("I cannot grade this." if malformed
                    else f"The answer is ok. Rating: [{k}]" if self.single_brackets else f"The answer is ok. Rating: [[{k}]]")
        else:
            text = "ok"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": logprobs if body.get("logprobs") else None}
        return {"id": "judge-1", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                "choices": [choice], "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 1,
                                               "total_tokens": len(prompt) // 4 + 1}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                key = hashlib.sha256(raw).hexdigest()
                with server.lock:
                    server.requests += 1
                    server.bodies.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    status = server.failures.pop(0) if server.failures else 200
                    delay = server.delays.pop(0) if server.delays else server.delay_all
                    fault = server.fault(key) if server.fault_rate else None
                    if fault is None and status == 200:
                        server.answered[key] += 1
                    k = server.answered[key] - 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    time.sleep(delay)
                    if fault:
                        return self._fault(fault, body)
                    self._answer(status, body, k)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _answer(self, status: int, body: dict, k: int = 0):
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if status != 200:
                    # Retry-After 0: the client's backoff still applies, tests stay fast
                    return self._send(status, {"error": {"message": f"stand-in error {status}", "type": "server_error"}},
                                      {"Retry-After": "0"} if status == 429 else None)
                self._send(200, server.answer(body, k))

            def _fault(self, kind: str, body: dict):
                if kind == "timeout":
                    time.sleep(server.fault_delay)  # the client has given up by now
                    return self._send(200, server.answer(body))
                if kind in ("429", "500", "503"):
                    return self._send(int(kind), {"error": {"message": f"stand-in fault {kind}", "type": "server_error"}},
                                      {"Retry-After": server.retry_after} if kind == "429" else None)
                if kind == "malformed_body":  # a proxy cut the body short
                    data = json.dumps(server.answer(body)).encode()[:40]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                answer = server.answer(body)  # empty_message: a well-formed completion saying nothing
                answer["choices"][0]["message"]["content"] = ""
                answer["choices"][0]["logprobs"] = None
                return self._send(200, answer)

        return Handler
