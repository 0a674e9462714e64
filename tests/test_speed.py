"""The speed switches' plug-in interface: one list, one Switch per module, hooks called in order by build_trainer."""
from __future__ import annotations

import importlib
import pkgutil

from helpers import train_overrides
from llmft import speed, train
from llmft.config import load_config


def test_every_switch_module_registers_its_switch_once():
    registered = {type(s) for s in speed.SWITCHES}
    assert len(registered) == len(speed.SWITCHES)
    for m in pkgutil.iter_modules(speed.__path__):
        mod = importlib.import_module(f"llmft.speed.{m.name}")
        own = [c for c in vars(mod).values()
               if isinstance(c, type) and issubclass(c, speed.Switch) and c is not speed.Switch and c.__module__ == mod.__name__]
        assert len(own) <= 1 and set(own) <= registered, (m.name, own)


class Probe(speed.Switch):
    """A switch that records its hooks: what a new switch gets without touching build_trainer."""

    name = "probe"
    calls: list = []

    def on(self, tc) -> bool:
        return True

    def before_model_load(self, cfg) -> None:
        self.calls.append("before_model_load")

    def trainer_args(self, cfg) -> dict:
        self.calls.append("trainer_args")
        return {"weight_decay": 0.123}

    def trainer_class(self, cls):
        self.calls.append("trainer_class")
        return type("Probed" + cls.__name__, (cls,), {})

    def after_trainer(self, cfg, trainer) -> str:
        self.calls.append(("after_trainer", type(trainer).__name__))
        return "probe: applied"


def test_build_trainer_calls_a_registered_switch_s_hooks_in_order(tmp_path, tiny_model_dir, processed, tracking_uri,
                                                                   monkeypatch, capsys):
    probe = Probe()
    probe.calls = []
    monkeypatch.setattr(speed, "SWITCHES", (*speed.SWITCHES, probe))
    cfg = load_config("none.yaml", train_overrides(tmp_path, tiny_model_dir, processed, tracking_uri,
                                                   **{"train.overlap_steps": True}))
    trainer, _ = train.build_trainer(cfg)
    assert probe.calls == ["before_model_load", "trainer_args", "trainer_class",
                           ("after_trainer", "ProbedOverlapSFTTrainer")], probe.calls
    assert trainer.args.weight_decay == 0.123 and hasattr(trainer, "flush_tokens")  # composes with overlap_steps
    assert "train: probe: applied" in capsys.readouterr().out
