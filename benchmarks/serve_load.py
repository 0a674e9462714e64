"""Load on the served champion: 1, 8 and 32 concurrent clients against `mlflow models serve -m models:/llmft@champion`.

    python benchmarks/serve_load.py                                   # the README's figures (CPU: about 3 min)
    python benchmarks/serve_load.py --set register.max_batch_rows=1   # one request at a time, as without batching
    python benchmarks/serve_load.py --adapter models/adapter          # the pipeline's trained adapter

The champion is registered as the pipeline registers it (`params.yaml` with --set overrides, llmft's own `promote`)
into a fresh SQLite store under --work: the params' base model (embedded: SmolLM2-135M-Instruct) with --adapter, or
else an untrained adapter of the params' `train.lora` (B = 0: the base model's answers, at the tuned model's cost,
since the served model runs the adapter's layers either way). Then `mlflow models serve` of `models:/llmft@champion`
on 127.0.0.1, and for each client count: one request per client to warm up, then --seconds of load. A client sends
one instruction of the embedded sample per request (greedy, --new-tokens) and waits for its answer before the next.
Printed per client count: requests/s (answered requests over the time from the first request to the last answer),
p50 and p99 latency, failures (not HTTP 200 with one answer), and the CPU cores that other processes used meanwhile
(their share of /proc/stat's busy time): torch's threads slow down many times over when another process takes a
core, so a figure with other processes busy is no figure. Then the ratio of the most clients' requests/s to one
client's. --out writes the same as JSON with the commit, date and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import helpers  # noqa: E402 (the tests' server helpers: `mlflow models serve` as a user runs it)


def champion(work: Path, overrides: list[str], adapter: str | None) -> tuple[str, str]:
    """(tracking URI, model name) of a store in `work` whose champion is the params' model."""
    import mlflow

    from llmft import models, registry, tracking
    from llmft.config import load_config, rebased_paths
    from llmft.train import peft_config

    uri = f"sqlite:///{work / 'mlflow.db'}"
    # every artifact under work but the base model's cache: the pipeline's own materialised copy
    cfg = load_config(ROOT / "params.yaml", [*rebased_paths(work, keep=("base_cache",)),
                                             f"paths.base_cache={ROOT / 'models/base'}", f"tracking.uri={uri}",
                                             f"tracking.artifact_location={work / 'mlartifacts'}", *overrides])
    if adapter is None:
        from peft import get_peft_model

        adapter = str(work / "adapter")
        model, _ = models.load_with_tokenizer(cfg)
        get_peft_model(model, peft_config(cfg.train)).save_pretrained(adapter)
    with tracking.start_run(cfg, new=True):
        result = registry.promote(cfg, adapter, 1.0, "minimize")
    mlflow.set_tracking_uri(None)
    assert result["promoted"], result
    return uri, cfg.register.model_name


def busy_seconds(group: int) -> tuple[float, float]:
    """(CPU seconds of the whole machine, of process group `group` and this process), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    ours = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(rest[2]) == group or stat.parent.name == str(os.getpid()):  # rest: state, ppid, pgrp, ...
            ours += (int(rest[11]) + int(rest[12])) / tick  # utime, stime
    return machine, ours


def drive(url: str, group: int, clients: int, seconds: float, instructions: list[str], new_tokens: int) -> dict:
    """`clients` threads, each sending one request at a time until `seconds` have passed; its figures (`group`: the
    server's process group, whose CPU time is ours)."""
    import requests

    start, stop, results = threading.Barrier(clients), time.monotonic() + seconds, []

    def client(i: int) -> list[tuple[bool, float, float]]:
        out, j = [], 0
        start.wait()
        while j == 0 or time.monotonic() < stop:  # at least one request (the warm-up sends only that)
            body = {"dataframe_records": [{"instruction": instructions[(i * 97 + j) % len(instructions)]}],
                    "params": {"max_new_tokens": new_tokens, "temperature": 0.0}}
            t = time.perf_counter()
            try:
                r = requests.post(f"{url}/invocations", json=body, timeout=600)
                ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
            except requests.RequestException:
                ok = False
            out.append((ok, t, time.perf_counter()))
            j += 1
        return out

    threads = [threading.Thread(target=lambda i=i: results.append(client(i)), daemon=True) for i in range(clients)]
    cpu = busy_seconds(group)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (machine, ours), (machine0, ours0) = busy_seconds(group), cpu
    done = [r for part in results for r in part]
    served = [end - begin for ok, begin, end in done if ok]
    wall = max(end for _, _, end in done) - min(begin for _, begin, _ in done)
    q = statistics.quantiles(served, n=100) if len(served) > 1 else served * 99
    return {"clients": clients, "requests": len(served), "failed": len(done) - len(served), "wall_s": round(wall, 1),
            "requests_per_s": round(len(served) / wall, 2), "p50_ms": round(statistics.median(served) * 1000),
            "p99_ms": round(q[98] * 1000), "other_processes_cores": round(max(0.0, (machine - machine0) - (ours - ours0)) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=30.0, help="load per client count, after one warm-up request each")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override for the registered model, e.g. register.batch_window_ms=20")
    ap.add_argument("--adapter", help="a trained PEFT adapter (default: an untrained one of the params' train.lora)")
    ap.add_argument("--work", help="a new folder for the store, adapter and server log (default: a temporary one)")
    ap.add_argument("--out", help="write the results here as JSON")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_load-")).resolve()
    if (work / "mlflow.db").exists():  # its champion would stay: the new registration is not better
        sys.exit(f"serve_load: {work} already holds a store (mlflow.db) from an earlier run; pass a new --work folder")
    work.mkdir(parents=True, exist_ok=True)
    uri, name = champion(work, args.overrides, args.adapter)
    rows = [json.loads(line) for line in (ROOT / "src/llmft/assets/sample.jsonl").read_text().splitlines()]
    instructions = [r["instruction"] for r in rows]
    print(f"serving models:/{name}@champion ({', '.join(args.overrides) or 'params.yaml'}); {os.cpu_count()} CPUs; "
          f"server log {work / 'serve.log'}", flush=True)
    figures = []
    # SIGTERM ends the run as Ctrl-C does, so the server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with helpers.model_server(f"models:/{name}@champion", uri, work, "-t", "600") as (url, proc):
        for clients in args.clients:
            drive(url, proc.pid, clients, 0, instructions, args.new_tokens)  # warm-up: one request per client
            f = drive(url, proc.pid, clients, args.seconds, instructions, args.new_tokens)
            figures.append(f)
            print(f"{clients:>3} clients: {f['requests_per_s']:6.2f} requests/s, p50 {f['p50_ms']:>5} ms, p99 "
                  f"{f['p99_ms']:>5} ms, {f['failed']} failed ({f['requests']} requests in {f['wall_s']} s; other "
                  f"processes used {f['other_processes_cores']:.2f} cores)", flush=True)
    ratio = figures[-1]["requests_per_s"] / figures[0]["requests_per_s"]
    print(f"{figures[-1]['clients']} clients vs {figures[0]['clients']}: {ratio:.2f}x requests/s")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(), "overrides": args.overrides,
                                              "new_tokens": args.new_tokens, "seconds": args.seconds,
                                              "figures": figures, "ratio": round(ratio, 2)}, indent=2))


if __name__ == "__main__":
    main()
