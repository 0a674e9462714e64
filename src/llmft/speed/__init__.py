"""Training speed switches: each one a key of the train block, a module here, and a `Switch` with named hooks.

    train.build_trainer                       a switch's hook
    load the config ........................ checks(tc)              rules between keys, reported with every other
    before the model loads ................. before_model_load(cfg)  fail fast (GPU, package), register kernels
    build the training arguments ........... trainer_args(cfg)       SFTConfig keywords
    pick the trainer class ................. trainer_class(cls)      wrap TRL's SFTTrainer
    after the trainer exists ............... after_trainer(cfg, t)   convert layers in place; returns a log line

A new switch is its key in config.TrainConfig (typed, documented), its module here with one `Switch` subclass, and
one line in SWITCHES. Order matters where switches compose: fused_lora runs after fp8 has converted the base.
"""
from __future__ import annotations

from typing import Iterator

Check = Iterator[tuple[str, bool, str]]


class Switch:
    """One training speed switch; every hook does nothing unless a subclass says otherwise."""

    name: str = ""
    """What the log and errors call it (the train key that turns it on)."""
    fsdp: bool = True
    """Whether it runs under FSDP (`accelerate launch` with fsdp_version 2); the train stage refuses it otherwise."""

    def on(self, tc) -> bool:
        """Whether the train block turns it on."""
        return bool(getattr(tc, self.name))

    def checks(self, tc) -> Check:
        """Rules between train keys, checked when the config loads, as config's own `_checks`: (key, ok, message)."""
        return iter(())

    def before_model_load(self, cfg) -> None:
        """Fail before minutes of loading where it cannot run; register what loading needs."""

    def trainer_args(self, cfg) -> dict:
        """Keywords for TRL's SFTConfig."""
        return {}

    def trainer_class(self, cls: type) -> type:
        """The trainer class to build: `cls` (TRL's SFTTrainer, or an earlier switch's) or a subclass of it."""
        return cls

    def after_trainer(self, cfg, trainer) -> str | None:
        """Work on the built trainer (PEFT has frozen the base, the Trainer placed it; train() has not compiled or
        wrapped it yet). Returns a line for the log, or None."""
        return None


from .compile import Compile  # noqa: E402  (the classes above come first: the modules subclass Switch)
from .fp8 import FP8  # noqa: E402
from .fused_lora import FusedLoRA  # noqa: E402
from .liger import Liger  # noqa: E402
from .overlap import Overlap  # noqa: E402
from .varlen import Varlen  # noqa: E402

SWITCHES: tuple[Switch, ...] = (Varlen(), Liger(), Compile(), Overlap(), FP8(), FusedLoRA())


def active(tc) -> list[Switch]:
    """The switches the train block turns on, in SWITCHES' order."""
    return [s for s in SWITCHES if s.on(tc)]


def checks(tc) -> Check:
    """Every switch's load-time rules."""
    for s in SWITCHES:
        yield from s.checks(tc)
