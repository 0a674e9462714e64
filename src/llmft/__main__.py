"""llmft command line: one verb per pipeline stage, each reading params.yaml plus key=value overrides.

    python -m llmft prepare data.source=path/to/dolly.jsonl   # or a hub id: databricks/databricks-dolly-15k
    python -m llmft train train.max_steps=20
    python -m llmft params            # every key: its value in effect, its default and what it does
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import re
import shlex
import sys

from .config import describe, load_config, to_dict
from .errors import LlmftError

# verb -> (module, function, one-line help). Modules are imported only when their verb runs.
VERBS = {
    "prepare": ("llmft.data", "prepare", "clean, format and split the instruction data into data/processed/"),
    "train": ("llmft.train", "train", "LoRA/QLoRA fine-tuning with TRL SFTTrainer, tracked in MLflow"),
    "merge": ("llmft.train", "merge", "merge the trained adapter into the base weights (paths.adapter + '-merged')"),
    "evaluate": ("llmft.evaluate", "evaluate", "base vs tuned on the configured benchmarks, with paired bootstrap CIs"),
    "register": ("llmft.registry", "register", "log the tuned model to the MLflow registry and promote it if it wins"),
    "report": ("llmft.report", "report", "the run's 2-4 page PDF report (paths.report), built from its own records"),
    "tune": ("llmft.tune", "tune", "Optuna search over training, trials nested in MLflow, the best promoted"),
    "trials": ("llmft.tune", "trials", "list the study's trials: state, value, params, MLflow run"),
    "ask": ("llmft.ask", "ask", "base and tuned answers to your prompts, side by side"),
}
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")  # a dotted params key: what `ask` takes as an override

EPILOG = """\
Overrides are dotted keys into params.yaml, values parsed as YAML:
  train.lora.r=8  train.max_steps=50  data.source=path/to/file.jsonl  evaluate.benchmarks=[test_loss,rouge]
`python -m llmft params` lists every key with its default and meaning."""


def _doc(module: str) -> str:
    """The verb module's docstring (its commands and what it writes), read without importing it: `--help` must
    not wait for torch."""
    spec = importlib.util.find_spec(module)
    try:
        return ast.get_docstring(ast.parse(open(spec.origin).read())) or ""
    except (OSError, SyntaxError, TypeError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmft", description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module, _, help_) in VERBS.items():
        p = sub.add_parser(verb, help=help_, description=_doc(module) or help_, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("overrides", nargs="*", metavar="prompt" if verb == "ask" else "key=value",
                       help="a prompt, or a key=value override" if verb == "ask" else "override a params.yaml key")
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", default="", metavar="'k=v k=v'",
                       help="overrides as one shell-quoted string (for MLproject entry points)")
        if verb == "ask":
            p.add_argument("--file", help="JSONL of prompts: {instruction, context?} per line")
            p.add_argument("--tuned", help="the tuned side: models:/<name>@<alias>, an endpoint URL, or an adapter "
                                           "folder (default: paths.adapter)")
    p = sub.add_parser("params", help="every key: the value in effect (params.yaml + overrides), its default, its meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a params.yaml key")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    try:
        words = [*shlex.split(getattr(args, "set", "")), *args.overrides]
        prompts = [w for w in words if not OVERRIDE.match(w)] if args.verb == "ask" else []
        cfg = load_config(args.params, [w for w in words if w not in prompts])
        if args.verb == "params":
            return _print_params(cfg)
        module, func, _ = VERBS[args.verb]
        if args.verb in ("evaluate", "ask"):
            # Generation sizes its batches to the free GPU memory, so fragmentation decides whether a prefill fits:
            # without this a tuned 7B pass ran out of memory on an H200 with 17 GiB reserved but free. Read when
            # torch first touches CUDA, so it is set before the verb's module loads.
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        fn = getattr(importlib.import_module(module), func)
        fn(cfg, prompts, file=args.file, tuned=args.tuned) if args.verb == "ask" else fn(cfg)
    except LlmftError as e:
        print(f"llmft {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmft {args.verb}: interrupted; completed outputs and checkpoints are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmft params | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


def _print_params(cfg) -> int:
    """`key = value` in effect, then `(default: ...)` where it differs, then what the key means."""
    values = to_dict(cfg)
    for key, default, doc in describe():
        value = values
        for part in key.split("."):  # not flatten(): it spreads a dict-valued key (data.columns) into its entries
            value = value[part]
        value = repr(value)
        changed = "" if value == default else f"   (default: {default})"
        print(f"{key} = {value}{changed}\n    {doc}")
    sys.stdout.flush()  # here, where a closed pipe (`| head`) is caught, not at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
