"""llmft command line: one verb per pipeline stage, each reading params.yaml plus key=value overrides.

    python -m llmft prepare data.source=../shared/data/dolly/dolly_sample.jsonl
    python -m llmft train train.max_steps=20
    python -m llmft params            # every key, its default and what it does
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from .config import LlmftError, describe, load_config

# verb -> (module, function, one-line help). Modules are imported only when their verb runs.
VERBS = {
    "prepare": ("llmft.data", "prepare", "clean, format and split the instruction data into data/processed/"),
    "train": ("llmft.train", "train", "LoRA/QLoRA fine-tuning with TRL SFTTrainer, tracked in MLflow"),
    "merge": ("llmft.train", "merge", "merge the trained adapter into the base weights (train.output_dir + '-merged')"),
    "evaluate": ("llmft.evaluate", "evaluate", "base vs tuned on the configured benchmarks, with paired bootstrap CIs"),
    "register": ("llmft.registry", "register", "log the tuned model to the MLflow registry and promote it if it wins"),
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
    sub.add_parser("params", help="list every params.yaml key with its default and meaning")
    args = parser.parse_args(argv)

    if args.verb == "params":
        for key, default, doc in describe():
            print(f"{key} = {default}\n    {doc}")
        return 0
    try:
        cfg = load_config(args.params, [*shlex.split(args.set), *args.overrides])
        module, func, _ = VERBS[args.verb]
        getattr(importlib.import_module(module), func)(cfg)
    except LlmftError as e:
        print(f"llmft {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmft {args.verb}: interrupted; completed outputs and checkpoints are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
