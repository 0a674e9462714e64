"""llmft command line: one verb per pipeline stage, each reading params.yaml plus key=value overrides.

    python -m llmft prepare data.source=../shared/data/dolly/dolly_sample.jsonl
    python -m llmft train train.max_steps=20
    python -m llmft params            # every key: its value in effect, its default and what it does
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from .config import LlmftError, describe, flatten, load_config, to_dict

# verb -> (module, function, one-line help). Modules are imported only when their verb runs.
VERBS = {
    "prepare": ("llmft.data", "prepare", "clean, format and split the instruction data into data/processed/"),
    "train": ("llmft.train", "train", "LoRA/QLoRA fine-tuning with TRL SFTTrainer, tracked in MLflow"),
    "merge": ("llmft.train", "merge", "merge the trained adapter into the base weights (paths.adapter + '-merged')"),
    "evaluate": ("llmft.evaluate", "evaluate", "base vs tuned on the configured benchmarks, with paired bootstrap CIs"),
    "register": ("llmft.registry", "register", "log the tuned model to the MLflow registry and promote it if it wins"),
    "tune": ("llmft.tune", "tune", "Optuna search over training, trials nested in MLflow, the best promoted"),
    "trials": ("llmft.tune", "trials", "list the study's trials: state, value, params, MLflow run"),
}

EPILOG = """\
Overrides are dotted keys into params.yaml, values parsed as YAML:
  train.lora.r=8  train.max_steps=50  data.source=path/to/file.jsonl  evaluate.benchmarks=[test_loss,rouge]
`python -m llmft params` lists every key with its default and meaning."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmft", description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, _, help_) in VERBS.items():
        p = sub.add_parser(verb, help=help_, description=help_, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override a params.yaml key")
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", default="", metavar="'k=v k=v'",
                       help="overrides as one shell-quoted string (for MLproject entry points)")
    p = sub.add_parser("params", help="every key: the value in effect (params.yaml + overrides), its default, its meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override a params.yaml key")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    try:
        overrides = [*shlex.split(getattr(args, "set", "")), *args.overrides]
        cfg = load_config(args.params, overrides)
        if args.verb == "params":
            return _print_params(cfg)
        module, func, _ = VERBS[args.verb]
        getattr(importlib.import_module(module), func)(cfg)
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
    flat = flatten(to_dict(cfg))
    for key, default, doc in describe():
        value = repr(flat.get(key))
        changed = "" if value == default else f"   (default: {default})"
        print(f"{key} = {value}{changed}\n    {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
