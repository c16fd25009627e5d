"""Every shipped train preset loads into ``TrainConfig`` (with data set where a preset leaves it open), and
the task registry knows each preset's task."""

from __future__ import annotations

import pytest

from vidlatent.config import TrainConfig, list_presets
from vidlatent.train import load_train_config
from vidlatent.train.tasks import TASKS, Task


@pytest.mark.parametrize("preset", list_presets("train"))
def test_train_preset_loads(preset):
    cfg = load_train_config(preset, overrides=["data=shapes"] if preset == "tiny" else [])
    assert isinstance(cfg, TrainConfig) and cfg.task in TASKS


def test_shipped_presets_are_there():
    shipped = {
        "tiny",
        "default-dit",
        "default-vae",
        "default-vae-finetune",
        "control-tiny",
        "default-control",
    }
    assert shipped <= set(list_presets("train"))


def test_tasks_are_registered_by_name():
    assert set(TASKS) >= {"denoiser", "vae", "control"}
    assert all(issubclass(cls, Task) and cls.name == name for name, cls in TASKS.items())
    with pytest.raises(ValueError, match="unknown task 'bogus'; accepted: control, denoiser, vae"):
        load_train_config("tiny", overrides=["data=x", "task=bogus"])


def test_old_import_paths_still_work():
    from vidlatent.train import trainer

    assert trainer.TrainConfig is TrainConfig
    for name in ("Trainer", "train", "load_train_config", "NonFiniteLossError", "dit_flops"):
        assert hasattr(trainer, name)
